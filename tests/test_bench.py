"""The benchmark and the fast path: every figure is reported, and speed never changes what is computed.

Tolerances of the bf16 fast path against fp32 (tiny bundle, CPU autocast,
which runs the same bf16 matrix products as CUDA autocast):

- one stage-1 step: every loss term within 3% (relative; L_con's 1/tau = 14 amplifies
  the cosine's rounding, 1.1% seen);
- a short fit: the primary colourisation within 0.02 mean / 0.25 max absolute
  sRGB (0..1), ``e_opt`` within 0.2% and the adapter within 1% (relative L2);
- a render from one stored state: within 0.02 mean / 0.25 max absolute sRGB.

bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); the loose max
bounds cover a few pixels where the tiny random VAE amplifies that rounding.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import gray_scene

from diffcolor.common.captions import rewrite_caption
from diffcolor.method.diffusion import encode_latent, encode_prompts, noise_scheduler
from diffcolor.method.performance import (
    NAIVE,
    PerformanceConfig,
    apply_memory_format,
    autocast_dtype,
    make_adamw,
)
from diffcolor.method.render import RenderConfig, render_target
from diffcolor.method.stage1 import (
    Stage1Config,
    fit_color_prior,
    prepare_inputs,
    stage1_step,
)
from diffcolor.method.stage2 import fit_in_context, reconstruction_step
from diffcolor.method.state import ColorState
from diffcolor.method.training import AdapterConfig, make_trainable_unet
from diffcolor.tools import bench
from diffcolor.method.model_names import load_named_models

CAPTION = "a dog sitting on a wooden bench"
BF16 = PerformanceConfig(autocast="bf16")
FP32 = PerformanceConfig(autocast="off")


def _gray(height=64, width=48, seed=0):
    return torch.from_numpy(gray_scene(height, width, seed)).float()[None, None]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _adapter_relative(a: dict, b: dict) -> float:
    difference = sum(float((a[k] - b[k]).norm()) ** 2 for k in b) ** 0.5
    return difference / sum(float(b[k].norm()) ** 2 for k in b) ** 0.5


# ---------------------------------------------------------------------------
# The bench itself.


def test_cpu_smoke_bench_prints_the_table_and_writes_every_figure(cache_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--model", "tiny", "--preset", "smoke", "--render-repeats", "2",
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    # The table: both variants, per-stage seconds, per-loop rates, floor and the fast-vs-fp32 line.
    assert "seconds per stage" in printed and "s/image" in printed and "TFLOP/s" in printed
    assert all(line in printed for line in ("default ", "baseline ", "stage1 ", "embedding ", "finetune "))
    assert "floor" in printed and "fast path" in printed

    # The JSON: every figure the issue asks for, finite and positive.
    assert report["device"]["type"] == "cpu" and report["command"].startswith("python -m diffcolor.tools.bench")
    assert report["peak"]["bf16"]["tflops"] > 0 and report["peak"]["fp32"]["tflops"] > 0
    for name in ("default", "baseline"):
        variant = report["variants"][name]
        for stage in ("stage1", "stage1_loop", "primary_sampling", "align", "embedding", "finetune", "state_save",
                      "render_cold", "render_with_state_load"):
            assert variant["seconds"][stage] > 0, (name, stage)
        assert variant["seconds_per_image"] > 0 and variant["extrapolated"] is False
        for loop in bench.LOOPS:
            assert variant["steps_run"][loop] == variant["loop_steps"][loop] == 4
            assert variant["steps_per_s"][loop] > 0
            assert variant["flops_per_step"][loop] > 0 and variant["achieved_tflops"][loop] > 0
            assert variant["operators_per_step"][loop] > 0
            assert variant["peak_memory_bytes"][loop] > 0
    assert report["speedup_over_baseline"] > 0
    assert report["floor"]["flops_per_image"] > 0 and report["floor"]["seconds_at_measured_bf16_peak"] > 0
    assert report["fast_vs_fp32"]["render_max_abs"] == 0.0  # on a CPU the default path is fp32 itself

    # The baseline does strictly more work per step: weight gradients (full fine-tune) and re-encoding.
    default, baseline = report["variants"]["default"], report["variants"]["baseline"]
    assert default["stage1"]["adapter"] == "lora" and baseline["stage1"]["adapter"] == "full"
    assert all(baseline["flops_per_step"][loop] > default["flops_per_step"][loop] for loop in bench.LOOPS)


def test_capped_variants_are_extrapolated_to_the_recipe(models, tmp_path):
    config = bench.recipe_config("smoke", steps=6, sample_steps=2)
    result = bench.run_variant(models, bench.variant_config(config, "fp32"), "fp32", bench.gray_scene(32),
                               caption=CAPTION, target="a brown dog", seed=0, variant_steps=2, render_repeats=1,
                               warmup=False, flops=None)
    assert result["extrapolated"] is True
    assert result["steps_run"] == {"stage1": 2, "embedding": 2, "finetune": 2}
    assert result["loop_steps"] == {"stage1": 6, "embedding": 6, "finetune": 6}
    # 4 missing steps per loop were added at the measured rate.
    measured_plus = result["seconds"]["embedding"] - 4 / result["steps_per_s"]["embedding"]
    assert measured_plus > 0


# ---------------------------------------------------------------------------
# FLOP counting.


def test_flops_per_step_equal_the_difference_between_real_fits_of_n_and_n_plus_1_steps(models):
    gray = _gray(64, 64)
    config = bench.recipe_config("smoke", sample_steps=2)
    counted = bench.count_recipe_flops(models, config, gray, CAPTION, "a brown dog")

    def stage1_fit(steps):
        return bench.count_flops(lambda: fit_color_prior(models, gray, CAPTION, replace(config.stage1, steps=steps), seed=0))

    assert stage1_fit(2) - stage1_fit(1) == counted.per_step["stage1"]

    primary = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    rewritten = rewrite_caption(CAPTION)

    def stage2_fit(embed, tune):
        stage2 = replace(config.stage2, embed_steps=embed, finetune_steps=tune)
        return bench.count_flops(lambda: fit_in_context(models, primary, rewritten, stage2, seed=0))

    base = stage2_fit(1, 1)
    assert stage2_fit(2, 1) - base == counted.per_step["embedding"]
    assert stage2_fit(1, 2) - base == counted.per_step["finetune"]

    # A whole render (sampling, encode, decode, alignment features) matches the piecewise count within 1%
    # (the alignment's correlation einsums are the only products the piecewise count leaves out).
    state = ColorState(embedding=torch.zeros(1, 77, 32), adapter={}, adapter_config=replace(config.stage2.adapter),
                       gray=gray, primary=primary, confidence=torch.ones(1, 1, 64, 64), rewritten=rewritten, seed=0,
                       model_hash=models.model_hash)
    trainable = make_trainable_unet(models.unet, config.stage2.adapter, name="adapter", generator=torch.Generator())
    state.adapter = trainable.trained_state()
    trainable.release()
    whole = bench.count_flops(lambda: render_target(models, state, "a brown dog", config.render, config.align, seed=0))
    assert whole == pytest.approx(counted.render, rel=0.01)


def test_meta_device_count_equals_the_real_cpu_count(models):
    meta = replace(models, unet=copy.deepcopy(models.unet).to("meta"), vae=copy.deepcopy(models.vae).to("meta"),
                   text_encoder=copy.deepcopy(models.text_encoder).to("meta"), clip=copy.deepcopy(models.clip).to("meta"),
                   device=torch.device("meta"))
    config = bench.recipe_config("smoke")
    real = bench.count_recipe_flops(models, config, _gray(64, 64), CAPTION, "a brown dog")
    counted = bench.count_recipe_flops(meta, config, _gray(64, 64), CAPTION, "a brown dog")
    # Equal, but for the embedding step: where only K and V need a gradient (cross-attention fed by a
    # frozen path) the math path on meta skips dQ, which the fused attention kernels compute anyway (<1%).
    assert counted.per_step["stage1"] == real.per_step["stage1"] and counted.per_step["finetune"] == real.per_step["finetune"]
    assert counted.per_step["embedding"] == pytest.approx(real.per_step["embedding"], rel=0.01)
    assert counted.guided_step == real.guided_step
    assert counted.per_image == pytest.approx(real.per_image, rel=0.01)


def test_sd15_random_has_the_published_sd15_and_clip_vit_l14_sizes():
    from diffcolor.tools.sd15_random import build_sd15_random_models, parameter_counts

    models = build_sd15_random_models("meta")
    assert parameter_counts(models) == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480,
                                        "clip": 427_616_513}
    assert len(models.tokenizer) == 49408 and models.tokenizer.eos_token_id == 49407
    assert models.tokenizer(["sks"]).input_ids[0] == [49406, models.tokenizer.convert_tokens_to_ids("sks</w>"), 49407]
    assert models.vae_scale_factor == 8 and models.random_weights


# ---------------------------------------------------------------------------
# The performance options.


def test_defaults_resolve_to_the_fast_path_on_cuda_and_to_plain_fp32_elsewhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default = PerformanceConfig()
    assert autocast_dtype(default.autocast, cpu) is None
    assert autocast_dtype(default.autocast, cuda) is torch.bfloat16
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("off", cuda) is None
    assert Stage1Config().performance == default and RenderConfig().autocast == "auto"
    parameter = torch.nn.Parameter(torch.zeros(3))
    assert make_adamw([parameter], lr=1e-3, config=default, device=cpu).defaults["fused"] is None
    conv = torch.nn.Conv2d(4, 8, 3)
    before = conv.weight.stride()
    apply_memory_format([conv], default, cpu)
    assert conv.weight.stride() == before  # untouched on a CPU
    apply_memory_format([conv], PerformanceConfig(channels_last=True), cpu)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="'fp8'"):
        autocast_dtype("fp8", cpu)


def test_bad_performance_option_is_named_before_any_work(models):
    with pytest.raises(ValueError, match="'half'"):
        fit_color_prior(models, _gray(), CAPTION, replace(Stage1Config(steps=1), performance=PerformanceConfig(autocast="half")), seed=0)


def test_naive_re_encoding_every_step_computes_bit_identical_fits(models, smoke):
    """The baseline's re-encoding is the same work done again: on a CPU it must change no bit."""
    reencode = replace(PerformanceConfig(), cache_latents=False, cache_text=False)
    stage1 = replace(smoke.stage1, steps=3)
    cached = fit_color_prior(models, _gray(), CAPTION, stage1, seed=2)
    naive = fit_color_prior(models, _gray(), CAPTION, replace(stage1, performance=reencode), seed=2)
    assert torch.equal(cached.primary, naive.primary) and cached.loop.history == naive.loop.history

    stage2 = replace(smoke.stage2, embed_steps=2, finetune_steps=2)
    rewritten = rewrite_caption(CAPTION)
    cached2 = fit_in_context(models, cached.primary, rewritten, stage2, seed=2)
    naive2 = fit_in_context(models, cached.primary, rewritten, replace(stage2, performance=reencode), seed=2)
    assert torch.equal(cached2.embedding, naive2.embedding)
    assert all(torch.equal(cached2.adapter[k], naive2.adapter[k]) for k in cached2.adapter)
    assert NAIVE.cache_latents is False and NAIVE.autocast == "off"


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_autocast_one_stage1_step_matches_fp32(models, smoke, seed):
    gray = _gray(seed=seed)
    losses = {}
    for label, performance in (("fp32", FP32), ("bf16", BF16)):
        config = replace(smoke.stage1, performance=performance)
        inputs = prepare_inputs(models, gray, CAPTION, config)
        trainable = make_trainable_unet(models.unet, config.adapter, name="check", generator=torch.Generator().manual_seed(seed))
        try:
            with torch.no_grad():
                step = stage1_step(models, trainable.unet, inputs, gray, CAPTION, config,
                                   torch.Generator().manual_seed(seed), noise_scheduler(models))
            losses[label] = {key: float(value) for key, value in step.items()}
            assert all(value.dtype == torch.float32 for value in step.values())  # losses reduce in fp32
        finally:
            trainable.release()
    for key, reference in losses["fp32"].items():
        assert losses["bf16"][key] == pytest.approx(reference, rel=0.03), key
    assert losses["bf16"] != losses["fp32"], "autocast did not run in bf16"


