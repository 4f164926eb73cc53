"""``python -m diffcolor.tools.bench``: seconds, steps/s, memory and TFLOP/s of recipe R (docs/DESIGN.md §8).

One run times the optimised default and the naive baseline (fp32, full
fine-tune, VAE and text re-encoded every step) on the same model, image and
seed, and prints them side by side:

- seconds per stage: stage 1 (its loop, then the primary sampling), alignment,
  embedding optimisation, fine-tune, colour-state save, and a new-prompt render
  *including* loading the colour state (cold, then warm);
- steps/s of each loop (from the loop's own per-step progress calls, first step
  excluded), peak device memory per stage (``torch.cuda.max_memory_allocated``;
  the process's RSS high-water mark on a CPU);
- FLOPs per step of each loop, counted with ``torch.utils.flop_counter`` on one
  real step of that loop (matrix products, convolutions, attention; not the
  element-wise work), and achieved TFLOP/s = FLOPs/step x steps/s, against a
  bf16 (and fp32) matrix-product peak measured in the same run;
- the FLOP floor of one image: all FLOPs of the recipe over the measured peak.

``--flops-only`` counts the FLOPs on the ``meta`` device (nothing is computed or
allocated) and prints the floor at ``--peak-tflops``: the recipe-R floor of an
SD-1.5-sized model on an H100, from any machine.

Variants other than ``default`` run at most ``--variant-steps`` steps per loop
and are extrapolated to the recipe's step counts at their measured steps/s
(marked ``extrapolated``); ``default`` always runs the full recipe. Every variant
first runs a short warm-up (two steps per loop) so that one-time costs (CUDA
context, kernel loading, compilation) are reported apart (``warmup_s``).

Examples::

    python -m diffcolor.tools.bench --device cpu --model tiny --preset smoke         # CI-sized, seconds
    python -m diffcolor.tools.bench --device cuda --model sd15-random --preset paper-scale --json bench-h100.json
    python -m diffcolor.tools.bench --flops-only --model sd15-random --preset paper-scale --peak-tflops 989.4
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from diffcolor.method.performance import (
    NAIVE,
    PerformanceConfig,
    autocast_context,
    frozen_weight_dtype,
)

VARIANT_NAMES = ("default", "baseline", "fp32", "fp32-weights", "no-channels-last", "no-fused", "compile",
                 "compile-graphs", "cudnn-benchmark", "reduced-decode")
REDUCED_DECODE_SIDE = 224  # the reduced-decode variant's stage1.loss_decode_side: CLIP ViT-L/14's input side
LOOPS = ("stage1", "embedding", "finetune")
CAPTION = "a dog sitting on a wooden bench, with grassland and sky"
TARGET = "a brown dog sitting on a black wooden bench, with green grassland and blue sky"
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100 SXM5 datasheet: dense bf16 tensor-core peak (no sparsity)


# ---------------------------------------------------------------------------
# Models, recipe and variants.


def load_bench_models(name: str, device: torch.device, weight_dtype: str = "auto"):
    """``tiny``, ``sd15-random`` (built in memory, SD 1.5 shapes) or a model folder / hub id, on ``device``,
    with the frozen matrix weights stored as ``weight_dtype`` says (see :func:`diffcolor.method.models.load_models`)."""
    from diffcolor.tools.sd15_random import NAME, build_sd15_random_models
    from diffcolor.method.model_names import load_named_models

    if name == NAME:
        return build_sd15_random_models(device, weight_dtype=weight_dtype)
    if device.type == "meta":
        raise ValueError(f"--flops-only builds models on the meta device: use --model {NAME} (got {name!r})")
    return load_named_models(name, device=device, weight_dtype=weight_dtype)


class BenchModels:
    """The models of one bench run, loaded once per weight storage the variants need (fp32 and/or bf16)."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.loaded: dict[torch.dtype, object] = {}
        self.load_s: dict[str, float] = {}  # seconds to load (build) each storage's copy

    def get(self, weight_dtype: str):
        """The models with ``weight_dtype`` ("auto", "bf16", "fp32") storage, loaded on first use."""
        dtype = frozen_weight_dtype(weight_dtype, self.device)
        if dtype not in self.loaded:
            started = time.perf_counter()
            self.loaded[dtype] = load_bench_models(self.name, self.device, weight_dtype)
            synchronize(self.device)
            self.load_s[str(dtype).removeprefix("torch.")] = time.perf_counter() - started
        return self.loaded[dtype]


def variant_weight_dtype(name: str, default: str = "auto") -> str:
    """How a variant stores the frozen weights: fp32 where it computes in fp32 or ablates bf16 storage,
    else ``default`` (``--weight-dtype``)."""
    return "fp32" if name in ("baseline", "fp32", "fp32-weights") else default


def recipe_config(preset: str, *, steps: int | None = None, sample_steps: int | None = None):
    """The preset's pipeline config, with every loop's steps and/or every sampler's steps overridden."""
    from diffcolor.method.presets import get_preset

    config = get_preset(preset)
    if steps is not None:
        config = replace(
            config,
            stage1=replace(config.stage1, steps=steps),
            stage2=replace(config.stage2, embed_steps=steps, finetune_steps=steps),
        )
    if sample_steps is not None:
        config = replace(config, stage1=replace(config.stage1, primary_steps=sample_steps),
                         render=replace(config.render, steps=sample_steps))
    return config


