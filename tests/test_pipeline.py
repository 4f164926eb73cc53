"""One item end to end: full-resolution fidelity, determinism, records, versions, recolor."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.color import rgb2lab

from diffcolor.cli import main
from diffcolor.common.items import ItemRequest
from diffcolor.pipeline import colorize_item

CAPTION = "a dog sitting on a wooden bench"
RESULT_FIELDS = {
    "item_id", "version", "status", "error_class", "error_message", "cache_key", "source_sha256", "outputs",
    "output_sha256", "clip_score", "colorfulness", "max_delta_l", "mean_delta_l", "gamut_clipped_fraction",
    "alignment_confidence", "seconds", "finetune_steps_run", "seed", "model_id", "software_version",
}


def _lightness_of_gray(values: np.ndarray) -> np.ndarray:
    return rgb2lab(np.repeat(values[..., None], 3, axis=-1))[..., 0]


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_16bit_scan_gives_16bit_master_of_the_same_size_with_the_same_lightness(models, smoke, tmp_path, gray_tiff16):
    source_sha = _sha256(gray_tiff16)
    request = ItemRequest(item_id="scan16", source_uri=str(gray_tiff16), caption=CAPTION, color_map={"dog": "brown"})
    [record] = colorize_item(models, request, str(tmp_path / "out"), smoke, preset="smoke")

    assert record["status"] == "done" and RESULT_FIELDS <= record.keys()
    master = tifffile.imread(record["outputs"]["master"])
    assert master.dtype == np.uint16 and master.shape == (900, 1200, 3)
    source = np.asarray(Image.open(gray_tiff16)).astype(np.float64) / 65535.0
    delta = np.abs(rgb2lab(master.astype(np.float64) / 65535.0)[..., 0] - _lightness_of_gray(source))
    # Chroma is reduced at constant L* where it leaves the gamut, so L* holds everywhere.
    assert delta.max() <= 1.0
    assert record["max_delta_l"] <= 1.0 and 0.0 <= record["gamut_clipped_fraction"] < 1.0
    # The output is actually coloured, and the original is untouched.
    lab = rgb2lab(master.astype(np.float64) / 65535.0)
    assert np.hypot(lab[..., 1], lab[..., 2]).mean() > 1.0
    assert _sha256(gray_tiff16) == source_sha == record["source_sha256"]
    assert record["target_prompt"].startswith("a brown dog")
    assert record["output_sha256"]["master"] == _sha256(record["outputs"]["master"])
    # Both files carry the provenance, labelled as AI-composited and as a smoke run.
    from diffcolor.archive.metadata import DIGITAL_SOURCE_TYPE, read_xmp

    for role in ("master", "access"):
        xmp = read_xmp(open(record["outputs"][role], "rb").read())
        assert xmp["digital_source_type"] == DIGITAL_SOURCE_TYPE
        assert xmp["source_sha256"] == source_sha and xmp["seed"] == 0 and xmp["smoke_run"] is True
        assert xmp["target_prompt"] == record["target_prompt"] and xmp["model_hash"] == models.model_hash


def test_same_seed_same_pixels_other_seed_other_chroma(models, smoke, tmp_path, gray_png):
    def run(seed, name):
        request = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION, seed=seed)
        [record] = colorize_item(models, request, str(tmp_path / name), smoke)
        return tifffile.imread(record["outputs"]["master"]).astype(np.int32)

    first, again, other = run(5, "a"), run(5, "b"), run(6, "c")
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 2


def test_second_colorize_of_the_same_item_does_no_work(models, smoke, tmp_path, gray_png):
    request = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION)
    [first] = colorize_item(models, request, str(tmp_path / "out"), smoke)
    [second] = colorize_item(models, request, str(tmp_path / "out"), smoke)
    assert first["finetune_steps_run"] > 0
    assert second["status"] == "skipped_done" and second["version"] == first["version"] == 1
    assert not (tmp_path / "out" / "versions" / "v0002.json").exists()


def test_new_targets_reuse_the_stored_colour_state(models, smoke, tmp_path, gray_png):
    out = str(tmp_path / "out")
    colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION), out, smoke)
    records = colorize_item(
        models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION, targets=("a red dog on a bench",)),
        out, smoke,
    )
    assert [r["version"] for r in records] == [2]
    assert records[0]["finetune_steps_run"] == 0


def test_recolor_renders_from_the_state_without_fine_tuning_and_keeps_versions(models, tmp_path, gray_png, capsys):
    out = tmp_path / "item"
    assert main(["colorize", str(gray_png), "--caption", CAPTION, "--model", "tiny", "--out", str(out),
                 "--preset", "smoke", "--seed", "3"]) == 0
    first = json.loads((out / "result.json").read_text())
    v1_master = _sha256(out / "versions" / "v0001" / "master.tif")

    assert main(["recolor", str(out), "--color-map", '{"dog": "red", "bench": "green"}', "--alpha", "0.9"]) == 0
    second = json.loads((out / "result.json").read_text())
    assert second["version"] == 2 and second["finetune_steps_run"] == 0 and second["status"] == "done"
    # People read the caption with the colours; the model was given c' with colours in the identifier slots.
    assert second["target_prompt"] == "a red dog sitting on a green wooden bench" and second["alpha"] == 0.9
    assert second["model_prompt"] == "a red dog sitting on a wooden green bench"
    assert second["prompt_alignment"] == "color_map" and second["prompt_warning"] is None
    assert second["previous_version"] == 1
    # The previous version is kept, byte for byte, with its record.
    assert _sha256(out / "versions" / "v0001" / "master.tif") == v1_master
    assert json.loads((out / "versions" / "v0001.json").read_text()) == first
    assert (out / "versions" / "v0002" / "master.tif").exists()
    # The render ran from the stored state alone: none of the fit's stages ran (its speed is the bench's to show).
    assert {"stage1", "align", "stage2"} <= set(first["seconds"])
    assert not {"stage1", "align", "stage2"} & set(second["seconds"]) and "render" in second["seconds"]
    assert "SMOKE RUN" in capsys.readouterr().err


def test_colour_photograph_is_skipped_as_not_grayscale(models, smoke, tmp_path):
    ys, xs = np.mgrid[0:64, 0:64]
    colour = np.stack([xs * 4, ys * 4, 255 - xs * 2], axis=-1).astype(np.uint8)
    path = tmp_path / "colour.png"
    Image.fromarray(colour).save(path)
    [record] = colorize_item(models, ItemRequest(item_id="c", source_uri=str(path), caption=CAPTION), str(tmp_path / "out"), smoke)
    assert record["status"] == "not_grayscale" and record["error_class"] == "not_grayscale"
    assert not (tmp_path / "out" / "versions").exists()


def test_truncated_image_fails_with_one_line_naming_the_file(tmp_path, gray_png, cache_dir):
    broken = tmp_path / "broken.png"
    broken.write_bytes(gray_png.read_bytes()[:200])
    completed = subprocess.run(
        [sys.executable, "-m", "diffcolor", "colorize", str(broken), "--caption", CAPTION, "--model", "tiny",
         "--out", str(tmp_path / "out"), "--preset", "smoke"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    [line] = [l for l in completed.stderr.splitlines() if l.startswith("diffcolor: error:")]
    assert "broken.png" in line
    record = json.loads((tmp_path / "out" / "result.json").read_text())
    assert record["status"] == "failed" and record["error_class"] == "bad_image"


def test_colour_map_word_not_in_caption_is_refused_before_any_fit(models, smoke, tmp_path, gray_png):
    from diffcolor.common.errors import PromptError

    request = ItemRequest(item_id="b", source_uri=str(gray_png), caption=CAPTION, color_map={"horse": "brown"})
    with pytest.raises(PromptError, match="'horse'"):
        colorize_item(models, request, str(tmp_path / "out"), smoke)
    assert not (tmp_path / "out" / "state").exists()
