"""One way to configure: ``--set FIELD=VALUE`` on every command that works with a configuration, checked
against the configuration's dataclasses before anything is read, loaded or started."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffcolor import cli
from diffcolor.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))
    yield prefix, {option for action in parser._actions for option in action.option_strings}


def test_every_command_with_a_configuration_takes_set():
    options = dict(_commands(build_parser()))
    with_preset = {command for command, known in options.items() if "--preset" in known}
    assert with_preset == {("colorize",), ("run",), ("reprocess",), ("eval",), ("review",)}
    for command in with_preset | {("recolor",)}:
        assert "--set" in options[command], command


@pytest.fixture
def nothing_heavy_starts(monkeypatch):
    """Fails the test if a command gets as far as loading models, checking a model or starting Prefect."""
    def refuse(*args, **kwargs):
        pytest.fail("the command went on past a bad --set")

    for name in ("_load_models", "_preflight", "_quiet_prefect", "_signing", "_lift_credentials"):
        monkeypatch.setattr(cli, name, refuse)


BAD_SETS = [
    ("stage1.nope=1", "unknown configuration field 'stage1.nope'"),
    ("stage1.steps=many", "'stage1.steps' takes an integer, got 'many'"),
    ("render.alpha=[1, 2]", "'render.alpha' takes a number, got [1, 2]"),
    ("stage1=3", "'stage1' is a group of settings"),
    ("stage1.steps", "--set expects FIELD=VALUE, got 'stage1.steps'"),
    ("master_compression=zip", "master_compression must be one of"),
]


@pytest.mark.parametrize("command", [
    ["colorize", "scan.png", "--caption", "a dog", "--out", "o", "--model", "tiny"],
    ["recolor", "no-such-item"],
    ["run", "no-such-manifest.parquet", "--out", "o", "--model", "tiny"],
    ["reprocess", "o", "--items", "a", "--target", "a red dog"],
    ["eval", "no-such-manifest.parquet", "--out", "o", "--model", "tiny"],
    ["review", "o"],
], ids=lambda command: command[0])
def test_a_bad_set_is_refused_with_one_line_naming_it_before_any_work(command, nothing_heavy_starts, capsys, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    for pair, message in BAD_SETS:
        assert main([*command, "--set", "stage1.steps=2", "--set", pair]) == 2, pair
        error = capsys.readouterr().err.strip()
        assert error.startswith("diffcolor: error: ") and "\n" not in error
        assert message in error, (pair, error)
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_a_bad_set_from_the_real_command_line_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "diffcolor", "colorize", str(tmp_path / "scan.png"), "--caption",
                           "a dog", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no-model"),
                           "--set", "render.steps=few"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["diffcolor: error: 'render.steps' takes an integer, got 'few'"]


def test_reprocess_hands_its_preset_and_set_to_the_flow(monkeypatch, tmp_path, capsys):
    import flows.local
    import flows.reprocess

    seen = {}

    class Refused:
        message = "stop"

        def result(self, raise_on_failure=False):
            from diffcolor.common.errors import UserError

            return UserError("stopped by the test")

    def fake_reprocess(output, targets, options, return_state=True):
        seen.update(output=output, targets=targets, options=options)
        return Refused()

    monkeypatch.setattr(cli, "_preflight", lambda *args: None)
    monkeypatch.setattr(flows.local, "LocalPrefect", nullcontext)
    monkeypatch.setattr(flows.reprocess, "reprocess", fake_reprocess)
    code = main(["reprocess", str(tmp_path / "out"), "--items", "a", "--target", "a red dog", "--preset", "smoke",
                 "--set", "render.alpha=0.5", "--set", "stage2.finetune_steps=2"])
    assert code == 2 and "stopped by the test" in capsys.readouterr().err
    assert seen["options"].preset == "smoke"
    assert seen["options"].overrides == {"render.alpha": 0.5, "stage2.finetune_steps": 2}


@pytest.mark.slow
def test_reprocess_set_changes_a_render_and_a_refit_with_the_chosen_preset(prefect_server, tmp_path):
    from diffcolor.archive.items import ItemLayout
    from flows.collection import RunOptions, colorize_collection
    from tests.conftest import gray_scene
    from tests.test_flows import CAPTION, write_manifest

    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.fromarray(np.round(gray_scene(48, 64, seed=index) * 255).astype(np.uint8)).save(images / f"p{index}.png")
    manifest = write_manifest(tmp_path / "manifest.parquet", [
        {"item_id": f"p{index}", "image_uri": f"images/p{index}.png", "caption": CAPTION, "seed": index,
         "accession_number": f"B.{index}"} for index in range(2)])
    out = tmp_path / "out"
    assert colorize_collection(str(manifest), str(out), "tiny", RunOptions(preset="smoke", pool="inline"),
                               return_state=True).is_completed()
    Path(ItemLayout(str(out / "items" / "p1")).state_object).unlink()  # p1 is refitted, p0 rendered from its state

    assert main(["reprocess", str(out), "--items", "p0,p1", "--color-map", '{"dog": "red"}', "--pool", "inline",
                 "--device", "cpu", "--preset", "smoke", "--set", "render.alpha=0.5",
                 "--set", "stage2.finetune_steps=2"]) == 0
    rendered = json.loads((out / "items" / "p0" / "result.json").read_text())
    assert rendered["kind"] == "render" and rendered["alpha"] == 0.5  # the item's stored configuration, changed
    refit = json.loads((out / "items" / "p1" / "result.json").read_text())
    # The chosen preset, changed: smoke's 4 stage-1 steps, 4 embedding steps and 2 fine-tune steps (not 4).
    assert refit["preset"] == "smoke" and refit["finetune_steps_run"] == 4 + 4 + 2


def test_every_kind_of_value_set_reaches_the_flows_options():
    from flows.collection import RunOptions
    from flows.reprocess import ReprocessOptions

    from diffcolor.method.presets import apply_overrides, get_preset

    overrides = cli._parse_overrides(["stage1.timestep_range=[100, 800]", "model_pixels=null", "render.alpha=0.5",
                                      "stage2.finetune_steps=2", "access_format=PNG"])
    apply_overrides(get_preset("smoke"), overrides)  # every one a valid setting
    for options in (RunOptions(overrides=overrides), ReprocessOptions(overrides=overrides)):
        assert options.overrides == overrides
        config = apply_overrides(get_preset("smoke"), options.overrides)
        assert config.stage1.timestep_range == (100, 800) and config.model_pixels is None
