"""Colour maths: conversions match a reference, lightness is safe to train on,
gamut mapping gives up chroma only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from diffcolor.method.color import (
    gamut_map_lab,
    gray_from_lightness,
    gray_lightness,
    lab_to_rgb,
    lightness,
    rgb_to_lab,
)


def _random_rgb(seed: int, shape=(3, 16, 24), dtype=torch.float64) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_rgb_to_lab_matches_reference_values_and_skimage():
    # pixels: white, black, sRGB red (textbook Lab 53.24, 80.09, 67.20)
    pixels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    lab = rgb_to_lab(pixels.reshape(3, 1, 3))[:, 0]  # (channel, pixel)
    np.testing.assert_allclose(lab[:, 0].numpy(), [100.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(lab[:, 1].numpy(), [0.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(lab[:, 2].numpy(), [53.24, 80.09, 67.20], atol=0.02)

    rgb = _random_rgb(0)
    ours = rgb_to_lab(rgb).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, rgb2lab(rgb.permute(1, 2, 0).numpy()), atol=1e-3)


def test_lab_round_trip_and_no_clipping():
    rgb = _random_rgb(1, shape=(2, 3, 8, 8))  # batched
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(rgb)).numpy(), rgb.numpy(), atol=1e-6)

    saturated = torch.tensor([50.0, 120.0, 0.0], dtype=torch.float64).reshape(3, 1, 1)
    out = lab_to_rgb(saturated)
    assert float(out.min()) < 0.0 or float(out.max()) > 1.0  # out of gamut, not clipped


def test_lightness_shape_value_and_finite_gradient_at_black_and_edges():
    rgb = _random_rgb(2, shape=(2, 3, 5, 7))
    out = lightness(rgb)
    assert out.shape == (2, 1, 5, 7)
    torch.testing.assert_close(out, rgb_to_lab(rgb)[:, :1])

    for value in (0.0, 1.0, -0.01, 1.02, 1e-9):
        x = torch.full((1, 3, 2, 2), value, requires_grad=True)
        lightness(x).sum().backward()
        assert torch.isfinite(x.grad).all(), f"gradient not finite at {value}"
        assert (x.grad > 0).all(), f"lightness must increase with every channel at {value}"


def test_gray_lightness_keeps_shape_and_matches_neutral_rgb():
    gray = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(gray_lightness(gray).numpy(), [0.0, 53.389, 100.0], atol=0.01)

    image = _random_rgb(3, shape=(2, 1, 6, 9))
    assert gray_lightness(image).shape == image.shape
    assert gray_lightness(image[0, 0]).shape == (6, 9)
    neutral = image.expand(2, 3, 6, 9)
    torch.testing.assert_close(gray_lightness(image), lightness(neutral))


def test_gray_from_lightness_inverts_gray_lightness_exactly():
    levels = torch.linspace(0.0, 1.0, 65536, dtype=torch.float64)
    back = gray_from_lightness(gray_lightness(levels))
    assert float((back - levels).abs().max()) < 1e-12


def test_gamut_map_leaves_in_gamut_pixels_untouched():
    rgb = _random_rgb(4, shape=(3, 10, 10), dtype=torch.float32)
    mapped, reduced = gamut_map_lab(rgb_to_lab(rgb))
    assert reduced.shape == (1, 10, 10) and reduced.dtype == torch.bool
    assert not reduced.any()
    torch.testing.assert_close(mapped, rgb, atol=1e-5, rtol=0)


def test_gamut_map_keeps_lightness_and_hue_and_reaches_the_boundary():
    generator = torch.Generator().manual_seed(5)
    n = 4000
    lab = torch.stack(
        [
            torch.rand(n, generator=generator) * 100.0,
            (torch.rand(n, generator=generator) - 0.5) * 300.0,
            (torch.rand(n, generator=generator) - 0.5) * 300.0,
        ]
    ).reshape(3, 40, 100)
    mapped, reduced = gamut_map_lab(lab)

    assert 0.5 < float(reduced.float().mean()) < 1.0  # most of these are out of gamut
    assert float(mapped.min()) >= 0.0 and float(mapped.max()) <= 1.0
    back = rgb_to_lab(mapped)
    # L* kept for every pixel (float32 working precision)
    assert float((back[0] - lab[0]).abs().max()) < 0.05
    # hue kept where there is chroma left to have a hue
    out_chroma = torch.hypot(back[1], back[2])
    has_hue = reduced[0] & (out_chroma > 5.0)
    hue_in = torch.atan2(lab[2], lab[1])[has_hue]
    hue_out = torch.atan2(back[2], back[1])[has_hue]
    hue_error = torch.remainder(hue_out - hue_in + torch.pi, 2 * torch.pi) - torch.pi
    assert float(hue_error.abs().max()) < 0.05
    # chroma only ever reduced, and the reduced pixels sit on the gamut boundary
    in_chroma = torch.hypot(lab[1], lab[2])
    assert bool((out_chroma <= in_chroma + 0.05).all())
    on_boundary = ((mapped <= 1e-3) | (mapped >= 1 - 1e-3)).any(dim=0)
    assert bool(on_boundary[reduced[0]].all())
    # whereas plain clipping would have moved L* a lot
    clipped = rgb_to_lab(lab_to_rgb(lab).clamp(0, 1))
    assert float((clipped[0] - lab[0]).abs().max()) > 5.0


def test_gamut_map_clamps_only_out_of_range_lightness_and_is_batched():
    lab = torch.tensor([[120.0, -5.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 3, 1, 2).expand(2, 3, 1, 2)
    mapped, reduced = gamut_map_lab(lab)
    assert mapped.shape == (2, 3, 1, 2) and reduced.shape == (2, 1, 1, 2)
    np.testing.assert_allclose(rgb_to_lab(mapped)[:, 0].numpy(), np.broadcast_to([[100.0, 0.0]], (2, 1, 2)), atol=0.01)


def test_gamut_map_rejects_bad_arguments():
    with pytest.raises(ValueError, match="iterations"):
        gamut_map_lab(torch.zeros(3, 2, 2), iterations=0)
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        gamut_map_lab(torch.zeros(2, 2, 2))
