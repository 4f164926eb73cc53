"""Per-item image metrics (SPEC section 7); their per-run distributions are the report's.

Numpy arrays in, plain floats out; no model code here (the CLIP score lives with
the models). Images are accepted as uint8, uint16 (rescaled to [0, 1]) or float in
[0, 1], shaped (H, W, 3) for colour and (H, W) for gray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from skimage.metrics import structural_similarity

from diffcolor.common.pixels import describe, unit_rgb
from diffcolor.method.color import gray_lightness, lightness


@dataclass(frozen=True)
class FidelityConfig:
    """How luminance fidelity is computed."""

    # Pixels per strip of rows. The working set is roughly 400 bytes per strip
    # pixel (float64 L*, SSIM's filtered maps), about 100 MB at this default,
    # whatever the image size (ours).
    chunk_pixels: int = 1 << 18
    # SSIM window side in pixels, skimage's default for data without a Gaussian
    # window (Wang et al. 2004 use 11 with a Gaussian; skimage defaults to 7).
    ssim_window: int = 7


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk (2003) colourfulness M on the 0..255 scale.

    ``M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)`` with
    ``rg = R - G`` and ``yb = (R + G) / 2 - B`` over all pixels, on sRGB values
    scaled to 0..255 (the paper's scale: 0 for gray, ~100 for "highly colourful").

    Args:
        rgb: (H, W, 3) uint8, uint16 or float in [0, 1].

    Returns:
        M as a float (0.0 for any neutral image).

    Raises:
        ValueError: on a wrong shape, dtype or range.
    """
    # 1. Bring the image to float64 on the paper's 0..255 scale.
    values = unit_rgb(rgb, "rgb") * 255.0
    red, green, blue = values[..., 0], values[..., 1], values[..., 2]
    # 2. Opponent channels.
    rg = red - green
    yb = 0.5 * (red + green) - blue
    # 3. Spread plus a weighted mean of the opponent channels.
    spread = math.hypot(float(rg.std()), float(yb.std()))
    offset = math.hypot(float(rg.mean()), float(yb.mean()))
    return spread + 0.3 * offset


def lightness_fidelity(
    gray: np.ndarray,
    rgb: np.ndarray,
    ignore: np.ndarray | None = None,
    config: FidelityConfig = FidelityConfig(),
) -> dict[str, float]:
    """How well a colour image keeps the lightness of its gray source.

    Args:
        gray: (H, W) float in [0, 1], sRGB-encoded gray levels of the source.
        rgb: (H, W, 3) uint8, uint16 or float in [0, 1], the colour derivative.
        ignore: optional (H, W) bool mask of pixels left out of the delta statistics
            (e.g. the pixels whose chroma gamut mapping reduced). SSIM always uses
            the whole image.
        config: chunking and SSIM window.

    Returns:
        ``{"max_delta_l", "mean_delta_l", "ssim_l"}``: max and mean of
        ``|L*(rgb) - L*(gray)|`` over the pixels not ignored (NaN when all are
        ignored) and SSIM of the two L* channels (skimage, data_range 100, mean
        over the image less half a window at the border; NaN for images smaller
        than 3x3). Computed strip by strip, equal to one full-image pass.

    Raises:
        ValueError: on wrong shapes, dtypes or ranges, or a mask that is not a bool
            (H, W) array.
    """
    # 1. Check inputs.
    gray = _check_fidelity_inputs(gray, rgb, ignore)

    # 2. Walk strips of rows: L* of both images in float64, delta statistics on
    #    the strip's own rows, the SSIM map on the strip plus a halo of half a
    #    window (so every window is whole and the result equals one full pass).
    height, width = gray.shape
    side = min(config.ssim_window, height, width)
    side -= 1 - side % 2  # skimage wants an odd window no larger than the image
    pad = max(side, 1) // 2
    rows = max(1, config.chunk_pixels // width)
    delta_max, delta_sum, delta_count = -math.inf, 0.0, 0
    ssim_sum, ssim_count = 0.0, 0
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        lo, hi = max(0, top - pad), min(height, bottom + pad)
        hi = min(height, max(hi, lo + side))  # at least one whole window tall
        lo = max(0, min(lo, hi - side))
        source_l = _lightness_of_gray(gray[lo:hi])
        output_l = _lightness_of_rgb(rgb[lo:hi])

        core = slice(top - lo, bottom - lo)
        delta = np.abs(output_l[core] - source_l[core])
        if ignore is not None:
            delta = delta[~ignore[top:bottom]]
        if delta.size:
            delta_max = max(delta_max, float(delta.max()))
            delta_sum += float(delta.sum())
            delta_count += delta.size

        # 3. SSIM map, cropped by half a window at the image border as skimage does.
        if side >= 3:
            strip_sum, strip_count = _ssim_of_strip(source_l, output_l, side, rows=(lo, top, bottom), height=height)
            ssim_sum += strip_sum
            ssim_count += strip_count

    # 4. Totals (NaN where there was nothing to measure).
    nan = float("nan")
    return {
        "max_delta_l": delta_max if delta_count else nan,
        "mean_delta_l": delta_sum / delta_count if delta_count else nan,
        "ssim_l": ssim_sum / ssim_count if ssim_count else nan,
    }


def _check_fidelity_inputs(gray: np.ndarray, rgb: np.ndarray, ignore: np.ndarray | None) -> np.ndarray:
    """``gray`` as a checked float array; ValueError naming what is wrong with any argument."""
    gray = _gray_as_float(gray, "gray")
    unit_rgb(rgb[:1, :1] if isinstance(rgb, np.ndarray) else rgb, "rgb")  # type check, no full copy
    if rgb.shape[:2] != gray.shape:
        raise ValueError(f"rgb shape {rgb.shape} does not match gray shape {gray.shape}")
    if ignore is not None and (
        not isinstance(ignore, np.ndarray) or ignore.dtype != np.bool_ or ignore.shape != gray.shape
    ):
        raise ValueError(f"ignore must be a bool array of shape {gray.shape}, got {describe(ignore)}")
    return gray


def _ssim_of_strip(source_l: np.ndarray, output_l: np.ndarray, side: int, *, rows: tuple[int, int, int],
                   height: int) -> tuple[float, int]:
    """Sum and count of the SSIM map over a strip's own rows (``rows`` = first row with halo, top, bottom),
    less half a window at the image border, as skimage crops a full-image map."""
    lo, top, bottom = rows
    pad = side // 2
    width = source_l.shape[1]
    ssim_map = structural_similarity(
        source_l.astype(np.float32), output_l.astype(np.float32), data_range=100.0, win_size=side, full=True,
    )[1]
    first, last = max(top, pad), min(bottom, height - pad)
    if last <= first:
        return 0.0, 0
    kept_map = ssim_map[first - lo : last - lo, pad : width - pad]
    return float(kept_map.sum(dtype=np.float64)), kept_map.size


def _lightness_of_gray(gray: np.ndarray) -> np.ndarray:
    return gray_lightness(torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float64))).numpy()


def _lightness_of_rgb(rgb: np.ndarray) -> np.ndarray:
    return lightness(torch.from_numpy(unit_rgb(rgb, "rgb")).permute(2, 0, 1))[0].numpy()


def _gray_as_float(gray: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or not np.issubdtype(gray.dtype, np.floating):
        raise ValueError(f"{name} must be a 2-D float array in [0, 1], got {describe(gray)}")
    low, high = float(gray.min(initial=0.0)), float(gray.max(initial=0.0))
    if not (0.0 <= low and high <= 1.0):
        raise ValueError(f"{name} values must lie in [0, 1], got range [{low}, {high}]")
    return gray
