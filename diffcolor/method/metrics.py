"""Per-item image metrics (docs/DESIGN.md §7); their per-run distributions are the report's.

Numpy arrays in, plain floats out; no model code here (the CLIP score lives with
the models). Images are accepted as uint8, uint16 (rescaled to [0, 1]) or float in
[0, 1], shaped (H, W, 3) for colour and (H, W) for gray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from diffcolor.common.pixels import describe, unit_rgb
from diffcolor.method.color import gray_lightness, lightness


@dataclass(frozen=True)
class FidelityConfig:
    """How luminance fidelity is computed."""

    # Pixels per strip of rows. The working set is roughly 200 bytes per strip
    # pixel (float64 L*, the SSIM window means), about 50 MB at this default,
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
    # 1. Strip by strip: a scan is never copied whole as floats.
    unit_rgb(rgb[:1, :1] if isinstance(rgb, np.ndarray) and rgb.ndim == 3 else rgb, "rgb", check_range=False)
    accumulator = ColorfulnessAccumulator()
    rows = max(1, FidelityConfig.chunk_pixels // max(1, rgb.shape[1]))
    for top in range(0, rgb.shape[0], rows):
        accumulator.add(rgb[top : top + rows])
    return accumulator.result()


class ColorfulnessAccumulator:
    """:func:`colorfulness` of an image from its rows fed in any strips: the opponent channels' count, means
    and sums of squared deviations, merged exactly (Chan, Golub and LeVeque 1979's pairwise update)."""

    def __init__(self) -> None:
        self._count, self._means, self._squares = 0, np.zeros(2), np.zeros(2)

    def add(self, strip: np.ndarray) -> None:
        """The next rows: (rows, W, 3) uint8, uint16 or float in [0, 1]."""
        # 1. The rows on the paper's 0..255 scale, and their opponent channels.
        values = unit_rgb(strip, "rgb") * 255.0
        red, green, blue = values[..., 0], values[..., 1], values[..., 2]
        opponent = np.stack([(red - green).ravel(), (0.5 * (red + green) - blue).ravel()])
        # 2. Their statistics, merged into the image's.
        count, means = opponent.shape[1], opponent.mean(axis=1)
        squares = ((opponent - means[:, None]) ** 2).sum(axis=1)
        delta, total = means - self._means, self._count + count
        self._squares += squares + delta**2 * (self._count * count / total)
        self._means += delta * (count / total)
        self._count = total

    def result(self) -> float:
        """M: the spread plus a weighted mean of the opponent channels."""
        spread = math.hypot(*np.sqrt(self._squares / self._count))
        return spread + 0.3 * math.hypot(*self._means)


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
        ignored) and SSIM of the two L* channels (skimage's definition, data_range
        100, mean over the image less half a window at the border; NaN for images
        smaller than 3x3). Computed strip by strip, equal to one full-image pass.

    Raises:
        ValueError: on wrong shapes, dtypes or ranges, or a mask that is not a bool
            (H, W) array.
    """
    # 1. Check inputs.
    gray = _check_fidelity_inputs(gray, rgb, ignore)

    # 2. Walk strips of rows: L* of both images in float64, fed to the accumulator.
    height, width = gray.shape
    rows = max(1, config.chunk_pixels // width)
    accumulator = FidelityAccumulator(height, width, config.ssim_window)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        accumulator.add(
            torch.from_numpy(_lightness_of_gray(gray[top:bottom])),
            torch.from_numpy(_lightness_of_rgb(rgb[top:bottom])),
            ignore=None if ignore is None else torch.from_numpy(np.ascontiguousarray(ignore[top:bottom])),
        )
    return accumulator.result()


class FidelityAccumulator:
    """:func:`lightness_fidelity`'s numbers from L* strips fed top to bottom, on any device.

    Keeps the last ``window - 1`` rows between strips, so every SSIM window is
    whole and the result does not depend on the strip height; no full-size copy.
    Sums are float64; the SSIM maps are computed in the dtype of the strips.
    """

    def __init__(self, height: int, width: int, ssim_window: int = FidelityConfig.ssim_window) -> None:
        side = min(ssim_window, height, width)
        self._side = side - (1 - side % 2)  # skimage wants an odd window no larger than the image
        self._carry: torch.Tensor | None = None  # the last side - 1 rows of (source, output) L*
        self._delta_max, self._delta_sum, self._delta_count = -math.inf, 0.0, 0
        self._ssim_sum, self._ssim_count = 0.0, 0

    def add(self, source_l: torch.Tensor, output_l: torch.Tensor, ignore: torch.Tensor | None = None) -> None:
        """The next rows: (rows, W) L* of the source and of the output, and the pixels left out of the
        delta statistics (bool, same shape) if any."""
        # 1. Delta statistics over the pixels not ignored.
        delta = torch.sub(output_l, source_l).abs_()
        count = delta.numel()
        if ignore is not None:
            count -= int(ignore.sum())
            delta.masked_fill_(ignore, 0.0)
        if count:
            self._delta_max = max(self._delta_max, float(delta.max()))
            self._delta_sum += float(delta.sum(dtype=torch.float64))
            self._delta_count += count

        # 2. SSIM of every window that the rows seen so far complete.
        if self._side < 3:
            return
        pair = torch.stack([source_l, output_l])
        if self._carry is not None:
            pair = torch.cat([self._carry, pair], dim=1)
        if pair.shape[1] >= self._side:
            strip_sum, strip_count = _ssim_of_windows(pair, self._side)
            self._ssim_sum += strip_sum
            self._ssim_count += strip_count
        self._carry = pair[:, -(self._side - 1) :].clone()

    def result(self) -> dict[str, float]:
        """``{"max_delta_l", "mean_delta_l", "ssim_l"}`` (NaN where there was nothing to measure)."""
        nan = float("nan")
        count = self._delta_count
        return {
            "max_delta_l": self._delta_max if count else nan,
            "mean_delta_l": self._delta_sum / count if count else nan,
            "ssim_l": self._ssim_sum / self._ssim_count if self._ssim_count else nan,
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


# skimage.metrics.structural_similarity's constants (Wang et al. 2004): K1, K2.
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


def _ssim_of_windows(pair: torch.Tensor, side: int, data_range: float = 100.0) -> tuple[float, int]:
    """Sum and count of the SSIM map over the whole ``side`` x ``side`` windows of the (2, rows, W) pair:
    skimage's uniform-window SSIM with sample covariance, whose border crop keeps exactly these."""
    x, y = pair[0], pair[1]
    maps = torch.stack([x, y, x * x, y * y, x * y])[None]
    maps = _window_mean(_window_mean(maps, side, 2), side, 3)[0]
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = maps.unbind(0)
    covariance_norm = side * side / (side * side - 1.0)
    c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
    mean_x_y = mean_x * mean_y
    mean_x2_y2 = mean_x.square_().add_(mean_y.square_())
    variances = (mean_xx + mean_yy - mean_x2_y2).mul_(covariance_norm)
    covariance = (mean_xy - mean_x_y).mul_(2.0 * covariance_norm)
    numerator = mean_x_y.mul_(2.0).add_(c1).mul_(covariance.add_(c2))
    denominator = mean_x2_y2.add_(c1).mul_(variances.add_(c2))
    return float(numerator.div_(denominator).sum(dtype=torch.float64)), numerator.numel()


def _window_mean(maps: torch.Tensor, side: int, axis: int) -> torch.Tensor:
    """Means over the whole windows of ``side`` along ``axis``, as a sum of shifted views."""
    size = maps.shape[axis] - side + 1
    total = maps.narrow(axis, 0, size).clone()
    for offset in range(1, side):
        total.add_(maps.narrow(axis, offset, size))
    return total.div_(side)


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
