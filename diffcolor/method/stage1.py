"""Stage 1: colorization with a generative colour prior (DiffColor, section 3.1).

The gray image ``G`` is encoded once to ``z_g``. For ``steps`` iterations the
UNet (a LoRA adapter by default) is fine-tuned so that its one-step estimate of
the clean image from ``z_g`` noised to a random timestep, decoded by the VAE,

- is closer in CLIP space to the context prompt ``c`` than to anti-colour
  prompts ``C-`` (contrastive loss ``L_con``, the paper's key term),
- keeps the luminance of ``G`` (``L_lum``, L1 on CIE L*/100),
- while the standard denoising loss ``L_diff`` keeps the UNet a denoiser.

``L = w_con * L_con + l_lum * L_lum + l_diff * L_diff``. Then the primary
colourisation ``x_pri`` is sampled from ``z_g`` noised to ``primary_strength``
with the fine-tuned UNet. Which parts are the paper's and which are ours is
said per field of :class:`Stage1Config`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from diffcolor.common.errors import PromptError, UserError
from diffcolor.method.color import gray_lightness, lightness
from diffcolor.method.diffusion import (
    check_prompt_fits,
    clip_image_features,
    clip_text_features,
    decode_latent,
    denoising_steps,
    denoising_target,
    draw_noise_and_timesteps,
    encode_latent,
    encode_prompts,
    noise_scheduler,
    predicted_x0,
    sample_from,
)
from diffcolor.method.models import Models
from diffcolor.method.performance import (
    PerformanceConfig,
    apply_memory_format,
    autocast_context,
    check_performance,
    make_adamw,
    maybe_compile,
)
from diffcolor.method.training import (
    AdapterConfig,
    CheckpointPolicy,
    CheckpointStore,
    LoopResult,
    learning_rate,
    make_trainable_unet,
    phase_generator,
    run_resumable_loop,
)

ANTI_COLOR_PROMPTS = (  # the paper's examples, plus two of ours for archival material
    "a grayscale photograph",
    "a picture with scratches",
    "brownish average colors for objects",
    "a faded, desaturated photo",
    "a sepia-toned photo",
)


@dataclass(frozen=True)
class Stage1Config:
    """Stage 1 hyper-parameters. The paper gives the losses, not their values."""

    steps: int = 500  # recipe R (docs/DESIGN.md §8); the paper's pseudo-code uses up to 1500
    learning_rate: float | None = None  # ours: AdamW; None: the adapter mode's default (training.DEFAULT_LEARNING_RATES)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # paper: fine-tune the UNet; ours: LoRA by default
    timestep_range: tuple[int, int] = (200, 700)  # ours: of 1000 training timesteps; high enough to let colour change
    temperature: float = 0.07  # ours: tau of L_con, CLIP's learned temperature at init
    w_con: float = 1.0  # paper: L_con is the main term
    l_lum: float = 2.0  # ours: weight of L_lum (L*/100 units)
    l_diff: float = 1.0  # ours: weight of L_diff
    anti_prompts: tuple[str, ...] = ANTI_COLOR_PROMPTS  # paper's C-
    max_grad_norm: float = 1.0  # ours
    primary_strength: float = 0.6  # ours: how far z_g is noised before sampling x_pri
    primary_steps: int = 30  # ours: DDIM steps for x_pri
    primary_guidance: float = 5.0  # ours: classifier-free guidance for x_pri
    # ours: decode the loop's x0 estimate for L_con and L_lum at about this short side (pixels), its latent resized
    # (antialiased) first; CLIP sees 224 px, and the VAE decode at 512 px is ~40 % of an SD 1.5 image's FLOPs.
    # None: decode at the working size. Off until a GPU run with real weights compares the two (docs/REAL_WEIGHTS.md).
    loss_decode_side: int | None = None
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)  # ours: speed only; CPU defaults = plain fp32


@dataclass
class Stage1Result:
    """The primary colourisation and how the fit went."""

    primary: torch.Tensor  # (1, 3, h, w) sRGB in [0, 1] at model resolution, not yet aligned
    loop: LoopResult


@dataclass
class Stage1Inputs:
    """Everything a stage-1 step needs, computed once per item."""

    latent: torch.Tensor  # z_g
    gray_l: torch.Tensor  # L*/100 of G, (1, 1, h, w)
    condition: torch.Tensor  # SD text embedding of c
    clip_text: torch.Tensor  # CLIP features of [c, *C-]


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """``-log(exp(s+/tau) / (exp(s+/tau) + sum_k exp(s-_k/tau)))``; row 0 of ``text_features`` is positive."""
    logits = image_features @ text_features.T / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def check_inputs(models: Models, gray: torch.Tensor, caption: str, config: Stage1Config) -> None:
    """Raises on inputs stage 1 cannot use, naming the bad value."""
    if gray.ndim != 4 or gray.shape[:2] != (1, 1):
        raise ValueError(f"gray must be (1, 1, h, w), got {tuple(gray.shape)}")
    if not caption or not caption.strip():
        raise PromptError("the caption is empty: stage 1 needs a context prompt")
    check_prompt_fits(models, caption, "the caption", clip=True)
    if not config.anti_prompts:
        raise UserError("anti_prompts is empty: L_con needs at least one negative prompt")
    for number, prompt in enumerate(config.anti_prompts, start=1):
        check_prompt_fits(models, prompt, f"anti-colour prompt {number}", clip=True)
    denoising_steps(config.primary_steps, config.primary_strength)  # at least one step, as diffusers counts them
    side = config.loss_decode_side
    if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 8):
        raise UserError(f"loss_decode_side must be null or a whole number of pixels of at least 8, got {side!r}")
    low, high = config.timestep_range
    if not 0 <= low < high <= 1000:
        raise UserError(f"timestep_range must satisfy 0 <= low < high <= 1000, got {config.timestep_range}")
    check_performance(config.performance, models)


def prepare_inputs(models: Models, gray: torch.Tensor, caption: str, config: Stage1Config) -> Stage1Inputs:
    """Encodes G, c and C- once (the loop never re-encodes them)."""
    gray = gray.to(models.device)
    return Stage1Inputs(
        latent=encode_latent(models, gray.expand(-1, 3, -1, -1)),
        gray_l=gray_lightness(gray) / 100.0,
        condition=encode_prompts(models, [caption]),
        clip_text=clip_text_features(models, [caption, *config.anti_prompts]),
    )


def step_inputs(models: Models, inputs: Stage1Inputs, gray: torch.Tensor, caption: str, config: Stage1Config) -> Stage1Inputs:
    """What one step reads: the cached encodings, or fresh ones where the performance config turns caching off.

    Re-encoding is the naive baseline of docs/DESIGN.md §8 (same values, more work).
    """
    performance = config.performance
    if performance.cache_latents and performance.cache_text:
        return inputs
    gray = gray.to(models.device)
    return Stage1Inputs(
        latent=inputs.latent if performance.cache_latents else encode_latent(models, gray.expand(-1, 3, -1, -1)),
        gray_l=inputs.gray_l,
        condition=inputs.condition if performance.cache_text else encode_prompts(models, [caption]),
        clip_text=inputs.clip_text if performance.cache_text else clip_text_features(models, [caption, *config.anti_prompts]),
    )


def stage1_losses(models: Models, unet: torch.nn.Module, inputs: Stage1Inputs, noise: torch.Tensor,
                  timesteps: torch.Tensor, config: Stage1Config, *, scheduler=None) -> dict[str, torch.Tensor]:
    """The stage-1 loss terms for one noise draw; differentiable in the UNet's trainable tensors.

    ``scheduler`` is the noise schedule (built from the bundle when None; a
    loop passes one built once, which saves ~2 ms of CPU per step).
    """
    scheduler = scheduler if scheduler is not None else noise_scheduler(models)
    noisy = scheduler.add_noise(inputs.latent, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=inputs.condition).sample
    # .float(): under autocast the decoder returns bf16; the colour maths and losses stay fp32 (a no-op in fp32).
    x0 = loss_latent(predicted_x0(scheduler, noisy, timesteps, prediction), config.loss_decode_side,
                     models.vae_scale_factor)
    decoded = decode_latent(models, x0).float()
    con = contrastive_loss(clip_image_features(models, decoded), inputs.clip_text, config.temperature)
    gray_l = inputs.gray_l
    if gray_l.shape[-2:] != decoded.shape[-2:]:  # the reduced decode: G's L* at its size
        gray_l = F.interpolate(gray_l, size=decoded.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    lum = (lightness(decoded) / 100.0 - gray_l).abs().mean()
    diff = F.mse_loss(prediction.float(), denoising_target(scheduler, inputs.latent, noise, timesteps).float())
    total = config.w_con * con + config.l_lum * lum + config.l_diff * diff
    return {"total": total, "con": con, "lum": lum, "diff": diff}


def loss_latent(latent: torch.Tensor, side: int | None, vae_scale_factor: int) -> torch.Tensor:
    """The latent the losses decode: ``latent`` itself, or resized so its decode's short side is about ``side`` pixels.

    Only ever smaller (a ``side`` at or above the working size changes
    nothing); aspect kept; bilinear with antialiasing, differentiable.
    """
    if side is None:
        return latent
    height, width = latent.shape[-2:]
    cells = max(1, round(side / vae_scale_factor))
    if cells >= min(height, width):
        return latent
    scale = cells / min(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(latent, size=size, mode="bilinear", align_corners=False, antialias=True)


def stage1_step(models: Models, unet: torch.nn.Module, inputs: Stage1Inputs, gray: torch.Tensor, caption: str,
                config: Stage1Config, generator: torch.Generator, scheduler) -> dict[str, torch.Tensor]:
    """The forward half of one loop step: draw noise and timestep from ``generator``, the losses under autocast."""
    noise, timesteps = draw_noise_and_timesteps(inputs.latent, config.timestep_range, generator)
    current = step_inputs(models, inputs, gray, caption, config)
    with autocast_context(config.performance.autocast, models):
        return stage1_losses(models, unet, current, noise, timesteps, config, scheduler=scheduler)


def fingerprint(models: Models, gray: torch.Tensor, caption: str, config: Stage1Config, seed: int) -> str:
    """Identifies a stage-1 fit: a checkpoint of another fit is never resumed."""
    digest = hashlib.sha256()
    digest.update(json.dumps([asdict(config), caption, seed, models.model_hash], sort_keys=True, default=str).encode())
    digest.update(gray.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def fit_color_prior(
    models: Models,
    gray: torch.Tensor,
    caption: str,
    config: Stage1Config = Stage1Config(),
    *,
    seed: int,
    checkpoints: CheckpointStore | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> Stage1Result:
    """Stage 1: fine-tunes a colour prior on ``gray`` and samples the primary colourisation.

    ``gray`` is (1, 1, h, w) in [0, 1] at model resolution (sides multiples of
    the VAE factor). ``checkpoints`` is where the fine-tune checkpoints live
    (None: none); ``progress(step, losses)`` follows the loop. Returns the
    unaligned primary image and the loop's history. The base UNet is left
    unchanged. Raises PromptError on an empty caption.
    """
    # 1. Check inputs.
    check_inputs(models, gray, caption, config)

    # 2. Encode G, c and C- once.
    # (The convolutions' memory layout first: every encode of the fit then runs in it, whatever ran before.)
    performance = config.performance
    apply_memory_format([models.unet, models.vae], performance, models.device)
    inputs = prepare_inputs(models, gray, caption, config)

    # 3. A trainable UNet: a fresh LoRA adapter on the shared base (default) or a private copy.
    generator = phase_generator(seed, "stage1")
    trainable = make_trainable_unet(models.unet, config.adapter, name="diffcolor_stage1", generator=generator)
    try:
        optimizer = make_adamw(trainable.parameters.values(), lr=learning_rate(config.adapter, config.learning_rate), config=performance, device=models.device)
        scheduler = noise_scheduler(models)
        unet = maybe_compile(trainable.unet, performance)

        # 4. Fine-tune with L = w_con L_con + l_lum L_lum + l_diff L_diff, resumably
        #    (forward under autocast where configured; backward and the update outside it, on fp32 tensors).
        def step(_: int) -> dict[str, torch.Tensor]:
            return stage1_step(models, unet, inputs, gray, caption, config, generator, scheduler)

        trainable.unet.train()
        loop = run_resumable_loop(
            steps=config.steps,
            step_fn=step,
            parameters=trainable.parameters,
            optimizer=optimizer,
            generator=generator,
            checkpoints=checkpoints,
            fingerprint=fingerprint(models, gray, caption, config, seed),
            policy=config.checkpoints,
            max_grad_norm=config.max_grad_norm,
            progress=progress,
            loss_every=performance.loss_every,
        )
        trainable.unet.eval()

        # 5. Sample the primary colourisation x_pri from z_g with the fine-tuned UNet.
        primary = sample_primary(models, trainable.unet, inputs, config, seed)
    finally:
        # 6. Release the stage-1 adapter: the base UNet goes back to how it was loaded.
        trainable.release()
    return Stage1Result(primary=primary.float().cpu(), loop=loop)


def sample_primary(models: Models, unet: torch.nn.Module, inputs: Stage1Inputs, config: Stage1Config,
                   seed: int) -> torch.Tensor:
    """``x_pri``: ``z_g`` noised to ``primary_strength`` and denoised by the fine-tuned ``unet``, decoded."""
    with autocast_context(config.performance.autocast, models):
        latent = sample_from(
            models,
            unet,
            inputs.latent,
            strength=config.primary_strength,
            steps=config.primary_steps,
            guidance=config.primary_guidance,
            condition=inputs.condition,
            generator=phase_generator(seed, "primary"),
        )
        with torch.no_grad():
            return decode_latent(models, latent)
