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
The frozen base weights are a load-time choice (:func:`frozen_weight_dtype`,
``load_models(weight_dtype=...)``): on CUDA the weights and biases of every
linear layer and convolution are stored in bf16, because autocast would cast
them to bf16 at every use anyway (a frozen weight's cast is not cached: one
extra kernel and a full read and write of the weight per use). Stored in bf16,
a step computes the same bits as casting fp32 weights under autocast (tested
on a CPU), with about a fifth fewer operators per step and half the weight
memory (docs/PERFORMANCE.md). Norms, embeddings and every trained tensor stay fp32. Every model call
then runs under bf16 autocast (:func:`frozen_weights_context`), including the
encodes done once per item, which return fp32.

SDPA attention needs no option: diffusers' ``AttnProcessor2_0`` and
transformers' ``sdpa`` attention are already what the models load with.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from diffcolor.common.errors import UserError

AUTOCAST_CHOICES = ("auto", "bf16", "off")
WEIGHT_DTYPE_CHOICES = ("auto", "bf16", "fp32")
# The layers whose weights autocast casts to bf16 at every use: their stored copy may as well be bf16.
MATRIX_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d)


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
    loss_every: int = 10  # read the losses to the host every N steps (one device sync per N; same results)


# The naive baseline of docs/DESIGN.md §8: fp32, everything re-encoded every step, no fused kernels.
# (The full fine-tune half of the baseline is the stage's AdapterConfig(mode="full").)
NAIVE = PerformanceConfig(
    autocast="off", cache_latents=False, cache_text=False, fused_optimizer=False, channels_last=False, compile_mode=None,
    loss_every=1,
)


def check_performance(config: PerformanceConfig, models) -> None:
    """Raises ValueError naming a bad option, or an autocast setting the models' weight storage cannot run."""
    autocast_dtype(config.autocast, models.device, models.weight_dtype)


def autocast_dtype(autocast: str, device: torch.device, weight_dtype: torch.dtype = torch.float32) -> torch.dtype | None:
    """The autocast dtype an ``autocast`` setting resolves to on ``device`` (None: no autocast).

    With frozen weights stored in bf16 (``weight_dtype``) every setting but
    "off" resolves to bf16, and "off" raises ValueError: fp32 compute needs
    fp32 weights.
    """
    if autocast not in AUTOCAST_CHOICES:
        raise UserError(f"autocast must be one of {AUTOCAST_CHOICES}, got {autocast!r}")
    device = torch.device(device)
    if weight_dtype == torch.bfloat16:
        if autocast == "off":
            raise UserError("autocast='off' computes in fp32, but the models' frozen weights are stored in bf16: "
                            "load them with weight_dtype='fp32' for an fp32 run")
        return torch.bfloat16
    if autocast == "bf16" or (autocast == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_context(autocast: str, models):
    """A ``torch.autocast`` region for the dtype ``autocast`` resolves to on ``models``, or a no-op context."""
    dtype = autocast_dtype(autocast, models.device, models.weight_dtype)
    if dtype is None or models.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=models.device.type, dtype=dtype)


def frozen_weight_dtype(weight_dtype: str, device: torch.device) -> torch.dtype:
    """The storage dtype of the frozen linear and convolution weights: "auto" is bf16 on CUDA, fp32 elsewhere."""
    if weight_dtype not in WEIGHT_DTYPE_CHOICES:
        raise UserError(f"weight_dtype must be one of {WEIGHT_DTYPE_CHOICES}, got {weight_dtype!r}")
    if weight_dtype == "bf16" or (weight_dtype == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return torch.float32


def store_frozen_weights(modules: list[torch.nn.Module], dtype: torch.dtype) -> None:
    """Casts the weight and bias of every linear layer and convolution in ``modules`` to ``dtype``, in place.

    Norms, embeddings and other parameters keep their dtype (autocast runs
    norms in fp32). Call it on frozen models before any adapter is added (an
    adapter's own layers would be cast too).
    """
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, MATRIX_LAYERS):
                layer.to(dtype)


def frozen_weights_context(models):
    """The region every model call runs in: bf16 autocast when the frozen weights are stored in bf16, else none.

    (fp32 inputs meet bf16 weights only through autocast; inside a stage's own
    autocast region this nests as a no-op.)
    """
    if models.weight_dtype != torch.bfloat16 or models.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=models.device.type, dtype=torch.bfloat16)


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
