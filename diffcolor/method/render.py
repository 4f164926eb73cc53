"""Render a target prompt from a stored colour state, with no fine-tuning.

``e = alpha * e_tgt + (1 - alpha) * e_opt`` (the paper's embedding interpolation;
Imagic calls its weight eta, a name this code keeps for DDIM's own eta, which is 0:
the sampler is deterministic),
then DDIM sampling with classifier-free guidance from the gray latent noised to
``strength``, with the UNet carrying the item's stage-2 adapter, and alignment
of the result to the gray image.

Interpolating position by position only means something when the target's
tokens line up with ``c'``'s: colour words in identifier slots, every other
token the same. :func:`resolve_target` therefore turns what a person asked for
into the model's prompt and says how it lines up (:class:`Target`):

- a colour map fills the slots of the words it names (``color_map``);
- a free prompt that is the caption with colour words added in front of its
  content words gets those colours put into the slots (``aligned``): "a brown
  dog on a green bench" for "a dog on a bench" renders "a brown dog on a
  green bench" in ``c'``'s token positions;
- any other free prompt is used as written (``unaligned``), with a warning
  saying why, which the result records.

People see what they asked for (the prompt as written, or the caption with the
colour map's colours); the identifier token appears only in the model's prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffcolor.common.captions import (
    build_target_prompt,
    describe_color_map,
    prompt_slots,
    slot_prompt,
)
from diffcolor.common.errors import PromptError, StateError, UserError
from diffcolor.method.align import AlignConfig, Alignment, align_chroma
from diffcolor.method.diffusion import (
    check_prompt_fits,
    decode_latent,
    denoising_steps,
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

# ours: the range of alpha a render accepts. Above 1 the embedding extrapolates past the target's, as Imagic
# allows (diffusers' Imagic pipeline defaults to 1.2 on SD); beyond 1.5 renders leave the photograph.
ALPHA_RANGE = (0.0, 1.5)
# How a render's prompt lines up with the rewritten caption (Target.alignment; "caption": the primary colourisation).
ALIGNMENTS = ("color_map", "aligned", "unaligned", "caption")


@dataclass(frozen=True)
class RenderConfig:
    """Render hyper-parameters."""

    alpha: float = 0.7  # paper: interpolation weight of e_tgt (Imagic's eta); the value is ours; above 1 extrapolates
    steps: int = 50  # recipe R: 50 DDIM steps
    guidance: float = 7.5  # ours: SD's usual classifier-free guidance
    strength: float = 0.8  # ours: how far the gray latent is noised before sampling
    # Speed only (flat fields, not a PerformanceConfig, so the config stays a JSON-able flat record):
    autocast: str = "auto"  # "auto": bf16 autocast on CUDA, off elsewhere; "bf16"; "off" (see diffcolor.method.performance)
    channels_last: bool | None = None  # UNet/VAE convolutions in NHWC; None: on CUDA only

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        denoising_steps(self.steps, self.strength)  # at least one step, as diffusers counts them


@dataclass
class Render:
    """One rendered target at model resolution, aligned to the gray image."""

    target_prompt: str
    rgb: torch.Tensor  # (1, 3, h, w) as sampled, [0, 1]
    alignment: Alignment


@dataclass(frozen=True)
class Target:
    """What a render was asked for and what the model is given."""

    prompt: str  # for people: the prompt as written, or the caption with the colour map's colours
    model_prompt: str  # for the text encoder: may carry the identifier token in the slots left uncoloured
    alignment: str  # one of ALIGNMENTS
    warning: str | None = None  # why a free prompt could not be aligned


def check_alpha(alpha: float) -> None:
    """Raises ValueError unless ``alpha`` lies in :data:`ALPHA_RANGE`."""
    low, high = ALPHA_RANGE
    if not low <= alpha <= high:
        raise UserError(f"alpha must be in [{low}, {high}] (above 1 extrapolates past the target), got {alpha}")


def resolve_target(models: Models, state: ColorState, target: str | None, color_map: dict[str, str] | None) -> Target:
    """The :class:`Target` of a free prompt or a colour map (see the module docstring).

    Raises PromptError for both or neither, an empty prompt, or a colour map
    that cannot be token-aligned. A free prompt that cannot be aligned is no
    error: it renders as written, with the reason in ``warning``.
    """
    if color_map and target:
        raise PromptError("give a target prompt or a colour map, not both")
    if color_map:
        prompt = build_target_prompt(state.rewritten, color_map)
        check_token_alignment(models, state.rewritten, prompt)
        return Target(describe_color_map(state.rewritten, color_map), prompt, "color_map")
    if not target or not target.strip():
        raise PromptError("the target prompt is empty")
    target = target.strip()
    try:
        prompt = slot_prompt(state.rewritten, prompt_slots(state.rewritten, target))
        check_token_alignment(models, state.rewritten, prompt)
    except PromptError as why:
        check_prompt_fits(models, target, "the target prompt")  # rendered as written: it must fit as written
        return Target(target, target, "unaligned", warning=(
            f"target prompt {target!r} does not line up with the caption {state.rewritten.caption!r} ({why}): it is "
            "interpolated as written, position by position, so its colours may not land on the words they name; "
            "add single colour words in front of the caption's words, or give a colour map"))
    return Target(target, prompt, "aligned")


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
    """Renders the model's prompt ``target_prompt`` (a :class:`Target`'s ``model_prompt``) from ``state``.

    Raises StateError for a state of other models, ValueError for an alpha
    outside :data:`ALPHA_RANGE`.
    """
    # 1. Check that the state belongs to the loaded models.
    if state.model_hash != models.model_hash:
        raise StateError("the colour state was made with other model weights (model hash differs)")
    check_alpha(config.alpha)
    performance = PerformanceConfig(autocast=config.autocast, channels_last=config.channels_last)
    check_performance(performance, models)
    apply_memory_format([models.unet, models.vae], performance, models.device)

    # 2. Interpolate the target's embedding with the optimised one.
    target = encode_prompts(models, [target_prompt])
    embedding = config.alpha * target + (1.0 - config.alpha) * state.embedding.to(target.device, target.dtype)

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
