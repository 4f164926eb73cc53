"""The fast path on a real GPU (marked `gpu`, excluded by default: `pytest -m gpu` on a CUDA host).

The tests run on the device named by ``DIFFCOLOR_TEST_DEVICE`` (default
``cuda``) with the CUDA defaults spelt out (frozen weights stored in bf16,
bf16 autocast, fused AdamW, channels_last), so that
``DIFFCOLOR_TEST_DEVICE=cpu pytest -m gpu`` checks the tests themselves on a
machine without a GPU; what only CUDA can show (the "auto" defaults, peak
device memory) is asserted on CUDA only. A CPU reference in fp32 is the
standard every device result is held to, with the fast path's tolerances of
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import tifffile
import torch
from conftest import WorkerKilled, killed_at

from diffcolor.common.items import ItemRequest
from diffcolor.method.performance import PerformanceConfig
from diffcolor.pipeline import colorize_item

pytestmark = pytest.mark.gpu

CAPTION = "a dog sitting on a wooden bench"
FAST = PerformanceConfig(autocast="bf16", fused_optimizer=True, channels_last=True)  # the CUDA defaults, spelt out
FP32 = PerformanceConfig(autocast="off")


@pytest.fixture(scope="module")
def device() -> torch.device:
    name = os.environ.get("DIFFCOLOR_TEST_DEVICE", "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device (DIFFCOLOR_TEST_DEVICE=cpu checks these tests on a CPU)")
    return torch.device(name)


@pytest.fixture(scope="module")
def fast_models(cache_dir, device):
    from diffcolor.method.model_names import load_named_models

    return load_named_models("tiny", device=device, weight_dtype="bf16")


def _config(smoke, performance: PerformanceConfig, render_autocast: str, **stage2):
    return replace(smoke, stage1=replace(smoke.stage1, performance=performance),
                   stage2=replace(smoke.stage2, performance=performance, **stage2),
                   render=replace(smoke.render, autocast=render_autocast))


def _master(record) -> np.ndarray:
    return tifffile.imread(record["outputs"]["master"]).astype(np.float64) / 255.0


def test_auto_resolves_to_the_fast_path_on_cuda(cache_dir, device):
    if device.type != "cuda":
        pytest.skip("what 'auto' resolves to on CUDA")
    from diffcolor.method.performance import autocast_dtype, make_adamw
    from diffcolor.method.model_names import load_named_models

    models = load_named_models("tiny", device=device)  # every option left to its default
    assert models.weight_dtype == torch.bfloat16
    assert models.unet.conv_in.weight.dtype == torch.bfloat16 and models.unet.conv_in.weight.is_cuda
    assert autocast_dtype(PerformanceConfig().autocast, device, models.weight_dtype) == torch.bfloat16
    parameter = torch.nn.Parameter(torch.zeros(4, device=device))
    assert make_adamw([parameter], lr=1e-4, config=PerformanceConfig(), device=device).defaults["fused"] is True


def test_an_item_and_a_render_on_the_device_match_fp32_on_the_cpu(models, fast_models, smoke, gray_png, tmp_path,
                                                                    device):
    """The whole item (stage 1, alignment, stage 2, CLIP score) on the device's fast path against the fp32
    path on the CPU, and a render of one stored colour state on each: within the fast path's tolerances."""
    from diffcolor.method.render import RenderConfig
    from diffcolor.pipeline import recolor_item

    request = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION, seed=4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    [fast] = colorize_item(fast_models, request, str(tmp_path / "device"), _config(smoke, FAST, "bf16"))
    [reference] = colorize_item(models, request, str(tmp_path / "cpu"), _config(smoke, FP32, "off"))
    assert fast["status"] == reference["status"] == "done"
    assert fast["weight_dtype"] == "bfloat16" and fast["max_delta_l"] <= 1.0
    difference = np.abs(_master(fast) - _master(reference))
    assert difference.mean() <= 0.02 and difference.max() <= 0.25, (difference.mean(), difference.max())
    assert abs(fast["clip_score"] - reference["clip_score"]) <= 1.0
    if device.type == "cuda":
        assert 0 < fast["peak_memory_bytes"] <= torch.cuda.max_memory_allocated(device)

    # One stored state (the CPU's), rendered on the device and on the CPU: the same new version, nearly.
    state = str(tmp_path / "cpu")
    on_device = recolor_item(fast_models, state, color_map={"bench": "black"}, render=replace(smoke.render, autocast="bf16"))
    on_cpu = recolor_item(models, state, color_map={"bench": "black"}, render=replace(smoke.render, autocast="off"))
    assert isinstance(smoke.render, RenderConfig) and on_device["finetune_steps_run"] == 0
    assert (on_device["version"], on_cpu["version"]) == (2, 3) and on_device["target_prompt"] == on_cpu["target_prompt"]
    difference = np.abs(_master(on_device) - _master(on_cpu))
    assert on_device["max_delta_l"] <= 1.0
    # A render's full-resolution master: a few chroma values move more than the working-resolution render
    # does (docs/PERFORMANCE.md, accuracy), so the bound on the largest ones is a share, not a maximum.
    share = float((difference > 0.25).mean())
    assert difference.mean() <= 0.02 and share <= 0.01, (difference.mean(), difference.max(), share)


