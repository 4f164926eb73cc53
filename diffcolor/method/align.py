"""Spatial alignment: move the chroma of a generated image onto the gray image's grid.

A sampled colourisation ``x`` is close to, but not pixel-aligned with, the gray
image ``G`` (the paper's spatial alignment module). We compute features of
``gray(x)`` and of ``G`` with the frozen VAE encoder that is already loaded (its
first down blocks: no extra weights), correlate each position of ``G`` with a
window of positions of ``x``, normalise the correlations with a softmax, and
take the expected displacement (a soft-argmax flow). The flow, upsampled to
model resolution, warps ``x``'s a*b* chroma onto ``G``'s grid; the expected
cosine similarity of the matched features is the per-pixel confidence. The
aligned image takes its lightness from ``G``.

The paper does not publish its alignment network; the feature source, window
and temperature are ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffcolor.method.color import (
    gamut_map_lab,
    gray_from_lightness,
    gray_lightness,
    lightness,
    rgb_to_lab,
)
from diffcolor.method.models import Models
from diffcolor.method.performance import frozen_weights_context


@dataclass(frozen=True)
class AlignConfig:
    """Alignment hyper-parameters (all ours)."""

    feature_stride: int = 4  # ours: VAE-encoder features at 1/4 of model resolution
    window_radius: int = 6  # ours: search radius in feature cells (24 px at stride 4 and 512 px)
    temperature: float = 0.05  # ours: softmax temperature on cosine similarities


@dataclass
class Alignment:
    """Chroma on the gray image's grid, with how confident the match is."""

    chroma: torch.Tensor  # (1, 2, h, w) a*, b* aligned to G
    confidence: torch.Tensor  # (1, 1, h, w) in [0, 1]
    rgb: torch.Tensor  # (1, 3, h, w) sRGB in [0, 1]: G's lightness with the aligned chroma

    @property
    def mean_confidence(self) -> float:
        return float(self.confidence.mean())


@torch.no_grad()
def encoder_features(models: Models, gray: torch.Tensor, stride: int) -> torch.Tensor:
    """Unit-norm VAE-encoder features of a gray image (N, 1, h, w) in [0, 1], at ``stride``."""
    encoder = models.vae.encoder
    with frozen_weights_context(models):
        features = encoder.conv_in(gray.expand(-1, 3, -1, -1).to(models.device) * 2.0 - 1.0)
        current = 1
        for block in encoder.down_blocks:
            if current >= stride:
                break
            features = block(features)
            current = gray.shape[-1] // features.shape[-1]
    if current != stride:
        raise ValueError(f"the VAE encoder offers no features at stride {stride} (got {current})")
    return F.normalize(features.float(), dim=1)


def _soft_flow(target: torch.Tensor, source: torch.Tensor, radius: int, temperature: float):
    """Soft-argmax displacement from each ``target`` cell to matching ``source`` cells in a window."""
    height, width = target.shape[-2:]
    padded = F.pad(source, (radius, radius, radius, radius))
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    similarity = torch.stack(
        [
            (target * padded[..., radius + dy : radius + dy + height, radius + dx : radius + dx + width]).sum(1)
            for dy, dx in offsets
        ],
        dim=1,
    )  # (N, offsets, h, w), cosine similarities
    weights = torch.softmax(similarity / temperature, dim=1)
    offset = torch.tensor(offsets, dtype=weights.dtype, device=weights.device)  # (offsets, 2) as (dy, dx)
    flow_y = torch.einsum("nohw,o->nhw", weights, offset[:, 0])
    flow_x = torch.einsum("nohw,o->nhw", weights, offset[:, 1])
    confidence = (weights * similarity).sum(1, keepdim=True).clamp(0.0, 1.0)
    return torch.stack([flow_x, flow_y], dim=-1), confidence


@torch.no_grad()
def align_chroma(models: Models, rgb: torch.Tensor, gray: torch.Tensor, config: AlignConfig = AlignConfig()) -> Alignment:
    """Aligns the chroma of ``rgb`` (1, 3, h, w) to ``gray`` (1, 1, h, w), both in [0, 1].

    Returns the aligned a*b*, the confidence map and the aligned sRGB image
    whose L* is ``gray``'s. Raises ValueError when the shapes differ.
    """
    if rgb.shape[-2:] != gray.shape[-2:]:
        raise ValueError(f"rgb {tuple(rgb.shape)} and gray {tuple(gray.shape)} differ in size")
    device = models.device
    rgb, gray = rgb.to(device).float(), gray.to(device).float()

    # 1. Features of gray(x) and G from the frozen VAE encoder.
    source_gray = gray_from_lightness(lightness(rgb)).clamp(0.0, 1.0)
    source = encoder_features(models, source_gray, config.feature_stride)
    target = encoder_features(models, gray, config.feature_stride)

    # 2. Windowed, softmax-normalised correlation -> soft flow and confidence.
    flow, confidence = _soft_flow(target, source, config.window_radius, config.temperature)

    # 3. Warp x's chroma along the flow, at model resolution.
    height, width = gray.shape[-2:]
    scale = config.feature_stride
    flow = F.interpolate(flow.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=False) * scale
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    grid_x = (xs + flow[:, 0]) / max(width - 1, 1) * 2 - 1
    grid_y = (ys + flow[:, 1]) / max(height - 1, 1) * 2 - 1
    chroma = rgb_to_lab(rgb)[:, 1:]
    warped = F.grid_sample(chroma, torch.stack([grid_x, grid_y], dim=-1), mode="bilinear", padding_mode="border", align_corners=True)
    confidence = F.interpolate(confidence, size=(height, width), mode="bilinear", align_corners=False)

    # 4. The aligned image takes G's lightness.
    lab = torch.cat([gray_lightness(gray), warped], dim=1)
    aligned_rgb, _ = gamut_map_lab(lab)
    return Alignment(chroma=warped.cpu(), confidence=confidence.cpu(), rgb=aligned_rgb.float().cpu())

