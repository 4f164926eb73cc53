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
    for name, _, _, sub in clidoc._subcommands(parser):
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
