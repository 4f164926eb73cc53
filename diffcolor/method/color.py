"""Colour maths: sRGB <-> CIE Lab in torch, lightness, and gamut mapping.

Everything here is sRGB with the D65 white and the 2 degree observer, L* in
[0, 100] and a*/b* unscaled (roughly -128..127), on tensors shaped
``(..., 3, H, W)``. The conversions are kornia's (``kornia.color.rgb_to_lab`` /
``lab_to_rgb``, a port of scikit-image's), so they are differentiable and run on
any device; this module adds what kornia does not have: lightness of gray levels
and back, and a gamut mapping that keeps L* exact.

Why L* matters: the product's archival invariant (docs/DESIGN.md §3.6, "Full-resolution
merge") is that a colourised derivative keeps the original's CIE L* within 1.0,
so gamut mapping may only ever give up chroma, never lightness.
"""

from __future__ import annotations

import torch
from kornia.color import lab_to_rgb as _kornia_lab_to_rgb
from kornia.color import linear_rgb_to_rgb as _kornia_linear_rgb_to_rgb
from kornia.color import rgb_to_lab as _kornia_rgb_to_lab

from diffcolor.common.pixels import describe

# kornia's (and scikit-image's) CIE constants, repeated here only for the inverse
# of the lightness curve, so that gray -> L* -> gray is exact to float precision.
_LAB_EPSILON = 0.008856  # Y/Yn below which L* is linear in Y (kornia's value)
_LAB_KAPPA_SLOPE = 7.787  # slope of f(t) on the linear segment (kornia's value)
_LAB_F_THRESHOLD = _LAB_EPSILON ** (1.0 / 3.0)  # f(t) at the segment change

# How far outside [0, 1] an sRGB channel may be and still count as in gamut. It
# absorbs float round-off (e.g. L*=100, a*=b*=0 gives 1.00001 because kornia's
# white point and matrix disagree in the 5th digit); clipping by this much moves
# L* by under 0.01. Ours.
_GAMUT_TOLERANCE = 1e-4


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """Convert sRGB to CIE Lab (D65).

    Args:
        rgb: ``(..., 3, H, W)`` float tensor, sRGB-encoded, nominally in [0, 1].

    Returns:
        ``(..., 3, H, W)`` tensor of L* (0..100), a*, b* (unscaled). Differentiable.

    Raises:
        ValueError: if ``rgb`` is not a floating tensor with 3 channels at dim -3.
    """
    _check_three_channels(rgb, "rgb")
    return _kornia_rgb_to_lab(rgb)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Convert CIE Lab (D65) to sRGB, without clipping.

    Args:
        lab: ``(..., 3, H, W)`` float tensor of L*, a*, b*.

    Returns:
        ``(..., 3, H, W)`` sRGB-encoded tensor. Colours outside the sRGB gamut give
        values outside [0, 1]; use :func:`gamut_map_lab` to bring them in while
        keeping L*.

    Raises:
        ValueError: if ``lab`` is not a floating tensor with 3 channels at dim -3.
    """
    _check_three_channels(lab, "lab")
    return _kornia_lab_to_rgb(lab, clip=False)


def lightness(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L* of an sRGB image, differentiable everywhere.

    Used inside training losses, so the gradient must stay finite at black and
    slightly outside [0, 1]. kornia already guards both singular points: the
    sRGB linearisation clamps its base at 0 before the 2.4 power, and the cube
    root is taken of ``max(Y, 0.008856)`` with the linear segment used below
    that, so neither ``pow`` ever sees 0.

    Args:
        rgb: ``(..., 3, H, W)`` float tensor, sRGB-encoded.

    Returns:
        ``(..., 1, H, W)`` tensor of L* in [0, 100] for inputs in [0, 1].

    Raises:
        ValueError: if ``rgb`` is not a floating tensor with 3 channels at dim -3.
    """
    _check_three_channels(rgb, "rgb")
    return _kornia_rgb_to_lab(rgb)[..., :1, :, :]


def gray_lightness(gray: torch.Tensor) -> torch.Tensor:
    """CIE L* of gray levels read as sRGB-encoded neutral gray.

    Args:
        gray: float tensor of any shape with values in [0, 1] (0 black, 1 white).

    Returns:
        Tensor of the same shape and dtype holding L* (0..100); exactly the L* that
        :func:`rgb_to_lab` gives for the pixel (g, g, g).

    Raises:
        ValueError: if ``gray`` is not a floating tensor.
    """
    if not isinstance(gray, torch.Tensor) or not gray.is_floating_point():
        raise ValueError(f"gray must be a floating torch.Tensor, got {describe(gray)}")
    # 1. Lay the values out as one row of neutral RGB pixels, (3, 1, N).
    flat = gray.reshape(1, 1, -1).expand(3, 1, -1)
    # 2. Same conversion as colour pixels, so gray and colour L* agree exactly.
    return _kornia_rgb_to_lab(flat)[0].reshape(gray.shape)