def variant_config(config, name: str):
    """The pipeline config of a named variant: ``default`` as given, ``baseline`` naive, the rest one ablation each."""
    from diffcolor.method.training import AdapterConfig

    def with_performance(performance: PerformanceConfig, *, adapter: AdapterConfig | None = None, render: dict | None = None):
        stage1 = replace(config.stage1, performance=performance, **({"adapter": adapter} if adapter else {}))
        stage2 = replace(config.stage2, performance=performance, **({"adapter": adapter} if adapter else {}))
        return replace(config, stage1=stage1, stage2=stage2, render=replace(config.render, **(render or {})))

    base = config.stage1.performance
    if name in ("default", "cudnn-benchmark"):
        return config
    if name == "baseline":
        return with_performance(NAIVE, adapter=replace(config.stage1.adapter, mode="full"),
                                render={"autocast": "off", "channels_last": False})
    if name == "fp32":
        return with_performance(replace(base, autocast="off"), render={"autocast": "off"})
    if name == "fp32-weights":  # bf16 autocast over fp32-stored frozen weights (a cast per weight per use)
        return with_performance(replace(base, autocast="bf16"), render={"autocast": "bf16"})
    if name == "no-channels-last":
        return with_performance(replace(base, channels_last=False), render={"channels_last": False})
    if name == "no-fused":
        return with_performance(replace(base, fused_optimizer=False))
    if name == "compile":
        return with_performance(replace(base, compile_mode="default"))
    if name == "compile-graphs":  # torch.compile with CUDA graphs: launch overhead gone, if the graphs are reused
        return with_performance(replace(base, compile_mode="reduce-overhead"))
    if name == "reduced-decode":  # stage 1 decodes its x0 estimate for CLIP and L_lum at 224 px, not the working size
        return replace(config, stage1=replace(config.stage1, loss_decode_side=REDUCED_DECODE_SIDE))
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANT_NAMES)}")


def capped(config, cap: int | None):
    """``config`` with every loop limited to ``cap`` steps (None: unchanged)."""
    if cap is None:
        return config
    return replace(
        config,
        stage1=replace(config.stage1, steps=min(cap, config.stage1.steps)),
        stage2=replace(config.stage2, embed_steps=min(cap, config.stage2.embed_steps),
                       finetune_steps=min(cap, config.stage2.finetune_steps)),
    )


def loop_steps(config) -> dict[str, int]:
    return {"stage1": config.stage1.steps, "embedding": config.stage2.embed_steps, "finetune": config.stage2.finetune_steps}


def gray_scene(side: int) -> torch.Tensor:
    """A deterministic gray test image (1, 1, side, side) in [0, 1]: a ramp, a disc, a little texture."""
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    scene = 0.15 + 0.6 * xs / max(side - 1, 1)
    disc = (ys - side * 0.5) ** 2 + (xs - side * 0.4) ** 2 < (side * 0.25) ** 2
    scene = torch.where(disc, 0.85 - 0.3 * ys / max(side - 1, 1), scene)
    texture = torch.rand(side, side, generator=torch.Generator().manual_seed(0)) * 0.04 - 0.02
    return (scene + texture).clamp(0.0, 1.0)[None, None]


# ---------------------------------------------------------------------------
# Device helpers.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory since the last reset (CUDA), or the process's peak RSS (anything else)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def describe_device(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(name=properties.name, memory_bytes=int(properties.total_memory), cuda=torch.version.cuda,
                    capability=f"{properties.major}.{properties.minor}")
    else:
        info["name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, *, budget_s: float = 2.0) -> dict:
    """TFLOP/s of a large square matrix product in ``dtype`` (random data, warmed up, median of repeats).

    On CUDA n = 8192 (fills an H100), 3 warm-ups and at least 5 repeats. Elsewhere n = 512, one warm-up and
    as many repeats as ``budget_s`` allows (at least one): a CPU without native bf16 takes about a minute for
    one bf16 product of 2048 x 2048, and the CPU figure only labels a smoke run.
    """
    cuda = device.type == "cuda"
    n = 8192 if cuda else 512
    generator = torch.Generator(device=device).manual_seed(0) if device.type == "cuda" else torch.Generator().manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.float32, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32, generator=generator).to(dtype)
    for _ in range(3 if cuda else 1):
        a @ b
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    least = 5 if cuda else 1
    while len(times) < least or (time.perf_counter() - started < budget_s and len(times) < 50):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - begin)
    seconds = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": len(times), "seconds": seconds,
            "tflops": 2 * n**3 / seconds / 1e12}


# ---------------------------------------------------------------------------
# FLOP counting.


def _flop_mapping() -> dict:
    """FlopCounterMode's formulas made device-independent model FLOPs (the MFU convention).

    - The CPU flash-attention kernels SDPA uses on a CPU get the same formulas as the CUDA ones.
    - Attention backward is counted without flash attention's recompute of the scores (4 matrix
      products, not 5), so a count on any device, or on ``meta`` (which runs the math path), is the
      same number: the work the model needs, not what one kernel happens to redo.
    """
    from torch.utils import flop_counter

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        batch, heads, queries, depth = query
        recompute = flop_counter.bmm_flop((batch * heads, queries, depth), (batch * heads, depth, key[2]))
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value) - recompute

    aten = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = forward
    for name in ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
                 "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward"):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = backward
    return mapping