def test_bf16_autocast_fit_and_render_match_fp32(models, smoke):
    gray = _gray()
    results = {}
    for label, performance, autocast in (("fp32", FP32, "off"), ("bf16", BF16, "bf16")):
        stage1 = fit_color_prior(models, gray, CAPTION, replace(smoke.stage1, performance=performance), seed=3)
        rewritten = rewrite_caption(CAPTION)
        stage2 = fit_in_context(models, stage1.primary, rewritten, replace(smoke.stage2, performance=performance), seed=3)
        assert stage2.embedding.dtype == torch.float32  # fp32 master tensors
        assert all(value.dtype == torch.float32 for value in stage2.adapter.values())
        results[label] = (stage1, stage2)
    (fp32_1, fp32_2), (bf16_1, bf16_2) = results["fp32"], results["bf16"]
    difference = (bf16_1.primary - fp32_1.primary).abs()
    assert float(difference.mean()) <= 0.02 and float(difference.max()) <= 0.25
    assert _relative(bf16_2.embedding, fp32_2.embedding) <= 2e-3
    assert _adapter_relative(bf16_2.adapter, fp32_2.adapter) <= 1e-2

    # The same stored state rendered both ways.
    state = ColorState(embedding=fp32_2.embedding, adapter=fp32_2.adapter, adapter_config=smoke.stage2.adapter,
                       gray=gray, primary=fp32_1.primary, confidence=torch.ones(1, 1, *gray.shape[-2:]),
                       rewritten=rewrite_caption(CAPTION), seed=3, model_hash=models.model_hash)
    renders = {autocast: render_target(models, state, "a brown dog sitting on a sks wooden sks bench",
                                       replace(smoke.render, autocast=autocast), smoke.align, seed=3).rgb
               for autocast in ("off", "bf16")}
    difference = (renders["bf16"] - renders["off"]).abs()
    assert 0.0 < float(difference.max()) <= 0.25 and float(difference.mean()) <= 0.02


