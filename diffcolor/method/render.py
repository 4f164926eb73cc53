"""Render a target prompt from a stored colour state, with no fine-tuning.

``e = eta * e_tgt + (1 - eta) * e_opt`` (the paper's embedding interpolation),
then DDIM sampling with classifier-free guidance from the gray latent noised to
``strength``, with the UNet carrying the item's stage-2 adapter, and alignment
of the result to the gray image. A target is a free prompt or a colour map, from
which the token-aligned prompt is built (:func:`diffcolor.common.captions.build_target_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffcolor.common.captions import build_target_prompt
from diffcolor.common.errors import PromptError, StateError
from diffcolor.method.align import AlignConfig, Alignment, align_chroma
from diffcolor.method.diffusion import (
    decode_latent,
    encode_latent,
    encode_prompts,
    sample_from,
)
from diffcolor.method.models import Models
from diffcolor.method.performance import (
    PerformanceConfig,
    apply_memory_format,
    autocast_context,
    check_performance,
)
from diffcolor.method.stage2 import check_token_alignment
from diffcolor.method.state import ColorState
from diffcolor.method.training import load_trained_unet, phase_generator


@dataclass(frozen=True)
class RenderConfig:
    """Render hyper-parameters."""

    eta: float = 0.7  # paper: interpolation weight of e_tgt; the value is ours
    steps: int = 50  # recipe R: 50 DDIM steps
    guidance: float = 7.5  # ours: SD's usual classifier-free guidance
    strength: float = 0.8  # ours: how far the gray latent is noised before sampling
    # Speed only (flat fields, not a PerformanceConfig, so the config stays a JSON-able flat record):
    autocast: str = "auto"  # "auto": bf16 autocast on CUDA, off elsewhere; "bf16"; "off" (see diffcolor.method.performance)
    channels_last: bool | None = None  # UNet/VAE convolutions in NHWC; None: on CUDA only


@dataclass
class Render:
    """One rendered target at model resolution, aligned to the gray image."""

    target_prompt: str
    rgb: torch.Tensor  # (1, 3, h, w) as sampled, [0, 1]
    alignment: Alignment


def resolve_target(models: Models, state: ColorState, target: str | None, color_map: dict[str, str] | None) -> str:
    """The prompt to render: ``target`` as given, or the aligned prompt built from ``color_map``.

    Raises PromptError for both or neither, an empty prompt, or a colour map
    that cannot be token-aligned.
    """
    if color_map and target:
        raise PromptError("give a target prompt or a colour map, not both")
    if color_map:
        prompt = build_target_prompt(state.rewritten, color_map)
        check_token_alignment(models, state.rewritten, prompt)
        return prompt
    if not target or not target.strip():
        raise PromptError("the target prompt is empty")
    return target.strip()


@torch.no_grad()
def render_target(
    models: Models,
    state: ColorState,
    target_prompt: str,
    config: RenderConfig = RenderConfig(),
    align_config: AlignConfig = AlignConfig(),
    *,
    seed: int,
) -> Render:
    """Renders ``target_prompt`` from ``state``. Raises StateError for a state of other models."""
    # 1. Check that the state belongs to the loaded models.
    if state.model_hash != models.model_hash:
        raise StateError("the colour state was made with other model weights (model hash differs)")
    if not 0.0 <= config.eta <= 1.0:
        raise PromptError(f"eta must be in [0, 1], got {config.eta}")
    performance = PerformanceConfig(autocast=config.autocast, channels_last=config.channels_last)
    check_performance(performance, models)
    apply_memory_format([models.unet, models.vae], performance, models.device)

    # 2. Interpolate the target's embedding with the optimised one.
    target = encode_prompts(models, [target_prompt])
    embedding = config.eta * target + (1.0 - config.eta) * state.embedding.to(target.device, target.dtype)

    # 3. Sample with the item's adapter from the noised gray latent.
    trainable = load_trained_unet(models.unet, state.adapter_config, state.adapter, name="diffcolor_render")
    try:
        gray = state.gray.to(models.device)
        start = encode_latent(models, gray.expand(-1, 3, -1, -1))  # once, before the sampling loop (returned in fp32)
        with autocast_context(performance.autocast, models):
            latent = sample_from(
                models,
                trainable.unet,
                start,
                strength=config.strength,
                steps=config.steps,
                guidance=config.guidance,
                condition=embedding,
                generator=phase_generator(seed, f"render:{target_prompt}"),
            )
            rgb = decode_latent(models, latent).float()
    finally:
        trainable.release()

    # 4. Align the render to the gray image.
    return Render(target_prompt=target_prompt, rgb=rgb.cpu(), alignment=align_chroma(models, rgb, gray, align_config))