def count_flops(fn) -> int:
    """Matrix-product, convolution and attention FLOPs of running ``fn()`` (forward and any backward in it)."""
    return count_work(fn)[0]


def count_work(fn) -> tuple[int, int]:
    """``(FLOPs, operators)`` of running ``fn()``: FLOPs as :func:`count_flops`, and how many non-view
    aten operators ran, about one kernel launch each in eager mode (the launch-overhead side of a step)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class OperatorCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.operators = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.operators += 1
            return func(*args, **(kwargs or {}))

    operators = OperatorCounter()
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter, operators:
        fn()
    return int(counter.get_total_flops()), operators.operators


@dataclass
class FlopCount:
    """FLOPs of one step of each loop, of one guided sampling step, and of one whole image."""

    per_step: dict[str, int]  # stage1 / embedding / finetune: one optimisation step (forward + backward)
    operators_per_step: dict[str, int]  # non-view aten operators of that step (the optimiser update not included)
    guided_step: int  # one classifier-free-guided UNet call (batch 2), primary sampling and render
    once: dict[str, int]  # the per-item encodes and decodes
    per_image: int = 0
    render: int = 0  # one new-prompt render (its sampling, encode, decode)


def count_recipe_flops(models, config, gray: torch.Tensor, caption: str, target: str) -> FlopCount:
    """Counts one real step of each loop, exactly as the loops run it (same step functions, same adapters)."""
    from diffcolor.common.captions import rewrite_caption
    from diffcolor.method.align import encoder_features
    from diffcolor.method.diffusion import (
        clip_text_features,
        decode_latent,
        denoising_steps,
        encode_latent,
        encode_prompts,
        noise_scheduler,
    )
    from diffcolor.method.stage1 import prepare_inputs, stage1_step
    from diffcolor.method.stage2 import reconstruction_step
    from diffcolor.method.training import make_trainable_unet

    device = models.device
    gray = gray.to(device)
    scheduler = noise_scheduler(models)
    generator = torch.Generator().manual_seed(0)
    per_step: dict[str, int] = {}
    operators: dict[str, int] = {}
    with torch.no_grad():
        inputs = prepare_inputs(models, gray, caption, config.stage1)

    # 1. Stage 1: one step of the loss (forward and backward into the adapter).
    trainable = make_trainable_unet(models.unet, config.stage1.adapter, name="bench_stage1", generator=generator)
    try:
        trainable.unet.train()
        per_step["stage1"], operators["stage1"] = count_work(
            lambda: stage1_step(models, trainable.unet, inputs, gray, caption, config.stage1, generator, scheduler)["total"].backward())
    finally:
        trainable.release()

    # 2. Stage 2: the embedding step (frozen base UNet) and the fine-tune step (its adapter).
    rewritten = rewrite_caption(caption, config.stage2.identifier, config.stage2.identifier_rule)
    primary = torch.rand(1, 3, *gray.shape[-2:], generator=generator).to(device)
    latent = encode_latent(models, primary)
    embedding = encode_prompts(models, [rewritten.text]).float().clone().requires_grad_(True)
    per_step["embedding"], operators["embedding"] = count_work(
        lambda: reconstruction_step(models, models.unet, latent, primary, embedding, generator, config.stage2, scheduler)["total"].backward())
    trainable = make_trainable_unet(models.unet, config.stage2.adapter, name="bench_stage2", generator=generator)
    try:
        trainable.unet.train()
        fixed = embedding.detach()
        per_step["finetune"], operators["finetune"] = count_work(
            lambda: reconstruction_step(models, trainable.unet, latent, primary, fixed, generator, config.stage2, scheduler)["total"].backward())

        # 3. One guided sampling step: the adapted UNet on a batch of two (unconditional and conditional).
        trainable.unet.eval()
        context = torch.cat([encode_prompts(models, [""]), encode_prompts(models, [target])])
        with torch.no_grad(), autocast_context(config.render.autocast, models):
            guided = count_flops(lambda: trainable.unet(torch.cat([latent, latent]), torch.tensor([500], device=device),
                                                        encoder_hidden_states=context))
    finally:
        trainable.release()

    # 4. What runs once per item: encodes, decodes, prompt encodes, alignment features.
    with torch.no_grad():
        once = {
            "vae_encode": count_flops(lambda: encode_latent(models, gray.expand(-1, 3, -1, -1))),
            "vae_decode": count_flops(lambda: decode_latent(models, latent)),
            "text_encode": count_flops(lambda: encode_prompts(models, [caption])),
            "clip_text_encode": count_flops(lambda: clip_text_features(models, [caption, *config.stage1.anti_prompts])),
            "align_features": 2 * count_flops(lambda: encoder_features(models, gray, config.align.feature_stride)),
        }
    primary_steps = denoising_steps(config.stage1.primary_steps, config.stage1.primary_strength)
    render_steps = denoising_steps(config.render.steps, config.render.strength)
    render = (render_steps * guided + once["vae_encode"] + once["vae_decode"] + 2 * once["text_encode"]
              + once["align_features"])
    stage1_once = (once["vae_encode"] + once["text_encode"] + once["clip_text_encode"]  # prepare_inputs
                   + primary_steps * guided + once["text_encode"] + once["vae_decode"])  # primary sampling
    stage2_once = once["vae_encode"] + once["text_encode"]
    steps = loop_steps(config)
    per_image = (sum(steps[loop] * per_step[loop] for loop in LOOPS) + stage1_once + once["align_features"]
                 + stage2_once + render)
    return FlopCount(per_step=per_step, operators_per_step=operators, guided_step=guided, once=once, per_image=per_image, render=render)


# ---------------------------------------------------------------------------
# Timing one variant.


@dataclass
class StageClock:
    """Times stages with the device synchronised, and records their peak memory."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)

    def run(self, name: str, fn):
        synchronize(self.device)
        reset_peak_memory(self.device)
        started = time.perf_counter()
        result = fn()
        synchronize(self.device)
        self.seconds[name] = time.perf_counter() - started
        self.peak_memory[name] = peak_memory_bytes(self.device)
        return result