# ---------------------------------------------------------------------------
# Frozen weights stored in bf16 (the CUDA default of load_models).


def _matrix_layers(models):
    from diffcolor.method.performance import MATRIX_LAYERS

    return [layer for module in (models.unet, models.vae, models.text_encoder, models.clip)
            for layer in module.modules() if isinstance(layer, MATRIX_LAYERS)]


def test_bf16_storage_casts_only_matrix_weights_and_halves_their_memory(models, bf16_models):
    assert models.weight_dtype == torch.float32 and bf16_models.weight_dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for layer in _matrix_layers(bf16_models) for p in layer.parameters())
    matrix = {id(p) for layer in _matrix_layers(bf16_models) for p in layer.parameters()}
    others = [p for module in (bf16_models.unet, bf16_models.vae, bf16_models.text_encoder, bf16_models.clip)
              for p in module.parameters() if id(p) not in matrix]
    assert others and all(p.dtype == torch.float32 for p in others)  # norms, embeddings, CLIP's class embedding
    assert bf16_models.provenance["weight_dtype"] == "bfloat16" and bf16_models.model_hash == models.model_hash

    def matrix_bytes(m):
        return sum(p.numel() * p.element_size() for layer in _matrix_layers(m) for p in layer.parameters())

    assert matrix_bytes(bf16_models) * 2 == matrix_bytes(models)
    # An adapter on the bf16 base still trains fp32 master weights.
    trainable = make_trainable_unet(bf16_models.unet, AdapterConfig(), name="check", generator=torch.Generator())
    try:
        assert trainable.parameters and all(p.dtype == torch.float32 for p in trainable.parameters.values())
    finally:
        trainable.release()


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_stored_weights_give_bit_identical_steps_with_fewer_operators(models, bf16_models, smoke, seed):
    """Storing the frozen matrix weights in bf16 is what autocast's per-use cast computes, done once at load,
    and peft's upcast of each LoRA input is undone by autocast at once: without both, the same losses and
    adapter gradients to the bit, with fewer operators per step."""
    gray = _gray(seed=seed)
    config = replace(smoke.stage1, performance=BF16)
    inputs = prepare_inputs(models, gray, CAPTION, config)  # the same fp32 inputs for every variant
    results = {}
    for label, m, peft_input_cast in (("fp32 weights, peft input cast", models, True),
                                      ("fp32 weights", models, False), ("bf16 weights", bf16_models, False)):
        trainable = make_trainable_unet(m.unet, config.adapter, name="check", generator=torch.Generator().manual_seed(seed))
        try:
            for module in m.unet.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = peft_input_cast
            trainable.unet.train()
            losses = {}

            def step():
                terms = stage1_step(m, trainable.unet, inputs, gray, CAPTION, config,
                                    torch.Generator().manual_seed(seed), noise_scheduler(m))
                terms["total"].backward()
                losses.update({key: float(value.detach()) for key, value in terms.items()})

            _, operators = bench.count_work(step)
            gradients = torch.cat([p.grad.flatten() for p in trainable.parameters.values()])
            results[label] = (losses, gradients, operators)
        finally:
            trainable.release()
    (losses0, grads0, ops0), *others = results.values()
    assert grads0.dtype == torch.float32 and float(grads0.abs().max()) > 0
    for losses, grads, _ in others:
        assert losses == losses0 and grads.dtype == torch.float32 and torch.equal(grads, grads0)
    ops = [operators for *_, operators in results.values()]
    assert ops[2] < ops[1] < ops[0] and ops[2] < 0.85 * ops[0], ops  # casts gone from every step

    # The embedding step of stage 2: the gradient into e_opt, through the frozen bf16 UNet.
    stage2 = replace(smoke.stage2, performance=BF16)
    primary = torch.rand(1, 3, *gray.shape[-2:], generator=torch.Generator().manual_seed(seed))
    latent = encode_latent(models, primary)
    gradients = []
    for m in (models, bf16_models):
        embedding = encode_prompts(models, [rewrite_caption(CAPTION).text]).clone().requires_grad_(True)
        reconstruction_step(m, m.unet, latent, primary, embedding, torch.Generator().manual_seed(seed), stage2,
                            noise_scheduler(m))["total"].backward()
        gradients.append(embedding.grad)
    assert torch.equal(gradients[0], gradients[1])


