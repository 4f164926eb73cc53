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


def test_a_black_silhouette_is_not_reported_as_gamut_clipped():
    # Black (and white) can show no chroma: reducing the model's chroma there loses nothing visible.
    gray = np.zeros((60, 80))
    gray[:, 40:] = 1.0
    chroma = torch.tensor([40.0, 30.0]).reshape(2, 1, 1).expand(2, 8, 10).contiguous()
    merged = merge_full_resolution(gray, chroma, 8)
    assert merged.gamut_clipped_fraction == 0.0
    # A mid gray asked for more chroma than sRGB holds at its L* is clipped, visibly, everywhere.
    vivid = torch.tensor([120.0, 90.0]).reshape(2, 1, 1).expand(2, 8, 10).contiguous()
    assert merge_full_resolution(np.full((60, 80), 0.5), vivid, 8).gamut_clipped_fraction == 1.0


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


def test_strips_give_the_same_image_as_one_pass_and_runs_repeat_exactly():
    gray = _gradient_noise_gray(300, 200, seed=3)
    chroma = _saturated_chroma(30, 20, seed=4)  # a 10x upscale: the coefficient grid has cells of 3 px
    whole = merge_full_resolution(gray, chroma, 16, MergeConfig(strip_pixels=1 << 30))
    for strip_pixels in (37 * 200, 200, 1):  # strips of whole cells, never a halo: the same bits
        strips = merge_full_resolution(gray, chroma, 16, MergeConfig(strip_pixels=strip_pixels))
        np.testing.assert_array_equal(strips.rgb, whole.rgb)
        assert strips.gamut_clipped_fraction == whole.gamut_clipped_fraction
        assert strips.max_delta_l == whole.max_delta_l
        assert strips.ssim_l == pytest.approx(whole.ssim_l, abs=1e-6)
    again = merge_full_resolution(gray, chroma, 16, MergeConfig(strip_pixels=1 << 30))
    np.testing.assert_array_equal(again.rgb, whole.rgb)