def _rate(stamps: list[tuple[int, float]], started: float, every: int = 1) -> float:
    """Steps per second from ``(step, time)`` progress stamps, excluding the steps up to the first read (warm-up).

    A loop reads its losses (and calls progress) every ``every`` steps and at its last, all read steps at once:
    only the stamp of each read step (a multiple of ``every``, or the last) is a synchronised time.
    """
    reads = [(step, at) for step, at in stamps if step % every == 0 or step == stamps[-1][0]]
    if len(reads) >= 2 and reads[-1][1] > reads[0][1]:
        return (reads[-1][0] - reads[0][0]) / (reads[-1][1] - reads[0][1])
    return reads[-1][0] / max(reads[-1][1] - started, 1e-9) if reads else float("nan")


def time_recipe(models, config, gray: torch.Tensor, *, caption: str, target: str, seed: int, render_repeats: int,
                state_dir: Path) -> dict:
    """Runs stage 1, alignment, stage 2, state save and new-prompt renders once; returns the timings."""
    from diffcolor.archive.layout import ItemLayout
    from diffcolor.archive.states import publish_state, read_state
    from diffcolor.common.captions import rewrite_caption
    from diffcolor.method.align import align_chroma
    from diffcolor.method.render import render_target, resolve_target
    from diffcolor.method.stage1 import fit_color_prior
    from diffcolor.method.stage2 import fit_in_context
    from diffcolor.method.state import ColorState, export_state, state_from_bytes

    device = models.device
    clock = StageClock(device)
    stamps: dict[str, list[tuple[int, float]]] = {loop: [] for loop in LOOPS}  # (step, time) of each progress call
    starts: dict[str, float] = {}

    # 1. Stage 1: its loop (per-step stamps come after each step's loss is read, i.e. synchronised), then x_pri.
    starts["stage1"] = time.perf_counter()
    stage1 = clock.run("stage1", lambda: fit_color_prior(
        models, gray, caption, config.stage1, seed=seed,
        progress=lambda step, record: stamps["stage1"].append((step, time.perf_counter()))))
    stage1_end = starts["stage1"] + clock.seconds["stage1"]
    loop_end = stamps["stage1"][-1][1] if stamps["stage1"] else stage1_end
    clock.seconds["stage1_loop"] = loop_end - starts["stage1"]
    clock.seconds["primary_sampling"] = stage1_end - loop_end

    # 2. Alignment.
    aligned = clock.run("align", lambda: align_chroma(models, stage1.primary, gray, config.align))

    # 3. Stage 2: the embedding loop, then the fine-tune loop.
    rewritten = rewrite_caption(caption, config.stage2.identifier, config.stage2.identifier_rule)
    starts["embedding"] = time.perf_counter()
    stage2 = clock.run("stage2", lambda: fit_in_context(
        models, aligned.rgb, rewritten, config.stage2, seed=seed,
        progress=lambda phase, step, record: stamps[phase].append((step, time.perf_counter()))))
    stage2_end = starts["embedding"] + clock.seconds["stage2"]
    embed_end = stamps["embedding"][-1][1] if stamps["embedding"] else starts["embedding"]
    starts["finetune"] = embed_end
    clock.seconds["embedding"] = embed_end - starts["embedding"]
    clock.seconds["finetune"] = stage2_end - embed_end
    clock.peak_memory["embedding"] = clock.peak_memory["finetune"] = clock.peak_memory.pop("stage2")
    del clock.seconds["stage2"]

    # 4. The colour state, saved as the pipeline saves it.
    state = ColorState(
        embedding=stage2.embedding, adapter=stage2.adapter, adapter_config=config.stage2.adapter,
        gray=gray.cpu(), primary=aligned.rgb, confidence=aligned.confidence, rewritten=rewritten,
        seed=seed, model_hash=models.model_hash, config={"bench": True},
    )
    prefix = ItemLayout(str(state_dir)).state
    clock.run("state_save", lambda: publish_state(prefix, *export_state(state)))

    # 5. New-prompt renders from the stored state: load it, resolve the prompt, sample, align (cold, then warm).
    def render_from_state():
        loaded = state_from_bytes(read_state(prefix), prefix)
        prompt = resolve_target(models, loaded, target, None).model_prompt
        return render_target(models, loaded, prompt, config.render, config.align, seed=seed)

    render_seconds = []
    for _ in range(max(1, render_repeats)):
        clock.run("render_with_state_load", render_from_state)
        render_seconds.append(clock.seconds["render_with_state_load"])
    clock.seconds["render_cold"] = render_seconds[0]
    clock.seconds["render_with_state_load"] = statistics.median(render_seconds[1:] or render_seconds)

    every = {"stage1": config.stage1.performance.loss_every, "embedding": config.stage2.performance.loss_every,
             "finetune": config.stage2.performance.loss_every}
    rates = {loop: _rate(stamps[loop], starts[loop], every[loop]) for loop in LOOPS}
    return {"seconds": clock.seconds, "peak_memory_bytes": clock.peak_memory, "steps_per_s": rates,
            "steps_run": {loop: len(stamps[loop]) for loop in LOOPS}, "state_prefix": prefix}