def test_fp32_compute_on_bf16_stored_weights_is_refused_before_any_work(bf16_models, smoke):
    with pytest.raises(ValueError, match="autocast='off'.*weight_dtype='fp32'"):
        fit_color_prior(bf16_models, _gray(), CAPTION, replace(smoke.stage1, performance=FP32), seed=0)
    with pytest.raises(ValueError, match="weight_dtype must be one of .*'half'"):
        load_named_models("tiny", weight_dtype="half")


def test_bf16_stored_weights_colourise_an_item_within_the_fast_path_tolerances(models, bf16_models, smoke, tmp_path,
                                                                            gray_png):
    """The whole item on bf16-stored weights (every encode, alignment, CLIP score) against fp32 compute."""
    import numpy as np
    import tifffile

    from diffcolor.common.items import ItemRequest
    from diffcolor.pipeline import colorize_item

    request = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION, seed=4)
    fp32_config = replace(smoke, stage1=replace(smoke.stage1, performance=FP32),
                          stage2=replace(smoke.stage2, performance=FP32), render=replace(smoke.render, autocast="off"))
    fast = colorize_item(bf16_models, request, str(tmp_path / "bf16"), smoke)[0]
    reference = colorize_item(models, request, str(tmp_path / "fp32"), fp32_config)[0]
    assert fast["status"] == reference["status"] == "done"
    assert fast["max_delta_l"] <= 1.0 and fast["clip_score"] >= 0.0  # luminance kept from the original either way
    a = tifffile.imread(fast["outputs"]["master"]).astype(np.float64) / 255.0
    b = tifffile.imread(reference["outputs"]["master"]).astype(np.float64) / 255.0
    difference = np.abs(a - b)
    assert 0.0 < difference.max() <= 0.25 and difference.mean() <= 0.02


