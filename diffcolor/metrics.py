"""Per-item image metrics and per-run summaries (SPEC section 7).

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

from diffcolor.color import gray_lightness, lightness


@dataclass(frozen=True)
class FidelityConfig:
    """How luminance fidelity is computed."""

    # Pixels converted to L* per batch; bounds the float64 working memory to a few
    # times this many values whatever the image size (ours).
    chunk_pixels: int = 1 << 20
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
    values = _rgb_as_unit_float(rgb, "rgb") * 255.0
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
        ignored) and SSIM of the two L* channels (data_range 100; NaN for images
        smaller than 3x3).

    Raises:
        ValueError: on wrong shapes, dtypes or ranges, or a mask that is not a bool
            (H, W) array.
    """
    # 1. Check inputs.
    gray = _gray_as_float(gray, "gray")
    if rgb.shape[:2] != gray.shape:
        raise ValueError(f"rgb shape {rgb.shape} does not match gray shape {gray.shape}")
    if ignore is not None and (ignore.dtype != np.bool_ or ignore.shape != gray.shape):
        raise ValueError(
            f"ignore must be a bool array of shape {gray.shape}, got {ignore.dtype} {ignore.shape}"
        )
    _rgb_as_unit_float(rgb[:1, :1], "rgb")  # dtype / shape check without a full copy

    # 2. L* of both images, in float64 chunks of rows.
    source_l = _lightness_of_gray(gray, config.chunk_pixels)
    output_l = _lightness_of_rgb(rgb, config.chunk_pixels)

    # 3. Delta statistics over the kept pixels.
    delta = np.abs(output_l - source_l)
    kept = delta if ignore is None else delta[~ignore]
    if kept.size:
        max_delta, mean_delta = float(kept.max()), float(kept.mean())
    else:
        max_delta = mean_delta = float("nan")

    # 4. Structural similarity of the L* channels.
    return {
        "max_delta_l": max_delta,
        "mean_delta_l": mean_delta,
        "ssim_l": _ssim_of_lightness(source_l, output_l, config.ssim_window),
    }


def summarise(values: list[float]) -> dict:
    """Distribution of a per-item metric over a run, NaN and None ignored.

    Args:
        values: the metric's values, one per item.

    Returns:
        ``{"count", "mean", "median", "p5", "p95", "min", "max"}``; ``count`` is the
        number of finite-or-infinite (non-NaN) values, the others are NaN when
        ``count`` is 0.

    Raises:
        ValueError: if a value is not a number.
    """
    try:
        array = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"summarise needs numbers, got {values!r:.200}") from exc
    array = array[~np.isnan(array)]
    if array.size == 0:
        nan = float("nan")
        return {"count": 0, "mean": nan, "median": nan, "p5": nan, "p95": nan, "min": nan, "max": nan}
    return {
        "count": int(array.size),
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "p5": float(np.percentile(array, 5)),
        "p95": float(np.percentile(array, 95)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def _lightness_of_gray(gray: np.ndarray, chunk_pixels: int) -> np.ndarray:
    rows = max(1, chunk_pixels // max(1, gray.shape[1]))
    out = np.empty(gray.shape, dtype=np.float64)
    for top in range(0, gray.shape[0], rows):
        block = torch.from_numpy(np.ascontiguousarray(gray[top : top + rows], dtype=np.float64))
        out[top : top + rows] = gray_lightness(block).numpy()
    return out


def _lightness_of_rgb(rgb: np.ndarray, chunk_pixels: int) -> np.ndarray:
    rows = max(1, chunk_pixels // max(1, rgb.shape[1]))
    out = np.empty(rgb.shape[:2], dtype=np.float64)
    for top in range(0, rgb.shape[0], rows):
        block = torch.from_numpy(_rgb_as_unit_float(rgb[top : top + rows], "rgb"))
        out[top : top + rows] = lightness(block.permute(2, 0, 1))[0].numpy()
    return out


def _ssim_of_lightness(source_l: np.ndarray, output_l: np.ndarray, window: int) -> float:
    # skimage needs an odd window no larger than the image.
    side = min(window, *source_l.shape)
    side -= 1 - side % 2
    if side < 3:
        return float("nan")
    # float32 keeps skimage's working arrays at half the size; SSIM needs no more.
    return float(
        structural_similarity(
            source_l.astype(np.float32), output_l.astype(np.float32), data_range=100.0, win_size=side
        )
    )


def _gray_as_float(gray: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or not np.issubdtype(gray.dtype, np.floating):
        raise ValueError(f"{name} must be a 2-D float array in [0, 1], got {_describe(gray)}")
    low, high = float(gray.min(initial=0.0)), float(gray.max(initial=0.0))
    if not (0.0 <= low and high <= 1.0):
        raise ValueError(f"{name} values must lie in [0, 1], got range [{low}, {high}]")
    return gray


def _rgb_as_unit_float(rgb: np.ndarray, name: str) -> np.ndarray:
    """(H, W, 3) uint8 / uint16 / float in [0, 1] -> float64 in [0, 1]."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{name} must be an (H, W, 3) array, got {_describe(rgb)}")
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float64) / 255.0
    if rgb.dtype == np.uint16:
        return rgb.astype(np.float64) / 65535.0
    if np.issubdtype(rgb.dtype, np.floating):
        low, high = float(rgb.min(initial=0.0)), float(rgb.max(initial=0.0))
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(f"{name} float values must lie in [0, 1], got range [{low}, {high}]")
        return rgb.astype(np.float64)
    raise ValueError(f"{name} must be uint8, uint16 or float, got dtype {rgb.dtype}")


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"array of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__