def run_variant(models, config, name: str, gray: torch.Tensor, *, caption: str, target: str, seed: int,
                variant_steps: int | None, render_repeats: int, warmup: bool, flops: FlopCount | None,
                reference=None) -> dict:
    """Warm-up, then the timed recipe (capped and extrapolated for non-default variants); one report dict.

    ``reference`` (models with fp32-stored weights): also render the variant's stored state with them
    in fp32 and report the difference (fast vs fp32).
    """
    device = models.device
    full = loop_steps(config)
    cap = None if name == "default" else variant_steps
    timed_config = capped(config, cap)
    previous_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = name == "cudnn-benchmark" or previous_benchmark
    try:
        with tempfile.TemporaryDirectory(prefix="diffcolor-bench-") as folder:
            warmup_s = 0.0
            if warmup:
                started = time.perf_counter()
                short = replace(capped(config, 2), stage1=replace(config.stage1, steps=min(2, config.stage1.steps),
                                                                  primary_steps=2),
                                render=replace(config.render, steps=2))
                time_recipe(models, short, gray, caption=caption, target=target, seed=seed, render_repeats=1,
                            state_dir=Path(folder) / "warmup")
                synchronize(device)
                warmup_s = time.perf_counter() - started
            timed = time_recipe(models, timed_config, gray, caption=caption, target=target, seed=seed,
                                render_repeats=render_repeats, state_dir=Path(folder))
            difference = (render_difference(models, reference, timed_config, timed["state_prefix"], target=target,
                                            seed=seed) if reference is not None else None)
    finally:
        torch.backends.cudnn.benchmark = previous_benchmark

    seconds = dict(timed["seconds"])
    extrapolated = False
    loop_seconds = {"stage1": "stage1_loop", "embedding": "embedding", "finetune": "finetune"}
    for loop in LOOPS:
        missing = full[loop] - timed["steps_run"][loop]
        if missing > 0 and math.isfinite(timed["steps_per_s"][loop]):
            seconds[loop_seconds[loop]] += missing / timed["steps_per_s"][loop]
            extrapolated = True
    seconds["stage1"] = seconds["stage1_loop"] + seconds["primary_sampling"]
    per_image = (seconds["stage1"] + seconds["align"] + seconds["embedding"] + seconds["finetune"]
                 + seconds["state_save"] + seconds["render_with_state_load"])
    report = {
        "variant": name,
        "weight_dtype": str(models.weight_dtype).removeprefix("torch."),
        "stage1": asdict(config.stage1.performance) | {"adapter": config.stage1.adapter.mode},
        "stage2": asdict(config.stage2.performance) | {"adapter": config.stage2.adapter.mode},
        "render": {"autocast": config.render.autocast, "channels_last": config.render.channels_last},
        "cudnn_benchmark": torch.backends.cudnn.benchmark or name == "cudnn-benchmark",
        "warmup_s": warmup_s,
        "seconds": seconds,
        "seconds_per_image": per_image,
        "extrapolated": extrapolated,
        "loop_steps": full,
        "steps_run": timed["steps_run"],
        "steps_per_s": timed["steps_per_s"],
        "peak_memory_bytes": timed["peak_memory_bytes"],
        "peak_memory_kind": "device" if device.type == "cuda" else "host_rss_process_high_water_mark",
    }
    if flops is not None:
        report["flops_per_step"] = dict(flops.per_step)
        report["operators_per_step"] = dict(flops.operators_per_step)
        report["achieved_tflops"] = {loop: flops.per_step[loop] * timed["steps_per_s"][loop] / 1e12 for loop in LOOPS}
        report["flops_per_image"] = flops.per_image
        report["achieved_tflops_per_image"] = flops.per_image / per_image / 1e12
        report["render_tflops"] = flops.render / seconds["render_with_state_load"] / 1e12
    if difference is not None:
        report["_render_difference"] = difference
    return report


def stage1_loss_difference(models, reference, config, gray: torch.Tensor, *, caption: str, seed: int) -> dict:
    """How far one stage-1 step's losses on the default's path (``models``' weight storage, its autocast) are
    from fp32 (``reference``: fp32-stored weights, no autocast); same noise, same adapter init."""
    from diffcolor.method.diffusion import noise_scheduler
    from diffcolor.method.performance import autocast_dtype
    from diffcolor.method.stage1 import prepare_inputs, stage1_step
    from diffcolor.method.training import make_trainable_unet

    fast = config.stage1.performance.autocast
    result = {"autocast": str(autocast_dtype(fast, models.device, models.weight_dtype)).removeprefix("torch."),
              "weight_dtype": str(models.weight_dtype).removeprefix("torch.")}
    losses = {}
    for label, setting, on in (("fp32", "off", reference), ("fast", fast, models)):
        stage1 = replace(config.stage1, performance=replace(config.stage1.performance, autocast=setting))
        inputs = prepare_inputs(on, gray.to(on.device), caption, stage1)
        trainable = make_trainable_unet(on.unet, stage1.adapter, name="bench_check",
                                        generator=torch.Generator().manual_seed(seed))
        try:
            with torch.no_grad():
                step = stage1_step(on, trainable.unet, inputs, gray, caption, stage1,
                                   torch.Generator().manual_seed(seed), noise_scheduler(on))
            losses[label] = {key: float(value) for key, value in step.items()}
        finally:
            trainable.release()
    result["stage1_loss_rel_diff"] = {
        key: abs(losses["fast"][key] - losses["fp32"][key]) / max(abs(losses["fp32"][key]), 1e-12) for key in losses["fp32"]}
    result["stage1_losses"] = losses
    return result


