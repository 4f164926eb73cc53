"""Every loop checkpoints every K steps and a resumed fit ends bit-identical."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tifffile
import torch
from conftest import WorkerKilled, gray_scene, killed_at

from diffcolor.archive import storage
from diffcolor.archive.items import CheckpointFolder
from diffcolor.common.captions import rewrite_caption
from diffcolor.common.items import ItemRequest
from diffcolor.method.stage1 import fit_color_prior
from diffcolor.method.stage2 import fit_in_context
from diffcolor.method.training import CheckpointPolicy
from diffcolor.pipeline import colorize_item

CAPTION = "a dog sitting on a wooden bench"


def _gray():
    return torch.from_numpy(gray_scene(64, 48)).float()[None, None]


def test_stage1_resumes_from_its_checkpoint_bit_identical(models, smoke, tmp_path):
    config = replace(smoke.stage1, steps=6, checkpoints=CheckpointPolicy(every=2, keep=2))
    reference = fit_color_prior(models, _gray(), CAPTION, config, seed=7)

    prefix = str(tmp_path / "checkpoints" / "stage1")
    kill = killed_at("stage1", 5)
    with pytest.raises(WorkerKilled):
        fit_color_prior(models, _gray(), CAPTION, config, seed=7, checkpoints=CheckpointFolder(prefix),
                        progress=lambda step, _: kill("stage1", step))
    # Checkpoints at steps 2 and 4 were written; 5 was lost with the "worker"; at most `keep` remain.
    names = [uri.rsplit("/", 1)[1] for uri in storage.list_files(prefix)]
    assert names == ["step-00000002.safetensors", "step-00000004.safetensors"]

    resumed = fit_color_prior(models, _gray(), CAPTION, config, seed=7, checkpoints=CheckpointFolder(prefix))
    assert resumed.loop.resumed_from == 4 and resumed.loop.steps_run == 2
    assert torch.equal(resumed.primary, reference.primary)
    assert resumed.loop.history == reference.loop.history
    assert not getattr(models.unet, "peft_config", {})


def test_checkpoints_of_another_fit_are_not_resumed(models, smoke, tmp_path):
    config = replace(smoke.stage1, steps=4, checkpoints=CheckpointPolicy(every=2, keep=2))
    checkpoints = CheckpointFolder(str(tmp_path / "ck"))
    fit_color_prior(models, _gray(), CAPTION, config, seed=1, checkpoints=checkpoints)
    other_seed = fit_color_prior(models, _gray(), CAPTION, config, seed=2, checkpoints=checkpoints)
    assert other_seed.loop.resumed_from is None and other_seed.loop.steps_run == 4


@pytest.mark.parametrize("loop", ["embedding", "finetune"])
def test_stage2_loops_resume_bit_identical(models, smoke, tmp_path, loop):
    config = replace(smoke.stage2, embed_steps=5, finetune_steps=5, checkpoints=CheckpointPolicy(every=2, keep=1))
    primary = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    rewritten = rewrite_caption(CAPTION)
    reference = fit_in_context(models, primary, rewritten, config, seed=3)

    prefix = str(tmp_path / "checkpoints")
    with pytest.raises(WorkerKilled):
        fit_in_context(models, primary, rewritten, config, seed=3, checkpoints=CheckpointFolder(prefix),
                       progress=killed_at(loop, 3))
    assert [u.rsplit("/", 1)[1] for u in storage.list_files(f"{prefix}/{loop}")] == ["step-00000002.safetensors"]
    resumed = fit_in_context(models, primary, rewritten, config, seed=3, checkpoints=CheckpointFolder(prefix))
    assert torch.equal(resumed.embedding, reference.embedding)
    assert resumed.adapter.keys() == reference.adapter.keys()
    assert all(torch.equal(resumed.adapter[k], reference.adapter[k]) for k in reference.adapter)
    resumed_loop = resumed.embed_loop if loop == "embedding" else resumed.finetune_loop
    assert resumed_loop.resumed_from == 2


def test_item_killed_mid_finetune_resumes_to_identical_pixels(models, smoke, tmp_path, gray_png):
    config = replace(smoke, stage2=replace(smoke.stage2, finetune_steps=6))
    request = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION, seed=11)
    reference = colorize_item(models, request, str(tmp_path / "reference"), config)[0]

    with pytest.raises(WorkerKilled):
        colorize_item(models, request, str(tmp_path / "item"), config, progress=killed_at("finetune", 3))
    assert not (tmp_path / "item" / "result.json").exists(), "an interrupted item must not look done"
    resumed = colorize_item(models, request, str(tmp_path / "item"), config)[0]

    # Stage 1 and the embedding were restored, only the rest of the fine-tune ran.
    assert resumed["finetune_steps_run"] == 6 - 2
    assert resumed["output_sha256"]["state"] == reference["output_sha256"]["state"]
    assert np.array_equal(tifffile.imread(resumed["outputs"]["master"]), tifffile.imread(reference["outputs"]["master"]))
    assert storage.list_files(str(tmp_path / "item" / "checkpoints" / "finetune")) == []


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_item_on_the_cuda_fast_path_options_resumes_bit_identical(bf16_models, smoke, tmp_path, gray_png, mode):
    """The options CUDA turns on by default, forced on a CPU: frozen weights stored in bf16, bf16 autocast,
    fused AdamW, channels_last.

    The reference is the first item its process computes (convolutions still in
    the layout they were loaded in); the resumed run finds them in channels_last
    already and restores contiguous checkpoints into channels_last parameters
    (``full``). Both must give the same bits.
    """
    from diffcolor.method.performance import PerformanceConfig, apply_memory_format

    fast = PerformanceConfig(autocast="bf16", fused_optimizer=True, channels_last=True)
    config = replace(
        smoke,
        stage1=replace(smoke.stage1, performance=fast, adapter=replace(smoke.stage1.adapter, mode=mode)),
        stage2=replace(smoke.stage2, performance=fast, finetune_steps=6, adapter=replace(smoke.stage2.adapter, mode=mode)),
        render=replace(smoke.render, autocast="bf16", channels_last=True),
    )
    request = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION, seed=5,
                          color_map={"bench": "black"})  # a render too: the adapter loaded into the fast layout
    models = bf16_models
    loaded_layout = PerformanceConfig(channels_last=False)
    apply_memory_format([models.unet, models.vae], loaded_layout, models.device)
    try:
        reference = colorize_item(models, request, str(tmp_path / "reference"), config)[0]
        assert reference["kind"] == "render" and reference["status"] == "done"
        assert models.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        with pytest.raises(WorkerKilled):
            colorize_item(models, request, str(tmp_path / "item"), config, progress=killed_at("finetune", 3))
        resumed = colorize_item(models, request, str(tmp_path / "item"), config)[0]
    finally:
        apply_memory_format([models.unet, models.vae], loaded_layout, models.device)

    assert resumed["finetune_steps_run"] == 6 - 2
    assert resumed["output_sha256"]["state"] == reference["output_sha256"]["state"]
    assert np.array_equal(tifffile.imread(resumed["outputs"]["master"]), tifffile.imread(reference["outputs"]["master"]))
