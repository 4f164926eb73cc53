"""The full-resolution merge as it was before the fast guided filter: the reference.

A verbatim copy of ``diffcolor.method.merge`` (full-resolution guided filter with
kornia's box blurs, strips with a halo of 2r + 1 rows, chroma-only gamut mapping
by bisection of every out-of-gamut pixel) kept so that the tests can hold the
production merge to it. Not used by the package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from kornia.color import rgb_to_lab
from kornia.filters import guided_blur

from diffcolor.method.color import gamut_map_lab, gray_lightness
from diffcolor.method.merge import VISIBLE_CHROMA
from diffcolor.method.metrics import lightness_fidelity


@dataclass(frozen=True)
class ReferenceMergeConfig:
    """Parameters of the full-resolution merge (all ours: the paper is silent)."""

    # Guided-filter radius in source pixels per unit of upscale factor (source side
    # / model side): 2.0 makes the window span about four model pixels, enough to
    # cover the blur that bilinear upsampling leaves around a chroma edge. Ours.
    radius_per_scale: float = 2.0
    # Smallest guided-filter radius in source pixels, for little or no upscaling. Ours.
    min_radius: int = 2
    # Guided-filter regularisation in (L*/100)^2 units: edges with an L* standard
    # deviation well above sqrt(eps) * 100 (about 3 L* here) steer the chroma. Ours.
    eps: float = 1e-3
    # Bisection steps of the chroma-only gamut mapping (scale found to 2**-16). Ours.
    gamut_iterations: int = 16
    # Source pixels per processing strip, before its halo rows. The working set is
    # roughly 400 bytes per strip pixel (float32 Lab, filter and gamut-mapping
    # temporaries), so the default bounds it near 200 MB whatever the image size. Ours.
    strip_pixels: int = 1 << 19


@dataclass
class ReferenceMergedImage:
    """The merged derivative and its luminance-fidelity numbers."""

    rgb: np.ndarray  # (H, W, 3) uint8 for bit_depth 8, uint16 for bit_depth 16
    gamut_clipped_fraction: float  # fraction of pixels whose chroma was visibly reduced
    max_delta_l: float  # max |L*(output) - L*(source)| over pixels not reduced
    mean_delta_l: float  # mean of the same
    ssim_l: float  # SSIM of the two L* channels, data_range 100


def reference_merge_full_resolution(
    gray: np.ndarray,
    chroma_ab: torch.Tensor,
    bit_depth: int,
    config: ReferenceMergeConfig = ReferenceMergeConfig(),
) -> ReferenceMergedImage:
    """Combine the original's full-resolution L* with model-resolution chroma.

    Args:
        gray: (H, W) float array in [0, 1], sRGB-encoded gray levels of the
            original at its own resolution.
        chroma_ab: (2, h, w) float tensor of a*, b* at model resolution (any device;
            the merge runs on CPU). Its aspect may differ slightly from the
            original's (rounding to multiples of 8); it is stretched to (H, W).
        bit_depth: 8 (uint8 output) or 16 (uint16 output).
        config: filter and processing parameters.

    Returns:
        :class:`ReferenceMergedImage` with the quantised RGB and its fidelity metrics, the
        L* deltas measured after quantisation.

    Raises:
        ValueError: for ``bit_depth`` not in (8, 16), a ``gray`` that is not a 2-D
            float array in [0, 1], or a ``chroma_ab`` that is not a finite
            (2, h, w) float tensor.
    """
    # 1. Check inputs.
    _check_inputs(gray, chroma_ab, bit_depth, config)
    height, width = gray.shape
    chroma = chroma_ab.detach().to(device="cpu", dtype=torch.float32)
    max_code = 255 if bit_depth == 8 else 65535
    out_dtype = np.uint8 if bit_depth == 8 else np.uint16

    # 2. Filter size from the upscale factor; the halo keeps strips exact.
    scale = max(height / chroma.shape[1], width / chroma.shape[2])
    radius = max(config.min_radius, int(round(config.radius_per_scale * scale)))
    radius = min(radius, height - 1, width - 1)  # reflect padding needs a window inside the image
    halo = 2 * radius + 1  # a guided filter's output depends on pixels up to 2r away

    # At least two halos of own rows per strip, so the halos never dominate.
    strip_rows = max(2 * halo, config.strip_pixels // width, 1)

    rgb = np.empty((height, width, 3), dtype=out_dtype)
    reduced = np.empty((height, width), dtype=bool)
    clipped = 0
    for top in range(0, height, strip_rows):
        bottom = min(height, top + strip_rows)
        lo, hi = max(0, top - halo), min(height, bottom + halo)

        # 3. Source L* of the strip plus halo, at full resolution.
        source_l = gray_lightness(torch.from_numpy(np.ascontiguousarray(gray[lo:hi], dtype=np.float32)))

        # 4. Chroma bilinearly upsampled onto these rows, then guided by L*.
        ab = _upsample_rows(chroma, lo, hi, height, width)
        ab = guided_blur(
            (source_l / 100.0)[None, None], ab[None], 2 * radius + 1, config.eps, separable=True
        )[0]

        # 5. Keep the strip's own rows, put the source L* back and gamut-map.
        core = slice(top - lo, top - lo + (bottom - top))
        lab = torch.cat([source_l[None, core], ab[:, core]], dim=0)
        strip_rgb, strip_reduced = gamut_map_lab(lab, iterations=config.gamut_iterations)

        # 6. Quantise to the bit depth with rounding.
        codes = torch.round(strip_rgb * max_code).permute(1, 2, 0).numpy()
        rgb[top:bottom] = codes.astype(out_dtype)
        reduced[top:bottom] = strip_reduced[0].numpy()
        # Visibly clipped: more than VISIBLE_CHROMA lost where the output keeps at least that much chroma.
        asked = torch.hypot(lab[1], lab[2])
        kept_lab = rgb_to_lab(strip_rgb)
        kept = torch.hypot(kept_lab[1], kept_lab[2])
        clipped += int((strip_reduced[0] & (kept >= VISIBLE_CHROMA) & (asked - kept > VISIBLE_CHROMA)).sum())

    # 7. Fidelity of the quantised result against the source.
    fidelity = lightness_fidelity(gray, rgb, ignore=reduced)
    return ReferenceMergedImage(
        rgb=rgb,
        gamut_clipped_fraction=clipped / reduced.size,
        max_delta_l=fidelity["max_delta_l"],
        mean_delta_l=fidelity["mean_delta_l"],
        ssim_l=fidelity["ssim_l"],
    )


def _upsample_rows(chroma: torch.Tensor, top: int, bottom: int, height: int, width: int) -> torch.Tensor:
    """Rows [top, bottom) of ``F.interpolate(chroma, (height, width), bilinear)``.

    Sampling with ``grid_sample`` at the same source coordinates that
    ``interpolate(..., align_corners=False)`` uses (pixel centres, edges clamped)
    gives the same values without building the full-size (2, H, W) tensor.
    """
    ys = (2.0 * torch.arange(top, bottom, dtype=torch.float32) + 1.0) / height - 1.0
    xs = (2.0 * torch.arange(width, dtype=torch.float32) + 1.0) / width - 1.0
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (rows, W, 2) as (x, y)
    return F.grid_sample(
        chroma[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False
    )[0]


def _check_inputs(gray: np.ndarray, chroma_ab: torch.Tensor, bit_depth: int, config: ReferenceMergeConfig) -> None:
    if isinstance(bit_depth, bool) or bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or not np.issubdtype(gray.dtype, np.floating):
        described = f"{gray.dtype} array of shape {gray.shape}" if isinstance(gray, np.ndarray) else type(gray).__name__
        raise ValueError(f"gray must be a 2-D float array in [0, 1], got {described}")
    if gray.size == 0:
        raise ValueError(f"gray must not be empty, got shape {gray.shape}")
    low, high = float(gray.min()), float(gray.max())
    if not (0.0 <= low and high <= 1.0):
        raise ValueError(f"gray values must lie in [0, 1], got range [{low}, {high}]")
    if (
        not isinstance(chroma_ab, torch.Tensor)
        or not chroma_ab.is_floating_point()
        or chroma_ab.dim() != 3
        or chroma_ab.shape[0] != 2
        or chroma_ab.shape[1] < 1
        or chroma_ab.shape[2] < 1
    ):
        described = (
            f"{chroma_ab.dtype} tensor of shape {tuple(chroma_ab.shape)}"
            if isinstance(chroma_ab, torch.Tensor)
            else type(chroma_ab).__name__
        )
        raise ValueError(f"chroma_ab must be a (2, h, w) float tensor, got {described}")
    if not bool(torch.isfinite(chroma_ab).all()):
        raise ValueError("chroma_ab contains NaN or infinite values")
    if config.strip_pixels < 1 or config.min_radius < 1 or config.eps <= 0 or config.radius_per_scale < 0:
        raise ValueError(f"invalid MergeConfig: {config}")
