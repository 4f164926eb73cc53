"""The documents say what the code does: every citation names a section that exists, the CLI reference is
the parser's, and every sample in the README is what its command prints."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "DESIGN.md"
CITED_FROM = ("diffcolor", "flows", "review", "tests", "manifests", "deploy", "docs")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? \S", re.MULTILINE)


def _sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder in CITED_FROM:
        files += [path for path in (ROOT / folder).rglob("*")
                  if path.is_file() and path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".html", ".js", ".sh"}]
    return files


def design_sections() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def citations(line: str) -> list[str]:
    """The section numbers a line cites: every ``§N`` after its first ``DESIGN.md``."""
    _, cited, rest = line.partition("DESIGN.md")
    return SECTION.findall(rest) if cited else []


def test_design_numbers_its_sections_in_order():
    numbers = HEADING.findall(DESIGN.read_text(encoding="utf-8"))
    top = [int(number) for number in numbers if "." not in number]
    assert top == list(range(1, len(top) + 1)) and len(top) >= 10, top
    for number in numbers:
        if "." in number:
            assert number.rsplit(".", 1)[0] in numbers, f"§{number} has no parent section"


def test_citations_are_found_in_the_forms_the_code_uses():
    assert citations("(docs/DESIGN.md §4.1 and §9)") == ["4.1", "9"]
    assert citations('docs/DESIGN.md §4.3 "Images in" and §4.4 "Images out".') == ["4.3", "4.4"]
    assert citations("# §12 of RFC 1234, no design citation") == []


def test_every_design_citation_names_an_existing_section():
    sections = design_sections()
    cited, missing = 0, []
    for path in _sources():
        for line_number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            numbers = SECTION.findall(line) if path == DESIGN else citations(line)  # DESIGN.md's own references
            cited += len(numbers)
            missing += [f"{path.relative_to(ROOT)}:{line_number} cites §{n}" for n in numbers if n not in sections]
    assert not missing, "no such section in docs/DESIGN.md:\n" + "\n".join(missing)
    assert cited >= 27, f"only {cited} citations found: is the pattern still right?"


def test_no_code_cites_a_spec_that_is_not_in_the_repository():
    pattern = re.compile(r"spec(ification)? sections? \d|#\s*spec:|the spec's|/work/shared|SPEC\.md", re.IGNORECASE)
    found = []
    for path in _sources():
        if path == Path(__file__):
            continue
        for line_number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{line_number}: {line.strip()}")
    assert not found, "cite docs/DESIGN.md §N instead:\n" + "\n".join(found)


def test_no_document_or_message_advises_the_retired_huggingface_cli():
    found = [f"{path.relative_to(ROOT)}:{number}"
             for path in _sources() if path != Path(__file__) and path.name != "test_deploy.py"
             for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if "huggingface-cli download" in line]
    assert not found, "current huggingface_hub ships `hf download`: " + ", ".join(found)


def test_the_cli_reference_is_the_parsers(tmp_path):
    """docs/CLI.md is what ``python -m diffcolor.clidoc`` writes now: a flag added without regenerating it fails."""
    import subprocess
    import sys

    written = subprocess.run([sys.executable, "-m", "diffcolor.clidoc"], cwd=ROOT, capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert written == (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8"), (
        "docs/CLI.md is out of date: run `python -m diffcolor.clidoc > docs/CLI.md`")


def test_the_cli_reference_lists_every_command_and_option():
    import argparse

    from diffcolor import clidoc
    from diffcolor.cli import build_parser

    parser = build_parser()
    text = clidoc.render(parser)
    for name, _, _, sub in clidoc.subcommands(parser):
        assert f"### diffcolor {name}\n" in text
        for action in sub._actions:
            if action.help != argparse.SUPPRESS and action.option_strings and "-h" not in action.option_strings:
                assert f"`{action.option_strings[-1]}`" in text, (name, action.option_strings)
    probe = argparse.ArgumentParser(prog="probe")
    probe.add_argument("--level", type=float, default=0.5, help="how much (default %(default)s) | a pipe")
    assert "| `--level` `LEVEL` |  | `0.5` | how much (default 0.5) \\| a pipe |" in clidoc.render(probe)


def test_the_architecture_page_draws_the_layers_and_names_the_contracts_of_pyproject():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    picture = page.split("## Layers", 1)[1].split("```", 2)[1]
    drawn = [line.split("   ")[0].strip() for line in picture.strip().splitlines()]
    [layers] = [contract["layers"] for contract in contracts if contract["type"] == "layers"]
    assert drawn == layers, "docs/ARCHITECTURE.md's layer picture differs from pyproject.toml's layers contract"
    for contract in contracts:
        assert f'"{contract["name"]}"' in page, f"docs/ARCHITECTURE.md does not list the contract {contract['name']!r}"


# --- README samples: each block marked ``<!-- sample: COMMAND -->`` is what COMMAND prints ---------------------------

SAMPLE = re.compile(r"<!-- sample: (?P<command>[^>]+?) -->\n```[a-z]*\n\$ (?P<shown>[^\n]+)\n(?P<output>.*?)```", re.DOTALL)
VOLATILE = [  # what differs between machines and runs, and nothing else
    (re.compile(r"\((\d+\.)?\d+ s\)"), "(N s)"),  # how long the command took
]


def readme_samples() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    samples = [(match["command"], match["output"]) for match in SAMPLE.finditer(text)]
    for match in SAMPLE.finditer(text):
        assert match["shown"] == match["command"], f"the sample shows {match['shown']!r} but is marked {match['command']!r}"
    assert text.count("<!-- sample:") == len(samples), "a sample marker is not followed by a ``` block starting with $"
    return samples


def normalise(text: str, cache: Path | None = None) -> str:
    if cache is not None:
        text = text.replace(str(cache), "~/.cache/diffcolor")
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def test_the_readme_marks_its_samples():
    commands = [command for command, _ in readme_samples()]
    assert "diffcolor doctor tiny --device cpu" in commands
    assert "diffcolor manifest validate manifests/demo.parquet" in commands


@pytest.mark.parametrize("command, shown", [pytest.param(*sample, id=sample[0]) for sample in readme_samples()])
def test_each_readme_sample_is_what_its_command_prints(command, shown, cache_dir, monkeypatch, capsys):
    """The README's samples are run (in this checkout, on the session's tiny bundle) and compared line by line."""
    import shlex

    from diffcolor.cli import main

    words = shlex.split(command)
    assert words[0] == "diffcolor"
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "100")
    capsys.readouterr()
    status = main(words[1:])
    captured = capsys.readouterr()
    printed = normalise(captured.out + captured.err, cache_dir)
    assert status == 0, printed
    assert printed == normalise(shown), (
        f"README.md's sample of `{command}` is not what it prints now; it prints:\n{printed}")


# --- links: every relative link of the README and docs/ leads to a file and a heading that exist -------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_every_relative_link_leads_to_an_existing_file_and_heading():
    broken = []
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)} -> {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_guide_that_starts_with_the_quick_start_and_its_contents():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", re.sub(r"```.*?```", "", text, flags=re.DOTALL), re.MULTILINE)
    assert headings[:2] == ["Contents", "Quick start"]
    assert text.index("make demo") < text.index("make test") < text.index("## Colourising one photograph")
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    for heading in headings[1:]:
        assert f"[{heading.replace('`', '')}](#" in contents, f"the contents do not list {heading!r}"
