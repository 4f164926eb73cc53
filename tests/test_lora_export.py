"""An item's colour state used from diffusers: its LoRA file, its manifest, and the same render.

The tiny bundle is loaded twice: by DiffColor (the ``models`` fixture) and by
diffusers' own ``StableDiffusionImg2ImgPipeline.from_pretrained``, which then
loads the state's LoRA with ``load_lora_weights``. On a CPU in fp32 both run
the same operations in the same order, so the UNet outputs, final latents and
decoded renders are expected to agree to the bit (measured: 0.0 everywhere);
the tests allow ``TOLERANCE`` for BLAS builds that order sums differently, and
check that the adapter moves every compared output by far more than that, so
a LoRA that did not load, or loaded with the wrong scale, fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid

import numpy as np
import pytest
import torch
from conftest import gray_scene
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from diffcolor.archive import storage
from diffcolor.archive.items import ItemLayout
from diffcolor.archive.states import (
    lora_manifest,
    publish_state,
    read_state,
    read_state_lora,
)
from diffcolor.common.errors import StateError
from diffcolor.common.items import ItemRequest
from diffcolor.common.tensorfiles import DESCRIPTION_KEY, read_description, read_header
from diffcolor.method.diffusion import (
    build_sampling_scheduler,
    encode_latent,
    encode_prompts,
    sample_from,
)
from diffcolor.method.presets import apply_overrides
from diffcolor.method.render import render_target
from diffcolor.method.state import (
    FULL_LAYOUT,
    LORA_LAYOUT,
    LORA_PATH,
    diffusers_lora_bytes,
    export_state,
    state_from_bytes,
    state_to_bytes,
)
from diffcolor.method.training import (
    AdapterConfig,
    load_trained_unet,
    peft_lora_key,
    phase_generator,
)
from diffcolor.pipeline import colorize_item

CAPTION = "a dog sitting on a wooden bench"
TARGET = "a red dog sitting on a wooden bench"
# Largest absolute difference allowed between DiffColor's and diffusers' outputs (UNet noise predictions,
# latents of magnitude ~5, decoded pixels in [0, 1]); measured on CPU fp32: 0.0.
TOLERANCE = 1e-5
# Every compared output must move by at least this much with the adapter, so the comparison can fail.
DISCRIMINATION = 100 * TOLERANCE


def _colorize(models, config, folder) -> ItemLayout:
    path = folder / "bench.png"
    Image.fromarray(np.round(gray_scene(72, 96) * 255).astype(np.uint8), mode="L").save(path)
    out = str(folder / "item")
    colorize_item(models, ItemRequest(item_id="bench", source_uri=str(path), caption=CAPTION), out, config)
    return ItemLayout(out)


@pytest.fixture(scope="module")
def item(models, smoke, tmp_path_factory) -> ItemLayout:
    """One smoke item colourised with the preset's adapter (alpha = rank)."""
    return _colorize(models, smoke, tmp_path_factory.mktemp("lora-item"))


@pytest.fixture(scope="module")
def item_alpha16(models, smoke, tmp_path_factory) -> ItemLayout:
    """One smoke item colourised with LoRA alpha 16 at rank 8 (scale 2)."""
    config = apply_overrides(smoke, {"stage2.adapter.alpha": 16.0})
    assert config.stage2.adapter.rank == 8
    return _colorize(models, config, tmp_path_factory.mktemp("lora-item-alpha16"))