def _scene(height: int, width: int, low_h: int, low_w: int, bit_depth: int, seed: int = 5):
    """A scan with real edges: discs of other gray levels on a ramp, plus noise; the model's chroma one
    saturated colour per disc at model resolution (many outside the sRGB gamut), so chroma edges sit on
    luminance edges that the coarse chroma grid cannot place."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    gray = 0.15 + 0.7 * cols / (width - 1) + 0.03 * np.sin(rows / 13.0)
    regions = np.zeros((height, width), dtype=int)
    for index in range(1, 13):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.05, 0.2) * min(height, width)
        inside = (rows - cy) ** 2 + (cols - cx) ** 2 < radius**2
        regions[inside] = index
        gray[inside] = rng.uniform(0.03, 0.97)
    gray = np.clip(gray + rng.normal(0.0, 0.02, gray.shape), 0.0, 1.0)
    levels = 2**bit_depth - 1
    gray = np.round(gray * levels) / levels
    colours = rng.uniform(-90.0, 90.0, (13, 2))
    colours[0] = (10.0, 25.0)  # the background: a warm, moderate colour
    ys = ((np.arange(low_h) + 0.5) * height / low_h).astype(int)
    xs = ((np.arange(low_w) + 0.5) * width / low_w).astype(int)
    chroma = colours[regions[ys][:, xs]].transpose(2, 0, 1).astype(np.float32)
    return gray, torch.from_numpy(np.ascontiguousarray(chroma))


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_fast_merge_matches_the_reference_merge(bit_depth):
    from reference_merge import reference_merge_full_resolution

    # 0.6 Mpx at an 8x upscale (radius 16 px), the 24 Mpx case's regime; some discs clipped.
    gray, chroma = _scene(640, 960, 80, 120, bit_depth)
    reference = reference_merge_full_resolution(gray, chroma, bit_depth)
    merged = merge_full_resolution(gray, chroma, bit_depth)

    scale = 255.0 if bit_depth == 8 else 65535.0
    ab_difference = np.abs(rgb2lab(merged.rgb / scale)[..., 1:] - rgb2lab(reference.rgb / scale)[..., 1:])
    assert ab_difference.mean() <= 0.5
    assert ab_difference.max() <= 2.0
    assert 0.05 < merged.gamut_clipped_fraction < 0.6
    assert merged.gamut_clipped_fraction == pytest.approx(reference.gamut_clipped_fraction, abs=0.005)
    # the lightness invariant, checked independently on every pixel not clipped
    source_l = rgb2lab(np.repeat(gray[..., None], 3, axis=2))[..., 0]
    delta = np.abs(_reference_lightness(merged.rgb) - source_l)
    assert merged.max_delta_l <= 1.0
    assert merged.max_delta_l == pytest.approx(reference.max_delta_l, abs=0.02)
    assert merged.mean_delta_l == pytest.approx(reference.mean_delta_l, abs=0.002)
    assert merged.ssim_l == pytest.approx(reference.ssim_l, abs=1e-4)
    assert delta.max() <= 1.0  # clipped pixels included: only chroma is ever given up


def test_tiny_images_work():
    merged = merge_full_resolution(np.full((3, 2), 0.4), torch.zeros(2, 1, 1), 8)
    assert merged.rgb.shape == (3, 2, 3)
    assert (merged.rgb == 102).all()  # neutral chroma: the gray level itself, 0.4 * 255
    assert merged.max_delta_l < 0.01


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_merge_of_integer_codes_equals_the_merge_of_their_levels(bit_depth):
    levels = 255 if bit_depth == 8 else 65535
    rng = np.random.default_rng(bit_depth)
    codes = rng.integers(0, levels + 1, (48, 72)).astype(np.uint8 if bit_depth == 8 else np.uint16)
    chroma = torch.from_numpy(rng.uniform(-60, 60, (2, 8, 12)).astype(np.float32))
    from_codes = merge_full_resolution(codes, chroma, bit_depth)
    from_levels = merge_full_resolution(codes / float(levels), chroma, bit_depth)
    np.testing.assert_array_equal(from_codes.rgb, from_levels.rgb)
    assert from_codes.max_delta_l == from_levels.max_delta_l


@pytest.mark.parametrize(
    ("gray", "chroma", "bit_depth", "match"),
    [
        (np.zeros((4, 4)), torch.zeros(2, 2, 2), 12, "bit_depth must be 8 or 16, got 12"),
        (np.zeros((4, 4, 3)), torch.zeros(2, 2, 2), 8, r"2-D float array .* shape \(4, 4, 3\)"),
        (np.full((4, 4), 1.5), torch.zeros(2, 2, 2), 8, r"\[1.5, 1.5\]"),
        (np.zeros((4, 4), dtype=np.int32), torch.zeros(2, 2, 2), 8, "int32"),
        (np.zeros((4, 4)), torch.zeros(3, 2, 2), 8, r"\(2, h, w\).*\(3, 2, 2\)"),
        (np.zeros((4, 4)), torch.full((2, 2, 2), float("nan")), 8, "NaN"),
    ],
)
def test_merge_rejects_bad_inputs_naming_the_value(gray, chroma, bit_depth, match):
    with pytest.raises(ValueError, match=match):
        merge_full_resolution(gray, chroma, bit_depth)


def test_closed_form_colour_steps_agree_with_the_colour_module():
    from diffcolor.method import merge as merge_module
    from diffcolor.method.color import gamut_map_lab, gray_lightness, lightness

    # gray -> (L*, Y) on every 16-bit level, against kornia's conversion in float64
    levels = torch.arange(65536, dtype=torch.float64) / 65535
    fast_l, fast_y = merge_module._neutral_lightness(levels.float().clone())
    assert float((fast_l.double() - gray_lightness(levels)).abs().max()) < 2e-4
    expected_y = torch.where(levels > 0.04045, ((levels + 0.055) / 1.055) ** 2.4, levels / 12.92)
    assert float((fast_y.double() - expected_y).abs().max()) < 1e-6

    # Lab -> gamut-mapped sRGB codes, against color.gamut_map_lab (bisection in sRGB, kornia's curves)
    generator = torch.Generator().manual_seed(0)
    lab = torch.rand(3, 120, 150, generator=generator)
    lab[0] *= 100.0
    lab[1:] = (lab[1:] - 0.5) * 300.0
    fy = (lab[0] + 16.0) / 116.0
    luminance = torch.where(fy > 0.2068966, fy**3, (fy - 4.0 / 29.0) / 7.787)
    linear, reduced, _ = merge_module._lab_to_linear_rgb_in_gamut(lab[0], lab[1], lab[2], luminance, 16)
    codes = merge_module._encode_and_quantise(linear, 65535)
    expected, expected_reduced = gamut_map_lab(lab)
    assert 0.3 < float(reduced.float().mean()) < 0.99
    assert float((reduced != expected_reduced[0]).float().mean()) < 1e-3
    assert float((codes / 65535 - expected).abs().max()) < 2e-3
    assert float((codes / 65535 - expected).abs().mean()) < 2e-5

    # sRGB codes -> L*, against kornia
    rgb_codes = torch.randint(0, 65536, (3, 50, 60), generator=generator).float()
    fast = merge_module._lightness_of_codes(rgb_codes, 65535)
    assert float((fast - lightness(rgb_codes / 65535)[0]).abs().max()) < 2e-3


def test_merge_runs_on_an_explicit_device_and_refuses_a_bad_config():
    gray = _gradient_noise_gray(40, 60, seed=6)
    chroma = _saturated_chroma(10, 15, seed=7)
    on_cpu = merge_full_resolution(gray, chroma, 8, device="cpu")
    np.testing.assert_array_equal(on_cpu.rgb, merge_full_resolution(gray, chroma, 8).rgb)
    with pytest.raises(ValueError, match="cells_per_radius=0"):
        merge_full_resolution(gray, chroma, 8, MergeConfig(cells_per_radius=0))
    with pytest.raises(ValueError, match="gamut_iterations=0"):
        merge_full_resolution(gray, chroma, 8, MergeConfig(gamut_iterations=0))


def test_bench_merge_measures_the_ratio_and_writes_json(tmp_path, capsys):
    import json

    from diffcolor.tools.bench_merge import main

    target = tmp_path / "bench.json"
    assert main(["--megapixels", "0.05", "--repeats", "2", "--no-memory", "--json", str(target)]) == 0
    figures = json.loads(target.read_text())
    assert figures["size"] == [183, 274] and figures["bit_depth"] == 16
    assert len(figures["merge_seconds"]) == len(figures["rgb2lab_seconds"]) == 2
    assert figures["ratio"] == pytest.approx(figures["merge_best_s"] / figures["rgb2lab_best_s"])
    assert 0.0 < figures["gamut_clipped_fraction"] < 0.5 and figures["max_delta_l"] <= 1.0
    assert "ratio" in capsys.readouterr().out


@pytest.mark.slow
def test_merge_of_24_megapixels_keeps_lightness_in_bounded_memory():
    from diffcolor.tools.bench_merge import DEFAULT_MERGE, run

    figures = run(24.0, 16, 1, DEFAULT_MERGE, "default", memory=True)
    assert figures["size"] == [4000, 6000]
    assert figures["max_delta_l"] <= 1.0
    # the output alone is 137 MiB; the merge's own working set is a few strips and the cell grid
    assert figures["merge_peak_memory_bytes"] < 600 * 2**20
