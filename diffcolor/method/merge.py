"""Full-resolution merge: model-resolution chroma onto the original's lightness.

docs/DESIGN.md §3.6, "Full-resolution merge". The model works at about 512x512; the
archive wants the original's pixel size, bit depth and exact lightness. So the
derivative takes its L* from the original at full resolution and only its chroma
(a*, b*) from the model:

1. L* of the original, at full resolution (closed form for neutral gray).
2. Chroma refined with a guided filter (He et al. 2010/2013) guided by that L*,
   so colour edges snap to the original's luminance edges instead of the blur of
   bilinear upsampling. The filter is the fast guided filter (He and Sun 2015):
   its coefficients are computed on a grid of cells of about a sixth of the
   filter radius (from the cell means of L*, L*^2, the bilinearly upsampled
   chroma p and L* p, with box windows as wide as the full-resolution window),
   upsampled bilinearly and applied at full resolution as
   ``(a*, b*) = A * L* + B``: a few operations per pixel whatever the radius.
3. Original L* + refined chroma to linear sRGB; only the pixels outside the gamut
   have their chroma reduced (the chroma scale bisected, hue and L* kept, as
   ``color.gamut_map_lab`` does); then encoded and quantised to the original's
   bit depth.
4. Luminance fidelity of the quantised codes against the source L*, accumulated
   strip by strip (``metrics.FidelityAccumulator``).

Invariant (tested): |L*(output) - L*(source)| <= 1.0 for every pixel whose chroma
was not reduced, at 8 and 16 bits; the fraction of pixels whose chroma was visibly
reduced is reported (:data:`VISIBLE_CHROMA`: a black silhouette reports none).

The image is processed in horizontal strips twice (cell means, then the output),
so working memory is a small multiple of one strip plus the output and the cell
grid (six float32 maps of one value per cell, a cell being about 3x3 pixels at
a 24 Mpx scan's upscale), and no full-size float copy is made. :class:`StripMerge`
hands the output's strips out as they are made, so that a caller encoding them
(the pipeline writing a master) never holds the output whole either. The strips need no halo: the result does not depend on the strip
size. Everything runs in torch on the given device (CUDA where the item runs
there); on the CPU the result is identical run to run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from diffcolor.common.errors import UserError
from diffcolor.method.metrics import FidelityAccumulator

# kornia's (and so scikit-image's) sRGB / CIE Lab constants (D65, 2 degree observer),
# written out so that each step is a few in-place tensor operations without branches.
_SRGB_KNEE = 0.04045  # encoded value below which sRGB is linear
_LINEAR_KNEE = 0.0031308  # linear value of the same point
_LAB_EPSILON = 0.008856  # Y/Yn below which L* is linear in Y
_LAB_F_KNEE = 0.2068966  # f(t) at the same point
_LAB_KAPPA_SLOPE = 7.787
_WHITE_X, _WHITE_Z = 0.95047, 1.08883
_XYZ_TO_RGB = (
    (3.2404813432005266, -1.5371515162713185, -0.4985363261688878),
    (-0.9692549499965682, 1.8759900014898907, 0.0415559265582928),
    (0.0556466391351772, -0.2040413383665112, 1.0573110696453443),
)
_LUMINANCE = (0.212671, 0.715160, 0.072169)  # Y of linear sRGB (row 2 of the RGB -> XYZ matrix)
# color.gamut_map_lab's tolerance of 1e-4 on encoded sRGB, as bounds on linear values.
_LINEAR_LOW = -1e-4 / 12.92
_LINEAR_HIGH = ((1.0 + 1e-4 + 0.055) / 1.055) ** 2.4
# A just-noticeable difference of chroma, in Delta E*ab (about 2.3: Sharma, Digital Color Imaging Handbook, 2003).
# A pixel counts as gamut-clipped when the mapping took away more than this AND the gamut holds at least this
# much chroma of its hue at its L*: near black and near white (a silhouette, a blown sky) no chroma can be
# shown at all, so reducing it there loses nothing a viewer could see.
VISIBLE_CHROMA = 2.3


@dataclass(frozen=True)
class MergeConfig:
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
    # Fast guided filter: cells per filter radius, so the coefficient grid's cell
    # side is radius / this, rounded down (at least 1 px). 6 keeps the result
    # within 0.5 mean and 2 max a*b* of the full-resolution filter at saturated
    # chroma edges (tested; 4 gave a max of 2.3); the grid has about 1/9 of the
    # pixels at a 24 Mpx scan's upscale. Ours.
    cells_per_radius: float = 6.0
    # Bisection steps of the chroma-only gamut mapping (scale found to 2**-16). Ours.
    gamut_iterations: int = 16
    # Source pixels per processing strip. The working set is roughly 100 bytes per
    # strip pixel (float32 L*, chroma coefficients, linear RGB), so the default
    # bounds it near 25 MB whatever the image size. Ours.
    strip_pixels: int = 1 << 18


@dataclass
class MergedImage:
    """The merged derivative and its luminance-fidelity numbers."""

    rgb: np.ndarray  # (H, W, 3) uint8 for bit_depth 8, uint16 for bit_depth 16
    gamut_clipped_fraction: float  # fraction of pixels whose chroma was visibly reduced (see VISIBLE_CHROMA)
    max_delta_l: float  # max |L*(output) - L*(source)| over pixels not reduced
    mean_delta_l: float  # mean of the same
    ssim_l: float  # SSIM of the two L* channels, data_range 100


def merge_full_resolution(
    gray: np.ndarray,
    chroma_ab: torch.Tensor,
    bit_depth: int,
    config: MergeConfig = MergeConfig(),
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MergedImage:
    """Combine the original's full-resolution L* with model-resolution chroma.

    Args:
        gray: (H, W) float array in [0, 1], sRGB-encoded gray levels of the
            original at its own resolution; or its uint8/uint16 codes (levels
            times 255 or 65535), which a strip at a time turns into levels:
            a large scan then needs no full-size float copy.
        chroma_ab: (2, h, w) float tensor of a*, b* at model resolution (any device).
            Its aspect may differ slightly from the original's (rounding to
            multiples of 8); it is stretched to (H, W).
        bit_depth: 8 (uint8 output) or 16 (uint16 output).
        config: filter and processing parameters.
        device: where the merge computes (``None``: the CPU). The image goes there
            strip by strip and the quantised codes come back.
        progress: called as ``progress(rows_done, total_rows)`` after every strip of
            both passes (``total_rows`` is twice the height); what it raises stops
            the merge there.

    Returns:
        :class:`MergedImage` with the quantised RGB and its fidelity metrics, the
        L* deltas measured after quantisation.

    Raises:
        ValueError: for ``bit_depth`` not in (8, 16), a ``gray`` that is not a 2-D
            float array in [0, 1], or a ``chroma_ab`` that is not a finite
            (2, h, w) float tensor.
    """
    merge = StripMerge(gray, chroma_ab, bit_depth, config, device, progress)
    rgb = np.empty((*gray.shape, 3), dtype=np.uint8 if bit_depth == 8 else np.uint16)
    top = 0
    for strip in merge:
        rgb[top : top + strip.shape[0]] = strip
        top += strip.shape[0]
    return MergedImage(rgb=rgb, **dataclasses.asdict(merge.numbers))


@dataclass(frozen=True)
class MergeNumbers:
    """The merged derivative's luminance-fidelity numbers (:class:`MergedImage`'s, without the pixels)."""

    gamut_clipped_fraction: float
    max_delta_l: float
    mean_delta_l: float
    ssim_l: float


class StripMerge:
    """:func:`merge_full_resolution` as strips: iterating gives the output's rows top to bottom as
    (rows, W, 3) uint8 or uint16 arrays, so a caller can encode them as they come and never hold the whole
    image; :attr:`numbers` is set once the last strip is out. Same arguments, same checks, the same pixels."""

    def __init__(self, gray: np.ndarray, chroma_ab: torch.Tensor, bit_depth: int,
                 config: MergeConfig = MergeConfig(), device: torch.device | str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        _check_inputs(gray, chroma_ab, bit_depth, config)
        self.progress = progress
        self.gray, self.chroma_ab, self.bit_depth, self.config = gray, chroma_ab, bit_depth, config
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.height, self.width = gray.shape
        self.numbers: MergeNumbers | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        # 1. The inputs on the device.
        gray, config, device, height, width = self.gray, self.config, self.device, self.height, self.width
        chroma = self.chroma_ab.detach().to(device=device, dtype=torch.float32)
        max_code = 255 if self.bit_depth == 8 else 65535
        out_dtype = np.uint8 if self.bit_depth == 8 else np.uint16

        # 2. Filter size from the upscale factor, the cell grid of the coefficients.
        scale = max(height / chroma.shape[1], width / chroma.shape[2])
        radius = max(config.min_radius, int(round(config.radius_per_scale * scale)))
        radius = max(0, min(radius, height - 1, width - 1))  # the window stays inside the image
        cell = max(1, int(radius / config.cells_per_radius))
        strip_rows = max(cell, config.strip_pixels // width // cell * cell)  # whole cells per strip

        with torch.no_grad():
            # 3. First pass: the cell means of L*, L*^2, the bilinearly upsampled chroma p and L* p.
            cell_means = _cell_means(gray, chroma, strip_rows, cell, device, self.progress)

            # 4. Guided-filter coefficients on the cell grid: (A_a, A_b, B_a, B_b).
            coefficients = _guided_coefficients(cell_means, (2 * radius + 1) / cell, config.eps * 100.0**2)
            del cell_means

        # 5. Second pass: L*, chroma, sRGB with chroma-only gamut mapping, quantised; fidelity. Each strip
        #    goes out as soon as it is made (outside no_grad: the consumer's code runs between strips).
        fidelity = FidelityAccumulator(height, width)
        clipped_count = 0
        for top in range(0, height, strip_rows):
            bottom = min(height, top + strip_rows)
            with torch.no_grad():
                source_l, luminance = _neutral_lightness(_strip(gray, top, bottom, device))
                a_star, b_star = _apply_coefficients(coefficients, source_l, top, bottom, cell, width)
                linear, reduced, clipped = _lab_to_linear_rgb_in_gamut(source_l, a_star, b_star, luminance,
                                                                        config.gamut_iterations)
                codes = _encode_and_quantise(linear, max_code)
                fidelity.add(source_l, _lightness_of_codes(codes, max_code), ignore=reduced)
                clipped_count += clipped
                strip = codes.permute(1, 2, 0).to(torch.int32).cpu().numpy().astype(out_dtype)
            if bottom == height:  # 6. Fidelity of the quantised result against the source, set before the
                #                         last strip goes out: a consumer that stops once it has every row has it.
                numbers = fidelity.result()
                self.numbers = MergeNumbers(
                    gamut_clipped_fraction=clipped_count / (height * width),
                    max_delta_l=numbers["max_delta_l"],
                    mean_delta_l=numbers["mean_delta_l"],
                    ssim_l=numbers["ssim_l"],
                )
            if self.progress is not None:
                self.progress(height + bottom, 2 * height)
            yield strip


def _cell_means(gray: np.ndarray, chroma: torch.Tensor, strip_rows: int, cell: int,
                device: torch.device, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(6, H/cell, W/cell) means over ``cell`` x ``cell`` cells of L*, L*^2, the chroma p upsampled bilinearly
    to the full size, and L* p: the guided filter's statistics, gathered strip by strip (no full-size map)."""
    height, width = gray.shape
    chroma_columns = F.interpolate(chroma[None], size=(chroma.shape[1], width), mode="bilinear",
                                   align_corners=False)[0]  # (2, h, W): the width done once
    sums = []
    for top in range(0, height, strip_rows):
        bottom = min(height, top + strip_rows)
        maps = torch.empty((6, bottom - top, width), dtype=torch.float32, device=device)
        source_l, _ = _neutral_lightness(_strip(gray, top, bottom, device))
        maps[0] = source_l
        torch.mul(source_l, source_l, out=maps[1])
        maps[2:4] = _upsample_rows(chroma_columns, top, bottom, chroma.shape[1] / height)
        torch.mul(maps[2:4], source_l, out=maps[4:6])
        sums.append(F.avg_pool2d(maps[None], cell, ceil_mode=True)[0])
        if progress is not None:
            progress(bottom, 2 * height)
    return torch.cat(sums, dim=1)


