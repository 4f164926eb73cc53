"""Full-resolution merge: the archival luminance invariant, edge-aware chroma,
strip processing, loud errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.color import rgb2lab

from diffcolor.method.merge import MergeConfig, merge_full_resolution


def _gradient_noise_gray(height: int, width: int, seed: int = 0) -> np.ndarray:
    """16-bit gray levels: a ramp plus texture plus noise, covering black to white."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    gray = x / (width - 1) + 0.08 * np.sin(y / 17.0) + rng.normal(0.0, 0.04, (height, width))
    return np.round(np.clip(gray, 0.0, 1.0) * 65535) / 65535


def _saturated_chroma(height: int, width: int, seed: int = 1) -> torch.Tensor:
    """Smooth but strongly saturated a*/b* fields (|a*|, |b*| up to 100) plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    a = 100.0 * np.sin(x / 9.0) + rng.normal(0.0, 5.0, (height, width))
    b = 100.0 * np.cos(y / 7.0 + x / 23.0) + rng.normal(0.0, 5.0, (height, width))
    return torch.from_numpy(np.stack([a, b]).astype(np.float32))


def _reference_lightness(rgb: np.ndarray) -> np.ndarray:
    scale = 255.0 if rgb.dtype == np.uint8 else 65535.0
    return rgb2lab(rgb / scale)[..., 0]  # scikit-image: an implementation independent of ours


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_merge_keeps_source_lightness_at_full_resolution(bit_depth):
    gray = _gradient_noise_gray(900, 1200)
    chroma = _saturated_chroma(440, 592)  # model resolution, aspect rounded to multiples of 8

    merged = merge_full_resolution(gray, chroma, bit_depth)

    assert merged.rgb.shape == (900, 1200, 3)
    assert merged.rgb.dtype == (np.uint8 if bit_depth == 8 else np.uint16)
    assert 0.0 < merged.gamut_clipped_fraction < 0.9  # some chroma had to be reduced
    assert merged.max_delta_l <= 1.0
    assert merged.ssim_l > 0.99
    # checked independently, on every pixel, reduced ones included
    source_l = rgb2lab(np.repeat(gray[..., None], 3, axis=2))[..., 0]
    delta = np.abs(_reference_lightness(merged.rgb) - source_l)
    assert delta.max() <= 1.0
    assert merged.mean_delta_l <= (0.2 if bit_depth == 8 else 0.01)
    # and the colour is really there
    lab_out = rgb2lab(merged.rgb[::7, ::7] / (255.0 if bit_depth == 8 else 65535.0))
    chroma_out = np.hypot(lab_out[..., 1], lab_out[..., 2])
    assert np.median(chroma_out) > 15.0


def test_merge_carries_uniform_chroma_through():
    gray = np.full((60, 80), 0.55)
    chroma = torch.tensor([20.0, -10.0]).reshape(2, 1, 1).expand(2, 8, 10).contiguous()
    merged = merge_full_resolution(gray, chroma, 16)
    lab = rgb2lab(merged.rgb / 65535.0)
    assert merged.gamut_clipped_fraction == 0.0
    np.testing.assert_allclose(lab[..., 1], 20.0, atol=0.1)
    np.testing.assert_allclose(lab[..., 2], -10.0, atol=0.1)


def test_guided_refinement_snaps_chroma_to_luminance_edges():
    # A dark/bright step at a column the 8x coarser chroma grid cannot represent.
    height, width, edge = 64, 256, 101
    gray = np.where(np.arange(width) < edge, 0.3, 0.7)[None, :].repeat(height, axis=0)
    low_w = width // 8
    centers = (np.arange(low_w) + 0.5) * 8
    a_low = np.where(centers < edge, 40.0, -40.0)[None, :].repeat(height // 8, axis=0)
    chroma = torch.from_numpy(np.stack([a_low, np.zeros_like(a_low)]).astype(np.float32))

    merged = merge_full_resolution(gray, chroma, 16)
    a_out = rgb2lab(merged.rgb / 65535.0)[..., 1].mean(axis=0)
    a_bilinear = F.interpolate(chroma[None], size=(height, width), mode="bilinear")[0, 0].numpy().mean(axis=0)
    ideal = np.where(np.arange(width) < edge, 40.0, -40.0)

    near_edge = slice(edge - 10, edge + 10)
    guided_error = np.abs(a_out - ideal)[near_edge].mean()
    bilinear_error = np.abs(a_bilinear - ideal)[near_edge].mean()
    assert guided_error < 0.75 * bilinear_error
    # bilinear bleeds the dark side's red onto the bright side; the guided
    # result flips sign exactly at the luminance edge
    assert a_bilinear[edge] > 10 and a_bilinear[edge + 2] > 0
    assert a_out[edge - 1] > 30 and a_out[edge] < -10


def test_strips_give_the_same_image_as_one_pass():
    gray = _gradient_noise_gray(300, 200, seed=3)
    chroma = _saturated_chroma(75, 50, seed=4)
    whole = merge_full_resolution(gray, chroma, 16, MergeConfig(strip_pixels=1 << 30))
    strips = merge_full_resolution(gray, chroma, 16, MergeConfig(strip_pixels=37 * 200))
    difference = np.abs(whole.rgb.astype(np.int64) - strips.rgb.astype(np.int64))
    # float32 summation order only: a few codes out of 65535 (gamut-mapped pixels
    # amplify it a little), far below one 8-bit step
    assert difference.max() <= 64
    assert difference.mean() < 0.05
    assert strips.gamut_clipped_fraction == pytest.approx(whole.gamut_clipped_fraction, abs=1e-3)


def test_tiny_images_work():
    merged = merge_full_resolution(np.full((3, 2), 0.4), torch.zeros(2, 1, 1), 8)
    assert merged.rgb.shape == (3, 2, 3)
    assert (merged.rgb == 102).all()  # neutral chroma: the gray level itself, 0.4 * 255
    assert merged.max_delta_l < 0.01


@pytest.mark.parametrize(
    ("gray", "chroma", "bit_depth", "match"),
    [
        (np.zeros((4, 4)), torch.zeros(2, 2, 2), 12, "bit_depth must be 8 or 16, got 12"),
        (np.zeros((4, 4, 3)), torch.zeros(2, 2, 2), 8, r"2-D float array .* shape \(4, 4, 3\)"),
        (np.full((4, 4), 1.5), torch.zeros(2, 2, 2), 8, r"\[1.5, 1.5\]"),
        (np.zeros((4, 4), dtype=np.uint8), torch.zeros(2, 2, 2), 8, "uint8"),
        (np.zeros((4, 4)), torch.zeros(3, 2, 2), 8, r"\(2, h, w\).*\(3, 2, 2\)"),
        (np.zeros((4, 4)), torch.full((2, 2, 2), float("nan")), 8, "NaN"),
    ],
)
def test_merge_rejects_bad_inputs_naming_the_value(gray, chroma, bit_depth, match):
    with pytest.raises(ValueError, match=match):
        merge_full_resolution(gray, chroma, bit_depth)