def test_an_item_killed_mid_finetune_on_the_device_resumes_from_its_checkpoint(fast_models, smoke, gray_png,
                                                                              tmp_path, device):
    """Resume on the device: only the rest of the fine-tune runs, and the result is the uninterrupted one
    (bit-identical on a CPU; on a GPU within the fast path's tolerances, as some CUDA kernels reduce in a
    varying order)."""
    config = _config(smoke, FAST, "bf16", finetune_steps=6)
    request = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION, seed=11)
    reference = colorize_item(fast_models, request, str(tmp_path / "reference"), config)[0]
    with pytest.raises(WorkerKilled):
        colorize_item(fast_models, request, str(tmp_path / "item"), config, progress=killed_at("finetune", 3))
    assert not (tmp_path / "item" / "result.json").exists()
    resumed = colorize_item(fast_models, request, str(tmp_path / "item"), config)[0]
    assert resumed["status"] == "done" and resumed["finetune_steps_run"] == 6 - 2
    difference = np.abs(_master(resumed) - _master(reference))
    if device.type == "cpu":
        assert difference.max() == 0.0
    assert difference.mean() <= 0.02 and difference.max() <= 0.25, (difference.mean(), difference.max())


def test_two_workers_share_the_device_in_a_collection_run(prefect_server, tmp_path, device):
    """The collection flow with two pool workers on one device: each item on its own worker, both on it."""
    from test_flows import _collection, _diffcolor, _run_dirs

    from diffcolor.archive.results import read_results

    manifest, out = _collection(tmp_path, count=2), tmp_path / "out"
    completed = _diffcolor("run", str(manifest), "--out", str(out), "--model", "tiny", "--preset", "smoke",
                           "--device", device.type, "--workers-per-device", "2")
    assert completed.returncode == 0, completed.stderr
    rows = read_results(str(_run_dirs(out)[0] / "results.parquet")).to_pylist()
    records = [json.loads(row["record_json"]) for row in rows]
    assert [r["status"] for r in records] == ["done", "done"]
    assert len({r["placement"]["pid"] for r in records}) == 2
    assert {r["placement"]["device"] for r in records} == {device.type}
    assert {r["placement"]["workers_on_device"] for r in records} == {2}
    if device.type == "cuda":
        assert len({r["placement"]["cuda_visible_devices"] for r in records}) == 1  # the same GPU
        assert {r["weight_dtype"] for r in records} == {"bfloat16"}  # the default storage on CUDA
        assert all(r["peak_memory_bytes"] > 0 for r in records)
