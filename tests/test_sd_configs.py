"""Ready for real weights: the published SD 1.5, 2.1-base and 2.1 configs drive the schedulers and the bundles.

The fixtures in ``fixtures/sd_configs/`` are the published configs, byte for
byte (SOURCES.md names where each came from). The schedulers the method builds
from them never clip a predicted latent and keep the published prediction type;
a reduced random bundle built from them keeps their structure and runs one
smoke item end to end, v-prediction included.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import gray_scene
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from skimage.color import rgb2lab
from transformers import CLIPTokenizer

from diffcolor.common.items import ItemRequest
from diffcolor.method.diffusion import (
    build_noise_scheduler,
    build_sampling_scheduler,
    sampling_scheduler,
    scheduler_settings,
    tokenize,
)
from diffcolor.method.models import TINY_MARKER, load_models
from diffcolor.pipeline import colorize_item
from diffcolor.tools.reduced import WIDTH_DIVISOR, main, write_reduced_bundle

CONFIGS = Path(__file__).parent / "fixtures" / "sd_configs"
PREDICTION = {"sd15": "epsilon", "sd21-base": "epsilon", "sd21": "v_prediction"}
NAMES = sorted(PREDICTION)
CAPTION = "a dog sitting on a wooden bench"

# Structural settings the reduced bundle keeps exactly (the module docstring of diffcolor.tools.reduced).
UNET_KEPT = ("down_block_types", "up_block_types", "mid_block_type", "attention_head_dim", "use_linear_projection",
             "upcast_attention", "only_cross_attention", "dual_cross_attention", "in_channels", "out_channels",
             "sample_size", "act_fn", "flip_sin_to_cos", "freq_shift", "downsample_padding", "norm_eps")
VAE_KEPT = ("down_block_types", "up_block_types", "in_channels", "out_channels", "latent_channels", "scaling_factor",
            "sample_size", "act_fn")
TEXT_KEPT = ("hidden_act", "num_attention_heads", "max_position_embeddings", "layer_norm_eps")


def _published(name: str, file: str) -> dict:
    return json.loads((CONFIGS / name / file).read_text(encoding="utf-8"))


def _default(model_class, key: str):
    """What diffusers uses for a key a published config leaves out (its constructor's default)."""
    return inspect.signature(model_class.__init__).parameters[key].default


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Reduced bundles of the three published configs, each written once for the module (on first use)."""
    root = tmp_path_factory.mktemp("reduced")
    written: dict[str, Path] = {}

    def bundle(name: str) -> Path:
        if name not in written:
            written[name] = write_reduced_bundle(CONFIGS / name, root / name)
        return written[name]

    return bundle


# Schedulers from the published configs.


@pytest.mark.parametrize("name", NAMES)
def test_published_scheduler_configs_need_no_correction_and_keep_their_prediction_type(name):
    raw = _published(name, "scheduler/scheduler_config.json")
    settings, corrections = scheduler_settings(raw)
    assert corrections == []
    assert settings["clip_sample"] is False and settings["steps_offset"] == 1
    assert settings["prediction_type"] == PREDICTION[name]
    for scheduler in (build_sampling_scheduler(raw), build_noise_scheduler(raw)):
        assert scheduler.config.clip_sample is False and scheduler.config.steps_offset == 1
        assert scheduler.config.prediction_type == PREDICTION[name]
    assert isinstance(build_sampling_scheduler(raw), DDIMScheduler)


def _x0_of_a_ddim_step(scheduler, clean: torch.Tensor) -> torch.Tensor:
    """The x0 a DDIM step reports when the model predicts exactly the noise that was added to ``clean``."""
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    alpha = scheduler.alphas_cumprod[t]
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
    if scheduler.config.prediction_type == "v_prediction":
        output = alpha.sqrt() * noise - (1 - alpha).sqrt() * clean
    else:
        output = noise
    return scheduler.step(output, t, noisy).pred_original_sample


@pytest.mark.parametrize("name", NAMES)
def test_a_ddim_step_keeps_a_predicted_latent_outside_minus_one_to_one(name):
    raw = _published(name, "scheduler/scheduler_config.json")
    clean = torch.linspace(-3.0, 3.0, 4 * 8 * 8).reshape(1, 4, 8, 8)  # SD latents often pass |1|
    assert torch.allclose(_x0_of_a_ddim_step(build_sampling_scheduler(raw), clean), clean, atol=1e-4)
    # The same check fails for a scheduler that clips: it would catch a method that let clip_sample through.
    clipping = DDIMScheduler.from_config({**scheduler_settings(raw)[0], "clip_sample": True})
    clipped = _x0_of_a_ddim_step(clipping, clean)
    assert not torch.allclose(clipped, clean, atol=1e-4) and clipped.abs().max() <= 1.0


def test_a_config_without_clip_sample_is_corrected():
    raw = _published("sd21", "scheduler/scheduler_config.json")
    del raw["clip_sample"]
    assert DDIMScheduler.from_config(raw).config.clip_sample is True  # diffusers' default: what would go wrong
    settings, corrections = scheduler_settings(raw)
    assert settings["clip_sample"] is False and any("clip_sample" in line for line in corrections)
    scheduler = build_sampling_scheduler(raw)
    assert scheduler.config.clip_sample is False and scheduler.config.prediction_type == "v_prediction"
    clean = torch.full((1, 4, 8, 8), 2.5)
    assert torch.allclose(_x0_of_a_ddim_step(scheduler, clean), clean, atol=1e-4)


# Reduced bundles keep the published structure.


@pytest.mark.parametrize("name", NAMES)
def test_reduced_unet_keeps_the_published_structure(bundles, name):
    published, reduced = _published(name, "unet/config.json"), json.loads((bundles(name) / "unet/config.json").read_text())
    for key in UNET_KEPT:
        assert reduced[key] == published.get(key, _default(UNet2DConditionModel, key)), key
    assert [c * WIDTH_DIVISOR for c in reduced["block_out_channels"]] == published["block_out_channels"]
    text = json.loads((bundles(name) / "text_encoder/config.json").read_text())
    assert reduced["cross_attention_dim"] == text["hidden_size"]
    assert published["cross_attention_dim"] == _published(name, "text_encoder/config.json")["hidden_size"]
    heads = reduced["attention_head_dim"]
    assert isinstance(heads, list) == (name != "sd15")  # per-block heads in SD 2.x, one count in SD 1.5
    assert reduced["use_linear_projection"] == (name != "sd15") and reduced["upcast_attention"] == (name == "sd21")


@pytest.mark.parametrize("name", NAMES)
def test_reduced_vae_text_encoder_tokenizer_and_scheduler_keep_the_published_settings(bundles, name):
    folder = bundles(name)
    vae, published_vae = json.loads((folder / "vae/config.json").read_text()), _published(name, "vae/config.json")
    for key in VAE_KEPT:
        assert vae[key] == published_vae.get(key, _default(AutoencoderKL, key)), key
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8 and vae["scaling_factor"] == 0.18215

    text, published_text = json.loads((folder / "text_encoder/config.json").read_text()), _published(
        name, "text_encoder/config.json")
    for key in TEXT_KEPT:
        assert text[key] == published_text[key], key
    assert text["hidden_size"] * WIDTH_DIVISOR == published_text["hidden_size"]
    assert text["hidden_act"] == ("quick_gelu" if name == "sd15" else "gelu") and text["max_position_embeddings"] == 77

    # The scheduler config is the published file itself.
    assert (folder / "scheduler/scheduler_config.json").read_bytes() == (
        CONFIGS / name / "scheduler/scheduler_config.json").read_bytes()
    assert (folder / TINY_MARKER).exists() and not list(folder.rglob("*.bin"))


@pytest.mark.parametrize("name", NAMES)
def test_reduced_tokenizer_has_the_special_tokens_transformers_reads_from_the_published_files(bundles, name, tmp_path):
    folder = bundles(name)
    ours = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    # The published tokenizer files beside the same vocabulary, read by transformers as it reads the hub's folder.
    for file in ("vocab.json", "merges.txt"):
        shutil.copy(folder / "tokenizer" / file, tmp_path / file)
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(CONFIGS / name / "tokenizer" / file, tmp_path / file)
    theirs = CLIPTokenizer.from_pretrained(tmp_path)
    for token in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, token) == getattr(theirs, token), token
    assert ours.pad_token == ("<|endoftext|>" if name == "sd15" else "!") and ours.model_max_length == 77


def test_the_command_line_writes_a_bundle_and_names_a_missing_config(tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(CONFIGS / "sd21", broken)
    (broken / "vae" / "config.json").unlink()
    assert main([str(broken), str(tmp_path / "out")]) == 2
    assert "has no vae/config.json" in capsys.readouterr().err


# One smoke item end to end through each reduced bundle.


@pytest.fixture
def recorded_prediction_types(monkeypatch):
    """The prediction types of every DDIM step and every v-target drawn while the test runs."""
    seen = {"ddim_step": set(), "velocity_targets": 0}
    step, velocity = DDIMScheduler.step, DDPMScheduler.get_velocity

    def recording_step(self, *args, **kwargs):
        seen["ddim_step"].add(self.config.prediction_type)
        return step(self, *args, **kwargs)

    def recording_velocity(self, *args, **kwargs):
        seen["velocity_targets"] += 1
        return velocity(self, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", recording_step)
    monkeypatch.setattr(DDPMScheduler, "get_velocity", recording_velocity)
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_reduced_bundle_loads_and_colourises_a_smoke_item_keeping_lightness(bundles, name, smoke, tmp_path,
                                                                            recorded_prediction_types):
    models = load_models(str(bundles(name)))
    assert models.random_weights and models.vae_scale_factor == 8
    assert models.scheduler_config.get("prediction_type", "epsilon") == PREDICTION[name]
    assert sampling_scheduler(models).config.prediction_type == PREDICTION[name]
    if name != "sd15":  # SD 2.x pads prompts with "!" (id 0 in CLIP's vocabulary and in ours)
        assert tokenize(models, [""])[0, 2:].eq(models.tokenizer.convert_tokens_to_ids("!")).all()

    source = tmp_path / "gray.png"
    gray = np.round(gray_scene(48, 64) * 255).astype(np.uint8)
    Image.fromarray(gray, mode="L").save(source)
    request = ItemRequest(item_id="bench", source_uri=str(source), caption=CAPTION, color_map={"dog": "brown"})
    [record] = colorize_item(models, request, str(tmp_path / "out"), smoke, preset="smoke")

    assert record["status"] == "done", record.get("error_message")
    assert all(Path(path).is_file() for path in record["outputs"].values()) and "master" in record["outputs"]
    master = tifffile.imread(record["outputs"]["master"])
    lightness = rgb2lab(master.astype(np.float64) / np.iinfo(master.dtype).max)[..., 0]
    source_lightness = rgb2lab(np.repeat((gray / 255.0)[..., None], 3, axis=-1))[..., 0]
    assert master.shape[:2] == gray.shape and np.abs(lightness - source_lightness).max() <= 1.0
    assert record["max_delta_l"] <= 1.0
    # The samplers and the training targets ran with the published prediction type: v for SD 2.1.
    assert recorded_prediction_types["ddim_step"] == {PREDICTION[name]}
    assert (recorded_prediction_types["velocity_targets"] > 0) == (PREDICTION[name] == "v_prediction")


@pytest.mark.parametrize("name", NAMES)
def test_the_doctor_passes_each_reduced_bundle_and_names_its_scheduler(bundles, name):
    from diffcolor.method.doctor import check_model, format_report

    report = check_model(str(bundles(name)), device="cpu", probe_memory=False)
    assert report.ok, format_report(report)
    scheduler = report.facts("scheduler")
    assert scheduler["prediction_type"] == PREDICTION[name] and scheduler["clip_sample"] is False
    assert "random weights: outputs will be labelled smoke runs" in format_report(report)


# Ready for real weights, part two: native size, step counts, prompt lengths, on each published config.

NATIVE_SIDE = {"sd15": 512, "sd21-base": 512, "sd21": 768}  # UNet sample_size (64, 64, 96) x the VAE factor 8


class _Fitted(Exception):
    """Raised in place of the fit: the pipeline got as far as stage 1 with this gray image."""


@pytest.mark.parametrize("name", NAMES)
def test_each_bundle_works_at_its_native_size_counts_steps_as_diffusers_and_refuses_cut_prompts(
        bundles, name, smoke, tmp_path, monkeypatch):
    from dataclasses import replace
    from types import SimpleNamespace

    from diffusers import StableDiffusionImg2ImgPipeline

    import diffcolor.pipeline as pipeline
    from diffcolor.common.captions import prompt_length_problems, rewrite_caption
    from diffcolor.method.diffusion import denoising_steps, sample_from
    from diffcolor.method.models import prompt_limit
    from diffcolor.method.presets import get_preset
    from diffcolor.method.doctor import check_model

    models = load_models(str(bundles(name)))
    # 1. The working size comes from the model: UNet sample_size x VAE factor; the doctor reports the same.
    assert models.native_side == NATIVE_SIDE[name] == _published(name, "unet/config.json")["sample_size"] * 8
    assert models.working_pixels(get_preset("default").model_pixels) == NATIVE_SIDE[name] ** 2
    assert models.working_pixels(smoke.model_pixels) == 64 * 64  # a preset that sets it wins
    consistency = check_model(str(bundles(name)), device="cpu", probe_memory=False, hashes=False).facts("consistency")
    assert consistency["native_side"] == NATIVE_SIDE[name]
    # ...and the pipeline resizes the gray image to it (aspect kept, sides multiples of 8) before stage 1.
    seen = {}

    def fitted(_models, gray, *args, **kwargs):
        seen["shape"] = tuple(gray.shape[-2:])
        raise _Fitted

    monkeypatch.setattr(pipeline, "fit_color_prior", fitted)
    source = tmp_path / "gray.png"
    Image.fromarray(np.round(gray_scene(48, 64) * 255).astype(np.uint8), mode="L").save(source)
    native = replace(smoke, model_pixels=None)
    with pytest.raises(_Fitted):
        colorize_item(models, ItemRequest(item_id="size", source_uri=str(source), caption=CAPTION), str(tmp_path / "o"),
                      native)
    height, width = seen["shape"]
    assert height % 8 == width % 8 == 0 and abs(height * width / NATIVE_SIDE[name] ** 2 - 1) < 0.03
    assert abs(width / height - 64 / 48) < 0.02

    # 2. Img2img step counts as diffusers' get_timesteps: the DDIM steps sample_from runs are diffusers' own.
    ran = []
    step = DDIMScheduler.step
    monkeypatch.setattr(DDIMScheduler, "step", lambda self, output, t, *a, **k: (ran.append(int(t)),
                                                                                  step(self, output, t, *a, **k))[1])
    latent = torch.zeros(1, 4, 4, 4)
    condition = torch.zeros(1, 77, models.text_encoder.config.hidden_size)
    for steps, strength in ((10, 0.75), (4, 0.6), (30, 0.29), (50, 0.8), (7, 1.0)):
        ran.clear()
        sample_from(models, models.unet, latent, strength=strength, steps=steps, guidance=1.0, condition=condition,
                    generator=torch.Generator().manual_seed(0))
        theirs = build_sampling_scheduler(models.scheduler_config)
        theirs.set_timesteps(steps)
        timesteps, count = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=theirs), steps,
                                                                         strength, "cpu")
        assert ran == [int(t) for t in timesteps] and denoising_steps(steps, strength) == count
    with pytest.raises(ValueError, match="run no denoising step"):
        denoising_steps(3, 0.3)

    # 3. Prompts: the bundle's tokenizer length, and a rewritten caption past it refused naming the lost words.
    limit = prompt_limit(models.tokenizer)
    assert limit.model_max_length == 77 and limit.limit == 75
    long_caption = ", ".join(["a dog near a tree and a house"] * 6) + ", and the sky"
    problems = dict(prompt_length_problems(limit, rewrite_caption(long_caption), {"sky": "blue"}))
    assert "'blue' (for 'sky')" in problems["color_map"] and "would be cut off" in problems["caption"]


@pytest.mark.slow
def test_the_sd21_bundle_colourises_a_smoke_item_at_its_native_768(bundles, smoke, tmp_path):
    from dataclasses import replace

    models = load_models(str(bundles("sd21")))
    source = tmp_path / "gray.png"
    gray = np.round(gray_scene(48, 64) * 255).astype(np.uint8)
    Image.fromarray(gray, mode="L").save(source)
    config = replace(smoke, model_pixels=None, stage1=replace(smoke.stage1, steps=1, primary_steps=2),
                     stage2=replace(smoke.stage2, embed_steps=1, finetune_steps=1), render=replace(smoke.render, steps=2))
    request = ItemRequest(item_id="native", source_uri=str(source), caption=CAPTION, color_map={"dog": "brown"})
    [record] = colorize_item(models, request, str(tmp_path / "out"), config, preset="smoke")
    assert record["status"] == "done" and record["max_delta_l"] <= 1.0
    state = tifffile.imread(record["outputs"]["master"])
    assert state.shape[:2] == gray.shape