def _strip(gray: np.ndarray, top: int, bottom: int, device: torch.device) -> torch.Tensor:
    """Rows [top, bottom) of ``gray`` as float32 levels on ``device`` (a copy: the steps work on it in place)."""
    strip = gray[top:bottom]
    if gray.dtype.kind == "u":  # codes: the levels they stand for, rounded to float32 as float64 levels would be
        strip = strip / float(np.iinfo(gray.dtype).max)
    return torch.from_numpy(np.array(strip, dtype=np.float32)).to(device)


def _pow(values: torch.Tensor, exponent: float) -> torch.Tensor:
    """``values ** exponent`` in place for positive values, as exp(exponent * log): vectorised on a CPU,
    where torch's float pow is not."""
    return values.log_().mul_(exponent).exp_()


def _neutral_lightness(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L*, Y) of sRGB-encoded neutral gray levels, kornia's curves without branches (their two
    pieces meet within 4e-5 L*). ``gray`` is overwritten."""
    # 1. Linearise: ((g + 0.055) / 1.055) ** 2.4 above the knee, g / 12.92 below.
    below = torch.clamp(gray, max=_SRGB_KNEE).sub_(_SRGB_KNEE).div_(12.92)
    log_u = gray.clamp_(min=_SRGB_KNEE).add_(0.055).div_(1.055).log_()
    luminance = torch.mul(log_u, 2.4).exp_().add_(below)
    # 2. L* = 116 Y ** (1/3) - 16 above epsilon (Y ** (1/3) = u ** 0.8 there), 903.3 Y below.
    lightness = log_u.clamp_(min=math.log(_LAB_EPSILON) / 2.4).mul_(0.8).exp_().mul_(116.0).sub_(16.0)
    lightness.add_(torch.clamp(luminance, max=_LAB_EPSILON).sub_(_LAB_EPSILON), alpha=116.0 * _LAB_KAPPA_SLOPE)
    return lightness.clamp_(0.0, 100.0), luminance


def _upsample_rows(source: torch.Tensor, top: int, bottom: int, scale: float, first: int = 0) -> torch.Tensor:
    """Rows [top, bottom) of the (C, n, W) maps upsampled bilinearly along the height by 1 / ``scale``
    (source rows per output row), at ``interpolate``'s source rows (pixel centres, edges clamped).
    ``source`` holds the maps from row ``first`` to their last row. Each row's weights come
    from its own index, so a row is the same whatever strip it is computed in."""
    rows = first + source.shape[1]
    position = ((torch.arange(top, bottom, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_(min=0.0)
    upper = position.floor().long().clamp_(max=rows - 1)
    lower = (upper + 1).clamp_(max=rows - 1)
    weight = (position - upper).float().to(source.device)[None, :, None]
    return torch.lerp(source.index_select(1, (upper - first).to(source.device)),
                      source.index_select(1, (lower - first).to(source.device)), weight)


def _box_weights(window_cells: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1-D weights of a box ``window_cells`` cells wide centred on a cell: each cell weighs the part of it
    the window covers, so the window spans as many pixels as the full-resolution one."""
    half = window_cells / 2.0
    reach = max(0, math.ceil(half - 0.5))
    offsets = torch.arange(-reach, reach + 1, dtype=dtype, device=device)
    weights = (torch.clamp(offsets + 0.5, max=half) - torch.clamp(offsets - 0.5, min=-half)).clamp_(min=0.0)
    return weights / weights.sum()