def render_difference(models, reference, config, state_prefix: str, *, target: str, seed: int) -> dict:
    """sRGB difference between a render on the default's path (``models``) and one in fp32 (``reference``,
    fp32-stored weights), from the same stored state."""
    from diffcolor.archive.states import read_state
    from diffcolor.method.render import render_target, resolve_target
    from diffcolor.method.state import state_from_bytes

    state = state_from_bytes(read_state(state_prefix), state_prefix)
    prompt = resolve_target(models, state, target, None).model_prompt
    fast = render_target(models, state, prompt, config.render, config.align, seed=seed).rgb
    fp32 = render_target(reference, state, prompt, replace(config.render, autocast="off"), config.align, seed=seed).rgb
    difference = (fast - fp32).abs()
    return {"render_max_abs": float(difference.max()), "render_mean_abs": float(difference.mean())}


# ---------------------------------------------------------------------------
# Report.


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def format_table(report: dict) -> str:
    """The human-readable summary: per-stage seconds per variant, then per-loop rates."""
    lines = []
    device = report["device"]
    lines.append(f"DiffColor bench {report['date']}  model={report['model']}  preset={report['preset']}  "
                 f"{report['resolution']}x{report['resolution']}  device={device['type']} ({device.get('name', '')})")
    peak = report["peak"]
    lines.append(f"measured matmul peak: bf16 {peak['bf16']['tflops']:.2f} TFLOP/s, fp32 {peak['fp32']['tflops']:.2f} TFLOP/s"
                 + ("   (CPU: small n, a reference only)" if device["type"] != "cuda" else ""))
    columns = {"stage1_loop": "stage1 loop", "primary_sampling": "x_pri sample", "align": "align",
               "embedding": "embedding", "finetune": "finetune", "state_save": "state save",
               "render_cold": "render cold", "render_with_state_load": "render warm"}
    header = f"{'variant':<17}" + "".join(f"{label:>13}" for label in columns.values()) + f"{'s/image':>10}{'speedup':>9}"
    lines += ["", "seconds per stage (render = new-prompt render including the colour-state load)", header]
    reference = report["variants"].get("baseline", {}).get("seconds_per_image")
    for name, variant in report["variants"].items():
        cells = "".join(f"{variant['seconds'][c]:>13.3f}" for c in columns)
        speedup = f"{reference / variant['seconds_per_image']:>8.2f}x" if reference else f"{'-':>9}"
        mark = "*" if variant["extrapolated"] else " "
        lines.append(f"{name + mark:<17}{cells}{variant['seconds_per_image']:>10.3f}{speedup}")
    lines += ["", f"{'variant':<17}{'loop':<11}{'steps':>7}{'steps/s':>10}{'GFLOP/step':>12}{'ops/step':>10}"
              f"{'TFLOP/s':>10}{'%bf16 peak':>12}{'peak mem GiB':>14}"]
    for name, variant in report["variants"].items():
        for loop in LOOPS:
            counted = "flops_per_step" in variant
            flops = f"{variant['flops_per_step'][loop] / 1e9:>12.2f}" if counted else f"{'-':>12}"
            operators = f"{variant['operators_per_step'][loop]:>10}" if counted else f"{'-':>10}"
            achieved = f"{variant['achieved_tflops'][loop]:>10.3f}" if counted else f"{'-':>10}"
            share = (f"{100 * variant['achieved_tflops'][loop] / peak['bf16']['tflops']:>11.1f}%" if counted
                     else f"{'-':>12}")
            lines.append(f"{name:<17}{loop:<11}{variant['loop_steps'][loop]:>7}{variant['steps_per_s'][loop]:>10.2f}"
                         f"{flops}{operators}{achieved}{share}{_gib(variant['peak_memory_bytes'][loop]):>14}")
    floor = report.get("floor")
    if floor:
        lines += ["", f"FLOPs per image {floor['flops_per_image'] / 1e9:.1f} GFLOP -> floor {floor['seconds_at_measured_bf16_peak']:.3g} s "
                  f"at the measured bf16 peak, {floor['seconds_at_reference_peak']:.3g} s at {floor['reference_peak_tflops']} TFLOP/s"]
    check = report.get("fast_vs_fp32")
    if check:
        path = (f"{check['autocast']} autocast, {check['weight_dtype']} weights" if check["autocast"] != "None"
                else "no autocast on this device")
        lines.append(f"fast path ({path}) vs fp32: stage-1 loss rel. diff max "
                     f"{max(check['stage1_loss_rel_diff'].values()):.2e}, render max |d| {check['render_max_abs']:.2e} "
                     f"mean |d| {check['render_mean_abs']:.2e} (sRGB 0..1)")
    if any(v["extrapolated"] for v in report["variants"].values()):
        lines.append("* loops capped at --variant-steps and extrapolated to the recipe's steps at the measured steps/s")
    if "concurrent" in report:
        c = report["concurrent"]
        lines.append(f"concurrent: {c['processes']} processes on one device, {c['seconds_per_image']:.3f} s per image of throughput")
    return "\n".join(lines)


