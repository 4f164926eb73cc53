"""How the fine-tune loops and samplers run fast, without changing what they compute.

:class:`PerformanceConfig` is a field of each stage's config. Its defaults
resolve per device: on CUDA the fast path (bf16 autocast, fused AdamW,
channels_last) is on; on any other device every option resolves to the plain
fp32 eager path, so CPU runs (tests, CI, bit-identical resume) are exactly
what they were before these options existed.

Numerics (why bf16 autocast is safe here): every *trained* tensor stays fp32
(the LoRA adapters, the full-fine-tune copy, the optimised embedding) and the
optimiser updates fp32 master weights, because the learning rates (1e-4, 1e-3)
are far below bf16's resolution relative to the weights (about 4e-3) and a
bf16 weight would simply not move. Autocast only runs the matrix products and
convolutions of the forward pass in bf16; the losses are reduced in fp32, and
the encodes done once per item (image latents, prompt embeddings) stay fp32.
The frozen base weights also stay fp32 (they are shared with the alignment and
metric code, which runs outside autocast), so autocast casts them once per
forward; spec section 8's bench measures that cost.

SDPA attention needs no option: diffusers' ``AttnProcessor2_0`` and
transformers' ``sdpa`` attention are already what the models load with.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

AUTOCAST_CHOICES = ("auto", "bf16", "off")


@dataclass(frozen=True)
class PerformanceConfig:
    """Speed options of one stage. Defaults: fast on CUDA, plain fp32 eager elsewhere."""

    autocast: str = "auto"  # "auto": bf16 autocast on CUDA, off elsewhere; "bf16" (also on CPU); "off": fp32
    cache_latents: bool = True  # encode the image with the VAE once per loop; False re-encodes every step (naive baseline)
    cache_text: bool = True  # stage 1: encode c and C- (SD text encoder, CLIP text) once; False re-encodes every step
    fused_optimizer: bool | None = None  # fused AdamW (one kernel for all tensors); None: on CUDA, off elsewhere
    channels_last: bool | None = None  # UNet and VAE convolutions in NHWC (faster cuDNN kernels); None: on CUDA
    compile_mode: str | None = None  # torch.compile mode for the trained UNet ("default", "max-autotune-no-cudagraphs",
    #                                  "reduce-overhead"); None: eager. Off by default: see docs/PERFORMANCE.md


# The naive baseline of spec section 8: fp32, everything re-encoded every step, no fused kernels.
# (The full fine-tune half of the baseline is the stage's AdapterConfig(mode="full").)
NAIVE = PerformanceConfig(
    autocast="off", cache_latents=False, cache_text=False, fused_optimizer=False, channels_last=False, compile_mode=None
)


def check_performance(config: PerformanceConfig) -> None:
    """Raises ValueError naming a bad option."""
    if config.autocast not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast must be one of {AUTOCAST_CHOICES}, got {config.autocast!r}")


def autocast_dtype(autocast: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype an ``autocast`` setting resolves to on ``device`` (None: no autocast)."""
    if autocast not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast must be one of {AUTOCAST_CHOICES}, got {autocast!r}")
    device = torch.device(device)
    if autocast == "bf16" or (autocast == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_context(autocast: str, device: torch.device):
    """A ``torch.autocast`` region for the resolved dtype, or a no-op context."""
    device = torch.device(device)
    dtype = autocast_dtype(autocast, device)
    if dtype is None or device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _on_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def make_adamw(parameters, *, lr: float, config: PerformanceConfig, device: torch.device, **kwargs) -> torch.optim.AdamW:
    """AdamW over ``parameters``; fused where ``config`` (or its CUDA default) asks for it.

    With ``fused_optimizer`` unresolved on a non-CUDA device this is exactly
    ``torch.optim.AdamW(parameters, lr=lr, **kwargs)``.
    """
    fused = config.fused_optimizer if config.fused_optimizer is not None else _on_cuda(device)
    if fused:
        return torch.optim.AdamW(parameters, lr=lr, fused=True, **kwargs)
    return torch.optim.AdamW(parameters, lr=lr, **kwargs)  # torch's own choice (foreach on CUDA, a loop on CPU)


def apply_memory_format(modules: list[torch.nn.Module], config: PerformanceConfig, device: torch.device) -> None:
    """Puts the convolution weights of ``modules`` in channels_last (or back) as ``config`` resolves.

    Changes layout only, never values. Does nothing when ``channels_last`` is
    unset and the device is not CUDA, so CPU runs are untouched.
    """
    if config.channels_last is None and not _on_cuda(device):
        return
    wanted = True if config.channels_last is None else config.channels_last
    memory_format = torch.channels_last if wanted else torch.contiguous_format
    for module in modules:
        module.to(memory_format=memory_format)


def maybe_compile(module: torch.nn.Module, config: PerformanceConfig):
    """``torch.compile(module, mode=...)`` when ``compile_mode`` is set, else ``module`` itself."""
    if config.compile_mode is None:
        return module
    return torch.compile(module, mode=config.compile_mode)