def gray_from_lightness(lightness_values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`gray_lightness`: the sRGB gray level having a given L*.

    Args:
        lightness_values: float tensor of any shape, L* in [0, 100].

    Returns:
        Tensor of the same shape: sRGB-encoded gray levels in [0, 1] (values of L*
        outside [0, 100] give levels outside [0, 1]; not clipped).

    Raises:
        ValueError: if the input is not a floating tensor.
    """
    if not isinstance(lightness_values, torch.Tensor) or not lightness_values.is_floating_point():
        raise ValueError(
            f"lightness_values must be a floating torch.Tensor, got {describe(lightness_values)}"
        )
    # 1. Invert L* = 116 f(Y) - 16 with the branch choice of kornia's forward curve.
    f = (lightness_values + 16.0) / 116.0
    luminance = torch.where(
        f > _LAB_F_THRESHOLD,
        f.clamp(min=0.0) ** 3,
        (f - 4.0 / 29.0) / _LAB_KAPPA_SLOPE,
    )
    # 2. Encode relative luminance with the sRGB transfer curve (kornia's).
    flat = luminance.reshape(1, 1, -1).expand(3, 1, -1)
    return _kornia_linear_rgb_to_rgb(flat)[0].reshape(lightness_values.shape)


@torch.no_grad()
def gamut_map_lab(lab: torch.Tensor, iterations: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring Lab colours into the sRGB gamut by reducing chroma only.

    An out-of-gamut pixel keeps its L* and hue angle; its (a*, b*) is scaled by the
    largest factor ``s`` in [0, 1] that lands inside the gamut, found by bisection
    over ``s`` on the out-of-gamut pixels alone (``s = 0``, the neutral gray of the
    same L*, is always inside). Only pixels whose L* lies outside [0, 100] lose
    lightness: their L* is clamped first. Not differentiable (runs under no_grad).

    Args:
        lab: ``(..., 3, H, W)`` float tensor of L*, a*, b*.
        iterations: bisection steps; the chroma scale is found to ``2**-iterations``.

    Returns:
        ``(rgb, reduced)``: ``rgb`` ``(..., 3, H, W)`` sRGB in [0, 1] with the dtype of
        ``lab``; ``reduced`` ``(..., 1, H, W)`` bool, True where chroma was reduced.

    Raises:
        ValueError: if ``lab`` does not have 3 channels at dim -3, or ``iterations``
            is not a positive integer.
    """
    _check_three_channels(lab, "lab")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")

    # 1. Clamp L* to its range; this is the only place lightness can change.
    lab = torch.cat([lab[..., :1, :, :].clamp(0.0, 100.0), lab[..., 1:, :, :]], dim=-3)

    # 2. Convert once and find the pixels outside the gamut.
    rgb = _kornia_lab_to_rgb(lab, clip=False)
    reduced = ~_inside_gamut(rgb, dim=-3, keepdim=True)

    # 3. Bisect the chroma scale of the out-of-gamut pixels, as one (N, 3) batch.
    if bool(reduced.any()):
        pixels_lab = lab.movedim(-3, -1)[reduced.squeeze(-3)]  # (N, 3)
        pixels_rgb = _bisect_chroma_scale(pixels_lab, iterations)
        rgb_last = rgb.movedim(-3, -1).clone()
        rgb_last[reduced.squeeze(-3)] = pixels_rgb
        rgb = rgb_last.movedim(-1, -3)

    # 4. Clip the round-off that the tolerance let through.
    return rgb.clamp(0.0, 1.0), reduced


def _bisect_chroma_scale(pixels_lab: torch.Tensor, iterations: int) -> torch.Tensor:
    """sRGB of (N, 3) Lab pixels with chroma scaled to the gamut boundary."""
    lightness_column = pixels_lab[:, :1]
    ab = pixels_lab[:, 1:]
    low = torch.zeros_like(lightness_column)  # known inside
    high = torch.ones_like(lightness_column)  # known outside
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        inside = _inside_gamut(_pixels_lab_to_rgb(torch.cat([lightness_column, mid * ab], dim=1)), dim=1)
        inside = inside.unsqueeze(1)
        low = torch.where(inside, mid, low)
        high = torch.where(inside, high, mid)
    return _pixels_lab_to_rgb(torch.cat([lightness_column, low * ab], dim=1))


def _pixels_lab_to_rgb(pixels_lab: torch.Tensor) -> torch.Tensor:
    """kornia's Lab -> sRGB on an (N, 3) batch of pixels, unclipped."""
    as_image = pixels_lab.transpose(0, 1).unsqueeze(1)  # (3, 1, N)
    return _kornia_lab_to_rgb(as_image, clip=False).squeeze(1).transpose(0, 1)


def _inside_gamut(rgb: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """True where every channel of ``rgb`` along ``dim`` is within [0, 1] (+ tolerance)."""
    inside = (rgb >= -_GAMUT_TOLERANCE) & (rgb <= 1.0 + _GAMUT_TOLERANCE)
    return inside.all(dim=dim, keepdim=keepdim)


def _check_three_channels(tensor: object, name: str) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating torch.Tensor, got {describe(tensor)}")
    if tensor.dim() < 3 or tensor.shape[-3] != 3:
        raise ValueError(f"{name} must have shape (..., 3, H, W), got {tuple(tensor.shape)}")
