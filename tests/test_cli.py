"""The command line starts in a blink: help and manifest commands never load torch, diffusers or Prefect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffcolor import cli

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "manifests" / "demo.parquet"
HEAVY = ("torch", "diffusers", "transformers", "peft", "kornia", "prefect", "prefect_ray")
BLOCK = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in HEAVY)  # importing them raises


def _diffcolor_blocked(*arguments: str, block: tuple[str, ...] = HEAVY) -> subprocess.CompletedProcess:
    """``diffcolor ARGUMENTS`` in a fresh process in which the ``block``ed packages cannot be imported."""
    code = ("import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in block)
            + "from diffcolor.cli import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


COMMANDS = [[], ["tiny-bundle"], ["colorize"], ["recolor"], ["manifest"], ["manifest", "build"], ["manifest", "validate"],
            ["run"], ["reprocess"], ["demo"], ["eval"], ["eval-compare"], ["doctor"], ["bag"], ["iiif"],
            ["review"]]


def test_every_help_works_with_torch_diffusers_and_prefect_unimportable():
    code = BLOCK + (
        "from diffcolor.cli import main\n"
        f"for command in {COMMANDS!r}:\n"
        "    try:\n"
        "        main([*command, '--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (command, exit.code)\n"
        "    print('HELP-OK', *command)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("HELP-OK") == len(COMMANDS)
    assert "colorize" in done.stdout and "--set FIELD=VALUE" in done.stdout


def test_manifest_validate_works_with_torch_unimportable(tmp_path):
    done = _diffcolor_blocked("manifest", "validate", str(DEMO))
    assert done.returncode == 0, done.stderr
    assert "OK, 6 items" in done.stdout.strip()

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"item_id": ["a", "../b"], "image_uri": ["a.png", "b.png"],
                             "caption": ["a dog on a bench", "of the"],
                             "color_map": pa.array([[("horse", "brown")], None], pa.map_(pa.string(), pa.string()))}), bad)
    done = _diffcolor_blocked("manifest", "validate", str(bad))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("row 1, column 'color_map'") and "'horse'" in line for line in lines)
    assert any(line.startswith("row 2, column 'item_id'") and "unsafe item_id" in line for line in lines)
    assert any(line.startswith("row 2, column 'caption'") and "no content word" in line for line in lines)


def test_manifest_build_works_with_torch_unimportable(tmp_path):
    out = tmp_path / "example.parquet"
    done = _diffcolor_blocked("manifest", "build", "--from-csv", str(REPO / "manifests" / "example.csv"), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.exists() and pq.read_table(out).num_rows > 0


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("stage1.steps=abc", "'stage1.steps' takes an integer, got 'abc'"),
        ("stage1.stepz=3", "unknown configuration field 'stage1.stepz'"),
        ("render.alpha=true", "'render.alpha' takes a number, got True"),
        ("stage1=4", "'stage1' is a group of settings"),
        ("stage1.timestep_range=[100]", "'stage1.timestep_range' takes a list of 2 values"),
        ("stage1.steps", "--set expects FIELD=VALUE"),
    ],
)
def test_run_refuses_a_bad_override_by_name_before_any_work(tmp_path, setting, message):
    """Prefect cannot even be imported here: the refusal comes before the flow (and its server) would start."""
    out = tmp_path / "out"
    done = _diffcolor_blocked("run", str(DEMO), "--out", str(out), "--model", "tiny", "--preset", "smoke",
                              "--set", setting, block=("prefect", "prefect_ray"))
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("diffcolor: error: ") and message in last, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_parser_constants_match_what_they_stand_for():
    from diffcolor.method.presets import PRESETS
    from diffcolor.tools.evaluate import EvalConfig

    assert set(cli.PRESET_NAMES) == set(PRESETS)
    assert cli.EVAL_MAX_SIDE == EvalConfig.max_side
    from diffcolor.archive.storage import ReadLimits

    assert (cli.SOURCE_LIMIT_MIB * 2**20, cli.SOURCE_LIMIT_SECONDS) == (ReadLimits.max_bytes, ReadLimits.seconds)


def test_an_unknown_preset_is_refused_by_argparse_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["colorize", "x.png", "--caption", "a dog", "--model", "tiny", "--out", "o", "--preset", "fast"])
    assert exit.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