# ---------------------------------------------------------------------------
# Real-sized model (slow: minutes on a CPU).


@pytest.mark.slow
def test_sd15_random_runs_one_real_step_of_every_loop_on_a_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--model", "sd15-random", "--preset", "paper-scale", "--resolution", "256",
                       "--steps", "2", "--sample-steps", "2", "--variants", "default", "--no-warmup", "--no-check",
                       "--render-repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    variant = report["variants"]["default"]
    assert all(variant["steps_run"][loop] == 2 for loop in bench.LOOPS)
    assert variant["flops_per_step"]["stage1"] > 1e12  # SD-1.5 sized: over a TFLOP per stage-1 step at 256 px
    assert "seconds per stage" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_fits_match_eager_and_compile_once_per_worker(models, smoke):
    """torch.compile's cost is paid once per worker: the next item's fresh adapter reuses the graphs."""
    from torch._dynamo.utils import counters

    stage1 = replace(smoke.stage1, steps=2)
    eager = fit_color_prior(models, _gray(), CAPTION, stage1, seed=0)
    compiled = replace(stage1, performance=PerformanceConfig(compile_mode="default"))
    first = fit_color_prior(models, _gray(), CAPTION, compiled, seed=0)
    graphs = counters["stats"]["unique_graphs"]
    second = fit_color_prior(models, _gray(), CAPTION, compiled, seed=1)
    assert counters["stats"]["unique_graphs"] == graphs, "a new item's adapter recompiled the UNet"
    assert float((first.primary - eager.primary).abs().max()) <= 1e-4
    assert second.primary.shape == first.primary.shape