def _box_mean(maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Separable weighted box mean of (C, h, w) cell maps, as sums of shifted views (a handful of taps on
    the small grid), one channel at a time. The borders are mirrored about the image's edge, as
    kornia's reflected box blur mirrors the pixels about the first one: cell -1 is cell 0."""
    reach = weights.numel() // 2
    taps = [float(weight) for weight in weights]
    out = torch.empty_like(maps)
    for channel in range(maps.shape[0]):
        values = maps[channel]
        for axis in (0, 1):
            size = values.shape[axis]
            mirrored = torch.arange(-reach, size + reach, device=maps.device).remainder_(2 * size)
            mirrored = torch.where(mirrored >= size, 2 * size - 1 - mirrored, mirrored)
            padded = values.index_select(axis, mirrored)
            values = padded.narrow(axis, 0, size) * taps[0]
            for tap in range(1, len(taps)):
                values.add_(padded.narrow(axis, tap, size), alpha=taps[tap])
        out[channel] = values
    return out


def _guided_coefficients(cell_means: torch.Tensor, window_cells: float, eps: float) -> torch.Tensor:
    """(A_a, A_b, B_a, B_b) on the cell grid, each averaged over the window: the guided filter's output
    at a pixel is A * L* + B with A, B read bilinearly there (He and Sun 2015). ``cell_means`` holds the
    cell means of L*, L*^2, p_a, p_b, L* p_a, L* p_b; box means of cell means are the window's means.
    float32 is enough: the variances' cancellation costs about 1e-3 L*^2 against eps = 10 L*^2."""
    weights = _box_weights(window_cells, torch.float64, torch.device("cpu"))
    mean_l, mean_l2, mean_p, mean_lp = _box_mean(cell_means, weights).split([1, 1, 2, 2])
    variance = (mean_l2 - mean_l**2).clamp_(min=0.0)
    slope = (mean_lp - mean_l * mean_p).div_(variance.add_(eps))
    offset = mean_p - slope * mean_l
    return _box_mean(torch.cat([slope, offset]), weights)


def _apply_coefficients(coefficients: torch.Tensor, lightness: torch.Tensor, top: int, bottom: int, cell: int,
                        width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a*, b* of rows [top, bottom): the cell coefficients upsampled bilinearly onto them (the cell grid
    read as an image ``cell`` times smaller), times L* plus B."""
    rows = coefficients.shape[1]
    first = max(0, top // cell - 1)
    last = min(rows, -(-bottom // cell) + 1)
    block = coefficients[None, :, first:last]
    if cell > 1:  # along the width (the same for every strip), then along the height
        block = F.interpolate(block, size=(last - first, block.shape[3] * cell), mode="bilinear",
                              align_corners=False)
    block = _upsample_rows(block[0, :, :, :width], top, bottom, 1.0 / cell, first)
    a_star = torch.addcmul(block[2], block[0], lightness)
    b_star = torch.addcmul(block[3], block[1], lightness)
    return a_star, b_star


def _lab_f_inverse(f: torch.Tensor) -> torch.Tensor:
    """kornia's inverse of the Lab companding, in place: f ** 3 above 6/29, (f - 4/29) / 7.787 below."""
    below = torch.clamp(f, max=_LAB_F_KNEE).sub_(_LAB_F_KNEE).div_(_LAB_KAPPA_SLOPE)
    f.clamp_(min=_LAB_F_KNEE)
    return f.mul(f).mul_(f).add_(below)


def _lab_to_linear(lightness: torch.Tensor, a_star: torch.Tensor, b_star: torch.Tensor,
                   luminance: torch.Tensor) -> torch.Tensor:
    """(3, ...) linear sRGB of L*, a*, b* whose Y (the luminance of L*) is given; unclipped."""
    fy = (lightness + 16.0) / 116.0
    x = _lab_f_inverse(torch.add(fy, a_star, alpha=1.0 / 500.0)).mul_(_WHITE_X)
    z = _lab_f_inverse(torch.add(fy, b_star, alpha=-1.0 / 200.0).clamp_(min=0.0)).mul_(_WHITE_Z)
    linear = torch.empty((3, *lightness.shape), dtype=lightness.dtype, device=lightness.device)
    for channel, (cx, cy, cz) in enumerate(_XYZ_TO_RGB):
        torch.mul(x, cx, out=linear[channel])
        linear[channel].add_(luminance, alpha=cy).add_(z, alpha=cz)
    return linear


def _outside_gamut(linear: torch.Tensor) -> torch.Tensor:
    """True where a channel of the (3, ...) linear sRGB lies outside [0, 1] (+ tolerance)."""
    low = torch.minimum(torch.minimum(linear[0], linear[1]), linear[2])
    high = torch.maximum(torch.maximum(linear[0], linear[1]), linear[2])
    return (low < _LINEAR_LOW) | (high > _LINEAR_HIGH)


def _lab_to_linear_rgb_in_gamut(lightness: torch.Tensor, a_star: torch.Tensor, b_star: torch.Tensor,
                                luminance: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(linear sRGB (3, H, W) in [0, 1], reduced (H, W) bool, visibly clipped count): chroma-only gamut mapping
    of the pixels outside the gamut, by bisection of the chroma scale as ``color.gamut_map_lab`` does.

    The count is of the reduced pixels that lost more than :data:`VISIBLE_CHROMA` of chroma where the gamut
    holds at least that much of their hue at their L*."""
    linear = _lab_to_linear(lightness, a_star, b_star, luminance)
    reduced = _outside_gamut(linear)
    clipped = 0
    if bool(reduced.any()):
        # 1. The out-of-gamut pixels alone, as flat vectors.
        pixel_l, pixel_y = lightness[reduced], luminance[reduced]
        pixel_a, pixel_b = a_star[reduced], b_star[reduced]
        low = torch.zeros_like(pixel_l)  # known inside (the neutral gray of that L*); low + 2 step outside
        # 2. Bisect the scale; a step costs one Lab -> linear conversion of those pixels.
        for step in (0.5**k for k in range(1, iterations + 1)):
            middle = low + step
            outside = _outside_gamut(_lab_to_linear(pixel_l, pixel_a * middle, pixel_b * middle, pixel_y))
            low.add_(outside.logical_not_().to(low.dtype), alpha=step)
        mapped = _lab_to_linear(pixel_l, pixel_a * low, pixel_b * low, pixel_y)
        chroma = torch.hypot(pixel_a, pixel_b)
        kept = chroma * low
        clipped = int(((kept >= VISIBLE_CHROMA) & (chroma - kept > VISIBLE_CHROMA)).sum())
        for channel in range(3):
            linear[channel][reduced] = mapped[channel]
    # 3. Clip the round-off that the tolerance let through.
    return linear.clamp_(0.0, 1.0), reduced, clipped


def _encode_and_quantise(linear: torch.Tensor, max_code: int) -> torch.Tensor:
    """Codes 0..max_code (as floats) of linear sRGB in [0, 1], in place: kornia's sRGB curve
    (1.055 v ** (1/2.4) - 0.055 above the knee, 12.92 v below), rounded."""
    below = torch.clamp(linear, max=_LINEAR_KNEE).sub_(_LINEAR_KNEE).mul_(12.92 * max_code)
    encoded = _pow(linear.clamp_(min=_LINEAR_KNEE), 1.0 / 2.4).mul_(1.055 * max_code).sub_(0.055 * max_code)
    return encoded.add_(below).round_().clamp_(0.0, float(max_code))


def _lightness_of_codes(codes: torch.Tensor, max_code: int) -> torch.Tensor:
    """L* of (3, H, W) sRGB codes (kornia's conversion, the curves without branches)."""
    values = codes / max_code
    below = torch.clamp(values, max=_SRGB_KNEE).div_(12.92)
    linear = _pow(values.clamp_(min=_SRGB_KNEE).add_(0.055).div_(1.055), 2.4)
    linear.add_(below).sub_(_LINEAR_KNEE)  # the two pieces meet at the knee, within 3e-9
    luminance = torch.mul(linear[0], _LUMINANCE[0])
    luminance.add_(linear[1], alpha=_LUMINANCE[1]).add_(linear[2], alpha=_LUMINANCE[2])
    below = torch.clamp(luminance, max=_LAB_EPSILON).sub_(_LAB_EPSILON).mul_(116.0 * _LAB_KAPPA_SLOPE)
    return _pow(luminance.clamp_(min=_LAB_EPSILON), 1.0 / 3.0).mul_(116.0).sub_(16.0).add_(below)


def _check_inputs(gray: np.ndarray, chroma_ab: torch.Tensor, bit_depth: int, config: MergeConfig) -> None:
    if isinstance(bit_depth, bool) or bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    codes = isinstance(gray, np.ndarray) and gray.dtype in (np.uint8, np.uint16)
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or not (np.issubdtype(gray.dtype, np.floating) or codes):
        described = f"{gray.dtype} array of shape {gray.shape}" if isinstance(gray, np.ndarray) else type(gray).__name__
        raise ValueError(f"gray must be a 2-D float array in [0, 1] or uint8/uint16 codes, got {described}")
    if gray.size == 0:
        raise ValueError(f"gray must not be empty, got shape {gray.shape}")
    low, high = (0.0, 1.0) if codes else (float(gray.min()), float(gray.max()))  # every code is a level
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
    if (
        config.strip_pixels < 1
        or config.min_radius < 1
        or config.eps <= 0
        or config.radius_per_scale < 0
        or not config.cells_per_radius > 0
        or config.gamut_iterations < 1
    ):
        raise UserError(f"invalid MergeConfig: {config}")
