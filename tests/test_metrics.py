"""Metrics: colourfulness on hand-computable images, luminance fidelity, run summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffcolor.archive.report import summarise
from diffcolor.method.metrics import colorfulness, lightness_fidelity


def test_colorfulness_is_zero_for_gray_in_every_dtype():
    rng = np.random.default_rng(0)
    levels = rng.random((20, 30))
    for image in (
        np.repeat(levels[..., None], 3, axis=2),
        np.repeat((levels * 255).astype(np.uint8)[..., None], 3, axis=2),
        np.repeat((levels * 65535).astype(np.uint16)[..., None], 3, axis=2),
    ):
        assert colorfulness(image) == pytest.approx(0.0, abs=1e-9)


def test_colorfulness_known_values():
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    # uniform red: rg = 255, yb = 127.5, no spread -> 0.3 * |(255, 127.5)|
    assert colorfulness(red) == pytest.approx(0.3 * math.hypot(255, 127.5))

    half = red.copy()
    half[:, :2] = 0  # half red, half black: rg in {0, 255}, yb in {0, 127.5}
    expected = math.hypot(127.5, 63.75) + 0.3 * math.hypot(127.5, 63.75)
    assert colorfulness(half) == pytest.approx(expected)
    # the same image at 16 bits and as floats scores the same
    assert colorfulness(half.astype(np.uint16) * 257) == pytest.approx(expected)
    assert colorfulness(half / 255.0) == pytest.approx(expected)


def test_colorfulness_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        colorfulness(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="1.5"):
        colorfulness(np.full((2, 2, 3), 1.5))


def test_lightness_fidelity_identity_and_known_offset():
    rng = np.random.default_rng(1)
    gray = rng.random((32, 40))
    same = np.repeat(gray[..., None], 3, axis=2)
    result = lightness_fidelity(gray, same)
    assert result["max_delta_l"] < 1e-9 and result["mean_delta_l"] < 1e-9
    assert result["ssim_l"] == pytest.approx(1.0)

    # a white output against a black source is off by exactly 100 L*
    black = np.zeros((8, 8))
    white = np.full((8, 8, 3), 255, dtype=np.uint8)
    result = lightness_fidelity(black, white)
    assert result["max_delta_l"] == pytest.approx(100.0, abs=0.01)
    assert result["mean_delta_l"] == pytest.approx(100.0, abs=0.01)
    assert result["ssim_l"] < 0.01


def test_lightness_fidelity_ignore_mask_and_chunking():
    from diffcolor.method.metrics import FidelityConfig

    gray = np.full((10, 12), 0.5)
    rgb = np.repeat(gray[..., None], 3, axis=2).copy()
    rgb[3, 4] = 1.0  # one wrong pixel
    ignore = np.zeros((10, 12), dtype=bool)
    assert lightness_fidelity(gray, rgb)["max_delta_l"] > 40
    ignore[3, 4] = True
    kept = lightness_fidelity(gray, rgb, ignore=ignore, config=FidelityConfig(chunk_pixels=7))
    assert kept["max_delta_l"] < 1e-9
    all_ignored = lightness_fidelity(gray, rgb, ignore=np.ones((10, 12), dtype=bool))
    assert math.isnan(all_ignored["max_delta_l"]) and math.isnan(all_ignored["mean_delta_l"])


def test_lightness_fidelity_in_strips_equals_one_full_pass():
    from skimage.color import rgb2lab
    from skimage.metrics import structural_similarity

    from diffcolor.method.metrics import FidelityConfig

    rng = np.random.default_rng(2)
    gray = rng.random((53, 41))
    rgb = np.clip(np.repeat(gray[..., None], 3, axis=2) + rng.normal(0, 0.05, (53, 41, 3)), 0, 1)
    reference_source = rgb2lab(np.repeat(gray[..., None], 3, axis=2))[..., 0]
    reference_output = rgb2lab(rgb)[..., 0]
    expected_ssim = structural_similarity(reference_source, reference_output, data_range=100.0)
    expected_delta = np.abs(reference_output - reference_source)
    for chunk_pixels in (41, 41 * 5, 1 << 20):  # one row per strip, five rows, everything
        result = lightness_fidelity(gray, rgb, config=FidelityConfig(chunk_pixels=chunk_pixels))
        assert result["ssim_l"] == pytest.approx(expected_ssim, abs=1e-5)
        assert result["max_delta_l"] == pytest.approx(expected_delta.max(), abs=1e-3)
        assert result["mean_delta_l"] == pytest.approx(expected_delta.mean(), abs=1e-3)


def test_lightness_fidelity_rejects_mismatches():
    with pytest.raises(ValueError, match="does not match"):
        lightness_fidelity(np.zeros((4, 4)), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="ignore"):
        lightness_fidelity(np.zeros((4, 4)), np.zeros((4, 4, 3)), ignore=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="-0.5"):
        lightness_fidelity(np.full((4, 4), -0.5), np.zeros((4, 4, 3)))


def test_summarise_ignores_nan_and_handles_empty():
    values = [float(v) for v in range(1, 101)] + [float("nan"), None]
    summary = summarise(values)
    assert summary["count"] == 100
    assert summary["mean"] == pytest.approx(50.5)
    assert summary["median"] == pytest.approx(50.5)
    assert summary["p5"] == pytest.approx(5.95)
    assert summary["p95"] == pytest.approx(95.05)
    assert (summary["min"], summary["max"]) == (1.0, 100.0)

    empty = summarise([float("nan")])
    assert empty["count"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["p95"])
    with pytest.raises(ValueError, match="numbers"):
        summarise(["a"])