def _diffusers_pipeline(models, lora):
    """diffusers' img2img pipeline of the tiny bundle with DiffColor's DDIM sampler and ``lora`` loaded."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffcolor.method.tiny import tiny_bundle_folder

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_bundle_folder()), safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.scheduler = build_sampling_scheduler(models.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora)
    return pipe


def _unet_inputs(models, state):
    generator = torch.Generator().manual_seed(7)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, state.embedding.shape[-1], generator=generator)
    return latent, torch.tensor([900, 300]), context


@torch.no_grad()
def _compare_unets(models, state, pipe) -> tuple[float, float]:
    """Max |DiffColor's adapted UNet - diffusers' LoRA UNet| and max |adapted - base| on the same inputs."""
    latent, timesteps, context = _unet_inputs(models, state)
    base = models.unet(latent, timesteps, encoder_hidden_states=context).sample
    trainable = load_trained_unet(models.unet, state.adapter_config, state.adapter, name="test_lora_export")
    try:
        ours = trainable.unet(latent, timesteps, encoder_hidden_states=context).sample
    finally:
        trainable.release()
    theirs = pipe.unet(latent, timesteps, encoder_hidden_states=context).sample
    return float((ours - theirs).abs().max()), float((ours - base).abs().max())


def _render_settings(state):
    render = state.config["render"]
    return dict(strength=render["strength"], num_inference_steps=render["steps"], guidance_scale=render["guidance"])


def _item_state(layout: ItemLayout):
    return state_from_bytes(read_state(layout.state), layout.state_object)


# ---------------------------------------------------------------------------
# The LoRA file and the manifest of a colourised item.


def test_colourised_item_has_a_diffusers_lora_beside_its_state_named_with_its_sha256(models, item):
    description = json.loads(storage.read_bytes(storage.join(item.state, "state.json")))
    manifest = description["manifest"]
    assert manifest["base_model"] == {"id": "tiny", "hash": models.model_hash}
    adapter = manifest["adapter"]
    assert adapter["layout"] == LORA_LAYOUT and adapter["path"] == LORA_PATH
    assert (adapter["rank"], adapter["alpha"], adapter["targets"]) == (8, 8.0, ["to_q", "to_k", "to_v", "to_out.0"])
    lora = storage.read_bytes(storage.join(item.state, "lora", "pytorch_lora_weights.safetensors"))
    assert hashlib.sha256(lora).hexdigest() == adapter["sha256"] and len(lora) == adapter["bytes"]
    # The state object (the commit point) carries the same manifest as its readable copy.
    assert read_description(read_state(item.state))["manifest"] == manifest
    usage = manifest["usage"]
    assert usage["embedding"] == "embedding" and usage["alpha"] == 0.7 and usage["ddim_eta"] == 0.0 and usage["denoising_steps"] == 3
    # The reader checks the LoRA against its state and finds it.
    uri, checked = read_state_lora(item.state)
    assert uri == storage.join(item.state, LORA_PATH) and checked == lora
    assert _item_state(item).base_model_id == "tiny"


def test_lora_file_is_what_diffusers_save_lora_weights_writes(item, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    state = _item_state(item)
    config = state.adapter_config
    StableDiffusionImg2ImgPipeline.save_lora_weights(
        tmp_path, unet_lora_layers={peft_lora_key(key): value for key, value in state.adapter.items()},
        unet_lora_adapter_metadata={"r": config.rank, "lora_alpha": config.alpha,
                                    "target_modules": sorted(config.targets)},
    )
    theirs = (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()
    ours = read_state_lora(item.state)[1]
    # The same header (tensor names, shapes, offsets; metadata) and the same tensor bytes. Only the order of the
    # metadata keys may differ: safetensors orders them at random, ours are sorted so the sha256 is stable.
    assert _header_and_tensor_bytes(ours) == _header_and_tensor_bytes(theirs)
    assert all(key.startswith("unet.") and (".lora_A.weight" in key or ".lora_B.weight" in key)
               for key in load_safetensors(theirs))
    assert {diffusers_lora_bytes(state) for _ in range(8)} == {ours}


def _header_and_tensor_bytes(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return read_header(data), data[8 + length:]


# ---------------------------------------------------------------------------
# diffusers with the LoRA reproduces DiffColor's render.


def test_diffusers_with_the_lora_reproduces_the_unet_and_the_render(models, item):
    state = _item_state(item)
    pipe = _diffusers_pipeline(models, storage.join(item.state, "lora"))

    # 1. The UNet: DiffColor's load_trained_unet and diffusers' load_lora_weights on the same inputs.
    unet_difference, adapter_effect = _compare_unets(models, state, pipe)
    assert unet_difference <= TOLERANCE < DISCRIMINATION < adapter_effect

    # 2. The final latent of the render path (render_target's steps: interpolate, encode the gray, sample)
    #    and diffusers' img2img from the same start latent with the same generator state.
    alpha = state.config["render"]["alpha"]
    embedding = alpha * encode_prompts(models, [TARGET]) + (1 - alpha) * state.embedding
    start = encode_latent(models, state.gray.expand(-1, 3, -1, -1))
    settings = _render_settings(state)
    trainable = load_trained_unet(models.unet, state.adapter_config, state.adapter, name="test_lora_export")
    try:
        ours = sample_from(models, trainable.unet, start, strength=settings["strength"],
                           steps=settings["num_inference_steps"], guidance=settings["guidance_scale"],
                           condition=embedding, generator=phase_generator(state.seed, f"render:{TARGET}"))
    finally:
        trainable.release()
    base = sample_from(models, models.unet, start, strength=settings["strength"], steps=settings["num_inference_steps"],
                       guidance=settings["guidance_scale"], condition=embedding,
                       generator=phase_generator(state.seed, f"render:{TARGET}"))
    theirs = pipe(prompt_embeds=embedding, negative_prompt_embeds=encode_prompts(models, [""]), image=start,
                  generator=phase_generator(state.seed, f"render:{TARGET}"), output_type="latent", **settings).images
    assert float((ours - theirs).abs().max()) <= TOLERANCE < DISCRIMINATION < float((ours - base).abs().max())

    # 3. The whole render, diffusers side from the state file alone (as the README shows): the embedding and
    #    gray image from the state object, prompts encoded and the gray encoded by the pipeline's own models.
    tensors = load_file(storage.join(item.state, "color-state.safetensors"))
    with torch.no_grad():
        target, negative = pipe.encode_prompt(TARGET, "cpu", 1, True, negative_prompt="")
        gray = tensors["gray"].expand(-1, 3, -1, -1)
        latent = pipe.vae.encode(gray * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    rgb = pipe(prompt_embeds=alpha * target + (1 - alpha) * tensors["embedding"], negative_prompt_embeds=negative,
               image=latent, generator=phase_generator(state.seed, f"render:{TARGET}"), output_type="pt",
               **settings).images
    rendered = render_target(models, state, TARGET, _stored_render_config(state), seed=state.seed)
    assert rgb.shape == rendered.rgb.shape
    assert float((rendered.rgb - rgb).abs().max()) <= TOLERANCE


def _stored_render_config(state):
    from diffcolor.pipeline import stored_config

    return stored_config(state).render


def test_alpha_other_than_rank_reproduces_through_the_lora_metadata(models, item_alpha16):
    state = _item_state(item_alpha16)
    assert (state.adapter_config.rank, state.adapter_config.alpha) == (8, 16.0)
    lora_folder = storage.join(item_alpha16.state, "lora")
    pipe = _diffusers_pipeline(models, lora_folder)
    unet_difference, adapter_effect = _compare_unets(models, state, pipe)
    assert unet_difference <= TOLERANCE < DISCRIMINATION < adapter_effect

    # Without the metadata diffusers would take alpha = rank (scale 1, not 2): half the adapter's effect is lost,
    # which this comparison sees.
    pipe.unload_lora_weights()
    pipe.load_lora_weights(load_safetensors(read_state_lora(item_alpha16.state)[1]))
    wrong_scale, _ = _compare_unets(models, state, pipe)
    assert wrong_scale > DISCRIMINATION


# ---------------------------------------------------------------------------
# The archive: the LoRA first, the state as the commit point, a mismatch detected.


def _with_other_adapter(state):
    """The state as another fit would have made it: other LoRA tensors, hence another LoRA file."""
    return dataclasses.replace(state, adapter={key: value * 2 for key, value in state.adapter.items()})


def test_publish_writes_the_lora_before_the_state_and_the_state_before_its_copy(item, monkeypatch):
    state_bytes, lora = export_state(_item_state(item))
    folder = f"memory://lora-export-{uuid.uuid4().hex}/state"
    written = []
    write_bytes = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (written.append(uri), write_bytes(uri, data)))
    publish_state(folder, state_bytes, lora=lora)
    assert written == [storage.join(folder, LORA_PATH), storage.join(folder, "color-state.safetensors"),
                       storage.join(folder, "state.json")]
    assert read_state_lora(folder) == (storage.join(folder, LORA_PATH), lora)


def test_a_refit_stopped_between_its_lora_and_its_state_leaves_a_lora_the_reader_refuses(item, tmp_path, monkeypatch):
    folder = str(tmp_path / "state")
    old_state, old_lora = export_state(_item_state(item))
    publish_state(folder, old_state, lora=old_lora)
    new_state, new_lora = export_state(_with_other_adapter(_item_state(item)))
    assert new_lora != old_lora

    # The worker dies once its LoRA is published, before its state is.
    write_bytes = storage.write_bytes

    def dies_at_the_state(uri, data):
        if uri.endswith("color-state.safetensors"):
            raise KeyboardInterrupt("worker killed")
        write_bytes(uri, data)

    monkeypatch.setattr(storage, "write_bytes", dies_at_the_state)
    with pytest.raises(KeyboardInterrupt):
        publish_state(folder, new_state, lora=new_lora)
    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    assert read_state(folder) == old_state  # the old state stays committed, beside the new LoRA
    with pytest.raises(StateError, match="not this state's LoRA"):
        read_state_lora(folder)

    # The retry publishes both; the reader accepts them again.
    publish_state(folder, new_state, lora=new_lora)
    assert read_state_lora(folder)[1] == new_lora


def test_a_lora_that_is_not_the_states_is_refused_before_anything_is_written(item, tmp_path):
    folder = tmp_path / "state"
    state_bytes, _ = export_state(_item_state(item))
    _, other_lora = export_state(_with_other_adapter(_item_state(item)))
    with pytest.raises(StateError, match="its state names"):
        publish_state(str(folder), state_bytes, lora=other_lora)
    assert not folder.exists()


def test_a_missing_lora_is_named(item, tmp_path):
    folder = str(tmp_path / "state")
    state_bytes, lora = export_state(_item_state(item))
    publish_state(folder, state_bytes, lora=lora)
    storage.remove(storage.join(folder, LORA_PATH))
    with pytest.raises(StateError, match="which is missing"):
        read_state_lora(folder)


def test_a_state_naming_a_lora_is_never_published_without_it(item, tmp_path):
    folder = tmp_path / "state"
    state_bytes, _ = export_state(_item_state(item))
    with pytest.raises(StateError, match="which was not given to publish"):
        publish_state(str(folder), state_bytes)
    assert not folder.exists()


def test_a_reused_state_gets_its_missing_or_foreign_lora_back(models, smoke, tmp_path):
    layout = _colorize(models, smoke, tmp_path)
    lora_uri, lora = read_state_lora(layout.state)
    source = str(tmp_path / "bench.png")
    damages = (lambda: storage.remove(lora_uri), lambda: storage.write_bytes(lora_uri, b"not this state's"))
    for damage, target in zip(damages, (TARGET, "a brown dog sitting on a wooden bench")):
        damage()
        with pytest.raises(StateError):
            read_state_lora(layout.state)
        # A new target reuses the stored state (no fine-tune), which writes its LoRA again, byte for byte.
        records = colorize_item(models, ItemRequest(item_id="bench", source_uri=source, caption=CAPTION,
                                                    targets=(target,)), layout.prefix, smoke)
        assert records[-1]["status"] == "done" and records[-1]["finetune_steps_run"] == 0
        assert read_state_lora(layout.state) == (lora_uri, lora)


# ---------------------------------------------------------------------------
# Full fine-tunes and states made before the manifest.


def _full_state(state):
    """A full-fine-tune state (a few UNet tensors stand for the whole UNet: the format does not care)."""
    return dataclasses.replace(state, adapter_config=AdapterConfig(mode="full"),
                               adapter={"conv_in.weight": torch.ones(4, 4, 3, 3), "conv_in.bias": torch.zeros(4)})


def test_full_fine_tune_state_says_full_unet_and_writes_no_lora(item, tmp_path):
    full = _full_state(_item_state(item))
    assert diffusers_lora_bytes(full) is None
    adapter = full.describe()["manifest"]["adapter"]
    assert adapter["layout"] == FULL_LAYOUT and adapter["path"] is None and adapter["sha256"] is None
    state_bytes, lora = export_state(full)
    assert lora is None and state_bytes == state_to_bytes(full)

    # Published over a LoRA state, it leaves no LoRA behind that someone could load as this item's.
    folder = str(tmp_path / "state")
    publish_state(folder, *export_state(_item_state(item)))
    assert (tmp_path / "state" / LORA_PATH).exists()
    publish_state(folder, state_bytes, lora=lora)
    assert not (tmp_path / "state" / LORA_PATH).exists()
    assert read_state_lora(folder) is None
    assert state_from_bytes(read_state(folder), folder).adapter_config.mode == "full"


def test_state_made_before_the_manifest_still_loads_and_has_no_lora(item, tmp_path):
    state = _item_state(item)
    description = state.describe()
    del description["manifest"]
    tensors = load_safetensors(read_state(item.state))
    old = save_safetensors(tensors, metadata={DESCRIPTION_KEY: json.dumps(description)})

    loaded = state_from_bytes(old, "old state")
    assert loaded.base_model_id is None and loaded.adapter_config == state.adapter_config
    assert torch.equal(loaded.embedding, state.embedding) and loaded.adapter.keys() == state.adapter.keys()
    assert lora_manifest(read_description(old)) is None
    folder = str(tmp_path / "state")
    publish_state(folder, old)
    assert read_state_lora(folder) is None
    # Re-exported, the old state gains its manifest and LoRA (the base model's id stays unknown).
    again, lora = export_state(loaded)
    assert read_description(again)["manifest"]["base_model"] == {"id": None, "hash": state.model_hash}
    assert lora == diffusers_lora_bytes(state)