@pytest.mark.slow
def test_concurrent_processes_report_throughput(cache_dir, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--model", "tiny", "--preset", "smoke", "--variants", "default", "--no-flops",
                       "--no-check", "--concurrent", "2", "--json", str(out)]) == 0
    concurrent = json.loads(out.read_text())["concurrent"]
    assert concurrent["processes"] == 2 and len(concurrent["latency_s"]) == 2
    assert 0 < concurrent["seconds_per_image"] <= concurrent["wall_s"]


def test_the_reduced_decode_variant_counts_fewer_stage1_flops_and_nothing_else_changes(models, smoke):
    config = replace(smoke, stage1=replace(smoke.stage1, loss_decode_side=32))
    gray = _gray(64, 64)
    full = bench.count_recipe_flops(models, smoke, gray, CAPTION, "a brown dog")
    reduced = bench.count_recipe_flops(models, config, gray, CAPTION, "a brown dog")
    assert reduced.per_step["stage1"] < full.per_step["stage1"]
    assert reduced.per_step["embedding"] == full.per_step["embedding"] and reduced.render == full.render
    assert reduced.per_image < full.per_image
    assert bench.variant_config(smoke, "reduced-decode").stage1.loss_decode_side == bench.REDUCED_DECODE_SIDE == 224
    assert bench.variant_config(smoke, "default").stage1.loss_decode_side is None  # the default is unchanged


def test_loop_rates_use_only_the_steps_whose_losses_were_read():
    # Losses read every 2 steps: steps 1 and 2 report at the read of step 2 (t=1), 3 and 4 at t=2, 5 and 6 at t=3.
    stamps = [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 3.0), (6, 3.0)]
    assert bench._rate(stamps, 0.0, 2) == pytest.approx(2.0)  # 4 steps between the reads at 2 and 6, in 2 s
    assert bench._rate([(1, 0.5), (2, 1.0), (3, 1.5)], 0.0, 1) == pytest.approx(2.0)