def _public(value):
    """The report without the private (underscore) entries, for JSON."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not str(k).startswith("_")}
    return value


def flops_only(args) -> dict:
    """FLOPs per step and the floor, counted on the meta device (nothing allocated or computed)."""
    device = torch.device("meta")
    models = load_bench_models(args.model, device)
    config = recipe_config(args.preset, steps=args.steps, sample_steps=args.sample_steps)
    side = args.resolution or _preset_side(config, models)
    report = {"date": _now(), "command": _command(), "model": args.model, "preset": args.preset, "resolution": side,
              "device": {"type": "meta"}, "variants": {}}
    for name in args.variants:
        variant = variant_config(config, name)
        flops = count_recipe_flops(models, variant, gray_scene(side), args.caption, args.target)
        report["variants"][name] = {"flops_per_step": flops.per_step, "operators_per_step": flops.operators_per_step,
                                    "guided_step": flops.guided_step,
                                    "once": flops.once, "flops_per_image": flops.per_image, "render_flops": flops.render,
                                    "loop_steps": loop_steps(variant),
                                    "floor_s_at_reference_peak": flops.per_image / (args.peak_tflops * 1e12),
                                    "render_floor_s_at_reference_peak": flops.render / (args.peak_tflops * 1e12)}
    report["reference_peak_tflops"] = args.peak_tflops
    return report


def format_flops_table(report: dict) -> str:
    lines = [f"FLOP count (meta device) model={report['model']} preset={report['preset']} "
             f"{report['resolution']}x{report['resolution']}; floor at {report['reference_peak_tflops']} TFLOP/s"]
    for name, variant in report["variants"].items():
        steps = variant["loop_steps"]
        parts = ", ".join(f"{loop} {variant['flops_per_step'][loop] / 1e12:.3f} TFLOP "
                          f"({variant['operators_per_step'][loop]} ops) x {steps[loop]}" for loop in LOOPS)
        lines.append(f"{name:<10} per step: {parts}; guided sampling step {variant['guided_step'] / 1e12:.3f} TFLOP")
        lines.append(f"{'':<10} per image {variant['flops_per_image'] / 1e12:.1f} TFLOP -> floor "
                     f"{variant['floor_s_at_reference_peak']:.2f} s; render {variant['render_flops'] / 1e12:.2f} TFLOP -> "
                     f"{variant['render_floor_s_at_reference_peak'] * 1e3:.1f} ms")
    return "\n".join(lines)


def _preset_side(config, models) -> int:
    """The working side of a square image: the preset's ``model_pixels``, else the model's native side."""
    return max(8, int(round(math.sqrt(models.working_pixels(config.model_pixels)) / 8)) * 8)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _command() -> str:
    return " ".join(["python -m diffcolor.tools.bench", *sys.argv[1:]]) if sys.argv and "bench" in sys.argv[0] else "python -m diffcolor.tools.bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m diffcolor.tools.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--model", default="sd15-random", help="a model folder, 'tiny', or 'sd15-random' (default)")
    parser.add_argument("--preset", default="paper-scale", help="smoke, default or paper-scale (recipe R, default)")
    parser.add_argument("--resolution", type=int, default=None, help="square side in pixels (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="override every loop's step count")
    parser.add_argument("--sample-steps", type=int, default=None, help="override the primary and render DDIM steps")
    parser.add_argument("--variants", default="default,baseline",
                        help=f"comma-separated, from {', '.join(VARIANT_NAMES)} (default: default,baseline)")
    parser.add_argument("--variant-steps", type=int, default=20,
                        help="steps per loop for variants other than default, extrapolated (0: run them in full)")
    parser.add_argument("--weight-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="frozen weights' storage for default and the ablations of it (auto: bf16 on CUDA, fp32 "
                             "elsewhere; bf16 on a CPU runs the CUDA default's numerics there)")
    parser.add_argument("--render-repeats", type=int, default=3, help="new-prompt renders timed (first is cold)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the two-step warm-up of each variant")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument("--no-check", action="store_true", help="skip the fast-vs-fp32 comparison")
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device and print the floor")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="reference bf16 peak for the floor (default: H100 SXM dense bf16, 989.4)")
    parser.add_argument("--concurrent", type=int, default=1,
                        help="also run the default recipe in N processes at once on the device and report throughput")
    parser.add_argument("--caption", default=CAPTION)
    parser.add_argument("--target", default=TARGET)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench.json", help="where to write the JSON report (default: bench.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--worker-barrier", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in args.variants:
        if name not in VARIANT_NAMES:
            parser.error(f"unknown variant {name!r}; choose from {', '.join(VARIANT_NAMES)}")
    if args.variant_steps == 0:
        args.variant_steps = None
    return args


def run_concurrent(args, processes: int) -> dict:
    """Runs the default recipe in ``processes`` processes sharing the device, started together; throughput."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="diffcolor-bench-concurrent-") as folder:
        barrier = Path(folder)
        commands = []
        for index in range(processes):
            commands.append([sys.executable, "-m", "diffcolor.tools.bench", "--device", str(args.device), "--model", args.model,
                             "--preset", args.preset, "--variants", "default", "--no-flops", "--no-check",
                             "--render-repeats", "2", "--json", str(barrier / f"worker-{index}.json"),
                             "--worker-barrier", str(barrier), "--seed", str(args.seed + index),
                             "--weight-dtype", args.weight_dtype,
                             "--threads", str(max(1, torch.get_num_threads() // processes))]
                            + (["--resolution", str(args.resolution)] if args.resolution else [])
                            + (["--steps", str(args.steps)] if args.steps else [])
                            + (["--sample-steps", str(args.sample_steps)] if args.sample_steps else []))
        workers = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for command in commands]
        while len(list(barrier.glob("ready-*"))) < processes:
            if any(worker.poll() not in (None, 0) for worker in workers):
                break
            time.sleep(0.2)
        (barrier / "go").touch()
        errors = [worker.communicate()[1].decode(errors="replace")[-2000:] for worker in workers]
        if any(worker.returncode for worker in workers):
            raise RuntimeError("a concurrent bench worker failed:\n" + "\n".join(errors))
        results = [json.loads((barrier / f"worker-{index}.json").read_text()) for index in range(processes)]
    spans = [r["worker_span"] for r in results]
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return {"processes": processes, "wall_s": wall, "seconds_per_image": wall / processes,
            "latency_s": [end - start for start, end in spans]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.flops_only:
        report = flops_only(args)
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(format_flops_table(report))
        return 0

    # 1. Device, model, recipe, image.
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = device
    bench_models = BenchModels(args.model, device)
    models = bench_models.get(args.weight_dtype)
    config = recipe_config(args.preset, steps=args.steps, sample_steps=args.sample_steps)
    side = args.resolution or _preset_side(config, models)
    if side % models.vae_scale_factor:
        raise SystemExit(f"--resolution {side} is not a multiple of the VAE factor {models.vae_scale_factor}")
    gray = gray_scene(side)
    report = {"date": _now(), "command": _command(), "model": args.model, "preset": args.preset, "resolution": side,
              "device": describe_device(device), "model_load_s": bench_models.load_s, "caption": args.caption,
              "target": args.target, "seed": args.seed, "variants": {}}

    if args.worker_barrier:  # one process of --concurrent: warm up, wait for the others, time the default recipe once
        barrier = Path(args.worker_barrier)
        run_variant(models, capped(config, 2), "warmup", gray, caption=args.caption, target=args.target, seed=args.seed,
                    variant_steps=None, render_repeats=1, warmup=False, flops=None)
        synchronize(device)
        (barrier / f"ready-{args.seed}").touch()
        while not (barrier / "go").exists():
            time.sleep(0.05)
        begin = time.time()
        run_variant(models, config, "default", gray, caption=args.caption, target=args.target, seed=args.seed,
                    variant_steps=None, render_repeats=args.render_repeats, warmup=False, flops=None)
        Path(args.json).write_text(json.dumps({"worker_span": [begin, time.time()]}), encoding="utf-8")
        return 0

    # 2. The device's matrix-product ceilings, measured here.
    report["peak"] = {"bf16": measure_matmul_peak(device, torch.bfloat16), "fp32": measure_matmul_peak(device, torch.float32)}

    # 3. Each variant: FLOPs of one step of each loop, then the timed recipe.
    #    (each on the models of its weight storage; the fast-vs-fp32 check compares with fp32-stored weights)
    for name in args.variants:
        variant = variant_config(config, name)
        variant_models = bench_models.get(variant_weight_dtype(name, args.weight_dtype))
        flops = None if args.no_flops else count_recipe_flops(variant_models, variant, gray, args.caption, args.target)
        check = name == "default" and not args.no_check
        result = run_variant(variant_models, variant, name, gray, caption=args.caption, target=args.target,
                             seed=args.seed, variant_steps=args.variant_steps, render_repeats=args.render_repeats,
                             warmup=not args.no_warmup, flops=flops,
                             reference=bench_models.get("fp32") if check else None)
        report["variants"][name] = result
        if name == "default" and flops is not None:
            report["floor"] = {
                "flops_per_image": flops.per_image,
                "render_flops": flops.render,
                "seconds_at_measured_bf16_peak": flops.per_image / (report["peak"]["bf16"]["tflops"] * 1e12),
                "seconds_at_reference_peak": flops.per_image / (args.peak_tflops * 1e12),
                "reference_peak_tflops": args.peak_tflops,
            }

    # 4. Speedup over the baseline, and the fast path against fp32 on the same state.
    if "baseline" in report["variants"] and "default" in report["variants"]:
        report["speedup_over_baseline"] = (report["variants"]["baseline"]["seconds_per_image"]
                                           / report["variants"]["default"]["seconds_per_image"])
    if "default" in report["variants"] and not args.no_check:
        check = stage1_loss_difference(models, bench_models.get("fp32"), config, gray, caption=args.caption, seed=args.seed)
        report["fast_vs_fp32"] = check | report["variants"]["default"]["_render_difference"]

    # 5. Throughput with several processes on the device.
    if args.concurrent > 1:
        report["concurrent"] = run_concurrent(args, args.concurrent)

    Path(args.json).write_text(json.dumps(_public(report), indent=2, default=str), encoding="utf-8")
    print(format_table(report))
    print(f"\nJSON report: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
