"""Small, shared operations on the loaded models: resize for, encode, decode, noise, sample, CLIP.

These are the building blocks the stages are written in. They follow the
diffusers Stable Diffusion pipeline (prompt encoding, VAE scaling,
img2img-style DDIM sampling with classifier-free guidance) but work on
tensors the stages already hold, so latents and embeddings are computed once
per item and reused by every step.

Every model call runs in :func:`~diffcolor.method.performance.frozen_weights_context`
(bf16 autocast when the frozen weights are stored in bf16, nothing otherwise),
and the encodes done once per item return fp32 either way.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffcolor.common.errors import UserError
from diffcolor.common.pixels import describe
from diffcolor.method.libraries import model_libraries
from diffcolor.method.models import Models, prompt_limit
from diffcolor.method.performance import frozen_weights_context


def check_prompt_fits(models: Models, text: str, what: str, *, clip: bool = False, hide: str | None = None) -> None:
    """Raises PromptError, naming the words that would be cut off, when ``text`` is longer than the SD text encoder
    reads (and, with ``clip``, than CLIP's text model reads): nothing is ever truncated silently.

    ``hide`` (the identifier) is left out of the words named."""
    prompt_limit(models.tokenizer).check(text, what, hide)
    if clip:
        prompt_limit(models.clip_tokenizer).check(text, f"{what} (for CLIP)")


def tokenize(models: Models, prompts: list[str]) -> torch.Tensor:
    """Token ids of ``prompts`` padded to the text encoder's length (77 for SD).

    Truncation here only ever cuts padding: every prompt that reaches it was
    checked with :func:`check_prompt_fits`.
    """
    return models.tokenizer(
        prompts, padding="max_length", max_length=models.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(models: Models, prompts: list[str]) -> torch.Tensor:
    """SD text-encoder hidden states, (len(prompts), 77, D), for UNet conditioning."""
    ids = tokenize(models, prompts).to(models.device)
    with frozen_weights_context(models):
        return models.text_encoder(ids)[0].float()


@torch.no_grad()
def encode_latent(models: Models, rgb: torch.Tensor) -> torch.Tensor:
    """VAE latent (mean of the posterior, scaled) of an sRGB image (N, 3, H, W) in [0, 1]."""
    with frozen_weights_context(models):
        posterior = models.vae.encode(rgb.to(models.device) * 2.0 - 1.0).latent_dist
    return posterior.mean.float() * models.vae.config.scaling_factor


def decode_latent(models: Models, latent: torch.Tensor) -> torch.Tensor:
    """sRGB image in [0, 1] of a scaled latent; differentiable (stage 1 trains through it).

    In the dtype the decoder computed in (bf16 under autocast): callers that need fp32 say so.
    """
    with frozen_weights_context(models):
        image = models.vae.decode(latent / models.vae.config.scaling_factor).sample
    return (image / 2.0 + 0.5).clamp(0.0, 1.0)


# Prediction types the method's losses and x0 estimates handle (diffusers' names).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def scheduler_settings(raw: dict) -> tuple[dict, list[str]]:
    """The scheduler config the method builds from a bundle's ``scheduler_config.json``, and what it corrected.

    As diffusers' Stable Diffusion pipelines do on load: ``steps_offset`` is 1
    and ``clip_sample`` off (a config without the key would get DDIM's default,
    True, which clips every predicted latent x0 to [-1, 1] and washes colours
    out; latents are not bounded to that range). Beyond them, as diffusers'
    Imagic and SD configs set: ``set_alpha_to_one`` off unless the config says
    otherwise and ``thresholding`` off (a pixel-space technique). The
    prediction type comes from the config (default ``epsilon``). Each
    correction is one line of the returned list (what the doctor prints).
    Raises ValueError for a prediction type the method cannot train or sample.
    """
    settings = {key: value for key, value in raw.items() if not key.startswith("_")}
    corrections = []
    if settings.get("steps_offset", 0) != 1:
        corrections.append(f"steps_offset {settings.get('steps_offset', 'missing (default 0)')} -> 1, as SD's pipelines set")
        settings["steps_offset"] = 1
    if settings.get("clip_sample", True):
        said = "true" if "clip_sample" in settings else "missing (DDIM default true)"
        corrections.append(f"clip_sample {said} -> false: SD latents are not bounded to [-1, 1]")
        settings["clip_sample"] = False
    if "set_alpha_to_one" not in settings:
        corrections.append("set_alpha_to_one missing (DDIM default true) -> false, as SD's configs set")
        settings["set_alpha_to_one"] = False
    if settings.get("thresholding", False):
        corrections.append("thresholding true -> false: dynamic thresholding is for pixel-space models")
        settings["thresholding"] = False
    settings.setdefault("prediction_type", "epsilon")
    if settings["prediction_type"] not in PREDICTION_TYPES:
        raise UserError(f"scheduler prediction_type {settings['prediction_type']!r} is not supported; "
                        f"the method handles {', '.join(PREDICTION_TYPES)}")
    return settings, corrections


def build_noise_scheduler(raw: dict):
    """The training-time noise schedule (DDPM form) of a bundle's scheduler config, with safe settings."""
    model_libraries()
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_settings(raw)[0])


def build_sampling_scheduler(raw: dict):
    """A deterministic DDIM sampler (eta = 0) of a bundle's scheduler config, with safe settings."""
    model_libraries()
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_settings(raw)[0])


def noise_scheduler(models: Models):
    """The training-time noise schedule of the loaded bundle (:func:`build_noise_scheduler`)."""
    return build_noise_scheduler(models.scheduler_config)


def sampling_scheduler(models: Models):
    """The DDIM sampler of the loaded bundle (:func:`build_sampling_scheduler`)."""
    return build_sampling_scheduler(models.scheduler_config)


def predicted_x0(scheduler, noisy: torch.Tensor, timesteps: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by the UNet's output at ``timesteps`` (epsilon or v prediction)."""
    alphas = scheduler.alphas_cumprod.to(noisy.device, noisy.dtype)[timesteps].view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "epsilon":
        return (noisy - (1 - alphas).sqrt() * model_output) / alphas.sqrt()
    if scheduler.config.prediction_type == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * model_output
    raise UserError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")


def denoising_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict (the standard denoising loss's target)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(clean, noise, timesteps)


def draw_noise_and_timesteps(like: torch.Tensor, t_range: tuple[int, int], generator: torch.Generator):
    """Noise shaped like ``like`` and one timestep in ``[t_range[0], t_range[1])``, both from ``generator``.

    Drawn on the CPU so the same seed gives the same numbers on any device.
    """
    timesteps = torch.randint(t_range[0], t_range[1], (like.shape[0],), generator=generator)
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float32)
    return noise.to(like.device, like.dtype), timesteps.to(like.device)


def clip_preprocess(models: Models, rgb: torch.Tensor) -> torch.Tensor:
    """Differentiable CLIP input: resize the short side, centre-crop, normalise (as CLIP's processor)."""
    size = models.clip_image_size
    height, width = rgb.shape[-2:]
    scale = size / min(height, width)
    resized = F.interpolate(rgb, size=(max(size, round(height * scale)), max(size, round(width * scale))),
                            mode="bicubic", align_corners=False, antialias=True)
    top = (resized.shape[-2] - size) // 2
    left = (resized.shape[-1] - size) // 2
    cropped = resized[..., top : top + size, left : left + size]
    mean = torch.tensor(models.clip_mean, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    std = torch.tensor(models.clip_std, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    return (cropped - mean) / std


def clip_image_features(models: Models, rgb: torch.Tensor) -> torch.Tensor:
    """Unit-norm CLIP image embeddings of sRGB images (N, 3, H, W) in [0, 1]; differentiable."""
    with frozen_weights_context(models):
        pooled = models.clip.vision_model(pixel_values=clip_preprocess(models, rgb)).pooler_output
        return F.normalize(models.clip.visual_projection(pooled), dim=-1)


@torch.no_grad()
def clip_text_features(models: Models, prompts: list[str]) -> torch.Tensor:
    """Unit-norm CLIP text embeddings, (len(prompts), P)."""
    ids = models.clip_tokenizer(
        prompts, padding="max_length", max_length=models.clip_tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(models.device)
    with frozen_weights_context(models):
        pooled = models.clip.text_model(input_ids=ids).pooler_output
        projected = models.clip.text_projection(pooled)
    return F.normalize(projected.float(), dim=-1)


@torch.no_grad()
def clip_score(models: Models, rgb: torch.Tensor, prompt: str) -> float:
    """CLIP score of an image and a prompt: 100 * max(cosine, 0), as torchmetrics defines it."""
    image = clip_image_features(models, rgb.to(models.device))
    text = clip_text_features(models, [prompt])
    return float(100.0 * (image * text).sum(-1).clamp(min=0).mean())


def denoising_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` DDIM steps an img2img sample at ``strength`` runs: ``int(steps * strength)``.

    As diffusers' img2img pipelines count them (``get_timesteps``: the product
    truncated, at most ``steps``), so a state's recorded settings run the same
    steps in diffusers. Raises ValueError when that is no step at all
    (diffusers refuses it too), naming both values.
    """
    count = min(int(steps * strength), steps)
    if count < 1:
        raise UserError(f"{steps} steps at strength {strength} run no denoising step (int(steps * strength) = "
                        f"{count}); raise the steps or the strength")
    return count


@torch.no_grad()
def sample_from(
    models: Models,
    unet: torch.nn.Module,
    start: torch.Tensor,
    *,
    strength: float,
    steps: int,
    guidance: float,
    condition: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """DDIM sampling from ``start`` noised to ``strength`` (img2img), with classifier-free guidance.

    ``condition`` is a (1, 77, D) text embedding; the unconditional branch uses
    the empty prompt. Returns the final latent. Deterministic given ``generator``.
    """
    if not 0.0 < strength <= 1.0:
        raise UserError(f"strength must be in (0, 1], got {strength}")
    # 1. Timesteps: the last `strength` fraction of the DDIM schedule.
    scheduler = sampling_scheduler(models)
    scheduler.set_timesteps(steps, device=start.device)
    first = steps - denoising_steps(steps, strength)
    timesteps = scheduler.timesteps[first:]

    # 2. Noise the start latent to the first timestep.
    noise = torch.randn(start.shape, generator=generator, dtype=torch.float32).to(start.device, start.dtype)
    latent = scheduler.add_noise(start, noise, timesteps[:1])

    # 3. Denoise with guidance.
    unconditional = encode_prompts(models, [""])
    context = torch.cat([unconditional, condition.to(unconditional.dtype)])
    for t in timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latent, latent]), t)
        # .float(): guidance and the DDIM update in fp32 even when the UNet ran under bf16 autocast.
        uncond, cond = unet(model_input, t, encoder_hidden_states=context).sample.float().chunk(2)
        latent = scheduler.step(uncond + guidance * (cond - uncond), t, latent).prev_sample
    return latent


def resize_for_model(gray: np.ndarray, target_pixels: int, multiple: int) -> np.ndarray:
    """Resize a gray image to about ``target_pixels`` pixels for the model.

    Both sides are rounded to the nearest multiple of ``multiple`` (at least one
    multiple) after scaling by ``sqrt(target_pixels / (H * W))``, which keeps the
    aspect ratio as closely as that rounding allows; e.g. 900x1200 with
    512*512 and 8 gives 440x592. Resampling is Pillow's Lanczos on 32-bit float
    data (antialiased when downscaling), clipped back to [0, 1].

    Args:
        gray: (H, W) float array in [0, 1].
        target_pixels: the pixel count the model expects (e.g. 512 * 512).
        multiple: the factor both sides must be a multiple of (e.g. 8).

    Returns:
        (h, w) float32 array in [0, 1].

    Raises:
        ValueError: for a gray that is not a non-empty 2-D float array in [0, 1],
            or non-positive ``target_pixels`` / ``multiple``.
    """
    # 1. Check inputs.
    if (
        not isinstance(gray, np.ndarray)
        or gray.ndim != 2
        or gray.size == 0
        or not np.issubdtype(gray.dtype, np.floating)
    ):
        raise ValueError(f"gray must be a non-empty 2-D float array, got {describe(gray)}")
    low, high = float(gray.min()), float(gray.max())
    if not (0.0 <= low and high <= 1.0):
        raise ValueError(f"gray values must lie in [0, 1], got range [{low}, {high}]")
    for label, value in (("target_pixels", target_pixels), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{label} must be a positive int, got {value!r}")

    # 2. Target size: same aspect, about target_pixels, sides multiples of `multiple`.
    height, width = gray.shape
    scale = math.sqrt(target_pixels / (height * width))
    new_height = max(multiple, round(height * scale / multiple) * multiple)
    new_width = max(multiple, round(width * scale / multiple) * multiple)

    # 3. Resample.
    image = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))
    resized = image.resize((new_width, new_height), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
