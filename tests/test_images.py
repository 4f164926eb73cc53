"""Archival image I/O: what comes in is read faithfully or refused loudly, what
goes out round-trips with its metadata."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageCms, ImageOps

from diffcolor.archive.images import (
    SRGB_PROFILE_DATE,
    classify_tone,
    encode_access,
    encode_master,
    read_image,
)
from diffcolor.common.errors import BadImageError
from diffcolor.method.color import lab_to_rgb, lightness
from diffcolor.method.diffusion import resize_for_model

# --- synthetic images --------------------------------------------------------


def _ramp(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """Gray levels in [0.05, 0.95] with a gradient and some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    return np.clip(0.05 + 0.9 * x / (width - 1) + rng.normal(0, 0.03, (height, width)), 0.0, 1.0)


def _toned(lightness_values: np.ndarray, hue_deg: np.ndarray | float, chroma: float) -> np.ndarray:
    """sRGB float image with the given L*, one hue (per pixel) and chroma."""
    hue = np.deg2rad(np.broadcast_to(hue_deg, lightness_values.shape))
    # chroma fades towards black and white, as in a real toned print
    c = chroma * np.sin(np.pi * lightness_values / 100.0)
    lab = np.stack([lightness_values, c * np.cos(hue), c * np.sin(hue)])
    rgb = lab_to_rgb(torch.from_numpy(lab)).clamp(0, 1).permute(1, 2, 0).numpy()
    return rgb


def _sepia(height: int = 64, width: int = 96) -> np.ndarray:
    lightness_values = 10.0 + 85.0 * _ramp(height, width)
    hue = 55.0 + 25.0 * lightness_values / 100.0  # redder shadows, yellower highlights
    return _toned(lightness_values, hue, 22.0)


def _cyanotype(height: int = 64, width: int = 96) -> np.ndarray:
    return _toned(10.0 + 85.0 * _ramp(height, width, seed=1), 255.0, 35.0)


def _multicolour(height: int = 64, width: int = 96) -> np.ndarray:
    image = np.repeat(_ramp(height, width)[..., None], 3, axis=2)
    colours = [(0.8, 0.1, 0.1), (0.1, 0.6, 0.1), (0.1, 0.2, 0.8), (0.9, 0.8, 0.1)]
    for i, colour in enumerate(colours):
        image[:, i * width // 4 : i * width // 4 + width // 8] = colour
    return image


def _png(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _encode(image: Image.Image, format_name: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **options)
    return buffer.getvalue()


def _tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def _swapped_primaries_icc() -> bytes:
    """The sRGB profile with its red and green colorants swapped: a real,
    non-sRGB RGB profile, in which (1, 0, 0) is sRGB's green."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    entries = {}
    for i in range(struct.unpack(">I", icc[128:132])[0]):
        signature, offset, size = struct.unpack(">4sII", icc[132 + 12 * i : 144 + 12 * i])
        entries[signature] = (i, offset, size)
    (i_red, off_red, size_red), (i_green, off_green, size_green) = entries[b"rXYZ"], entries[b"gXYZ"]
    struct.pack_into(">4sII", icc, 132 + 12 * i_red, b"rXYZ", off_green, size_green)
    struct.pack_into(">4sII", icc, 132 + 12 * i_green, b"gXYZ", off_red, size_red)
    return bytes(icc)


# --- reading -----------------------------------------------------------------


def test_8bit_gray_png_is_read_exactly():
    codes = (_ramp() * 255).round().astype(np.uint8)
    source = read_image(_png(codes), "gray.png")
    assert (source.bit_depth, source.format, source.mode, source.tone) == (8, "PNG", "L", "gray")
    assert (source.width, source.height) == (32, 24) and source.rgb is None
    assert source.gray.dtype == np.float64
    np.testing.assert_array_equal(source.gray, codes / 255.0)


@pytest.mark.parametrize("container", ["PNG", "TIFF"])
def test_16bit_gray_stays_16bit(container):
    codes = (_ramp() * 65535).round().astype(np.uint16)
    data = _png(codes) if container == "PNG" else _tiff(codes)
    source = read_image(data, f"gray16.{container.lower()}")
    assert source.bit_depth == 16 and source.format == container and source.tone == "gray"
    np.testing.assert_array_equal(source.gray, codes / 65535.0)


def test_16bit_rgb_tiff_is_read_at_16_bits_and_neutral_pixels_keep_their_value():
    codes = (_ramp() * 65535).round().astype(np.uint16)
    for planar in ("contig", "separate"):
        rgb = np.repeat(codes[..., None], 3, axis=2)
        data = _tiff(rgb if planar == "contig" else np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig=planar)
        source = read_image(data, "rgb16.tif")
        assert source.bit_depth == 16 and source.tone == "gray" and source.rgb.shape == (24, 32, 3)
        assert np.abs(source.gray - codes / 65535.0).max() < 1e-12


def test_8bit_neutral_rgb_keeps_exact_gray_levels():
    codes = (_ramp() * 255).round().astype(np.uint8)
    source = read_image(_png(np.repeat(codes[..., None], 3, axis=2)), "neutral.png")
    assert source.bit_depth == 8 and source.tone == "gray"
    assert np.abs(source.gray * 255.0 - codes).max() < 1e-9


def test_toned_source_gray_keeps_the_lightness_of_each_pixel():
    sepia = (_sepia() * 255).round().astype(np.uint8)
    source = read_image(_png(sepia), "sepia.png")
    assert source.tone == "toned"
    source_l = lightness(torch.from_numpy(sepia / 255.0).permute(2, 0, 1))[0].numpy()
    gray_l = lightness(torch.from_numpy(np.repeat(source.gray[None], 3, axis=0)))[0].numpy()
    # The gray plane is kept as 16-bit codes: half a code moves L* by 0.0011 at most (where the sRGB
    # curve is steepest), 250 times less than the 8-bit master's own quantisation.
    assert source.codes.dtype == np.uint16
    assert np.abs(gray_l - source_l).max() < 0.0012


def test_exif_orientation_is_applied():
    codes = np.zeros((20, 40), dtype=np.uint8)
    codes[:4, :4] = 255  # marker at the top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    source = read_image(_png(codes, exif=exif.tobytes()), "rotated.png")
    assert (source.height, source.width) == (40, 20)
    assert source.gray[:4, -4:].min() == 1.0 and source.gray[:4, :4].max() == 0.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16bit_rgb_tiff_orientation_matches_pillow(orientation):
    rng = np.random.default_rng(orientation)
    codes16 = rng.integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    codes8 = (codes16 >> 8).astype(np.uint8)
    tag = [(274, "H", 1, orientation, True)]
    sixteen = read_image(_tiff(codes16, photometric="rgb", extratags=tag), "o16.tif")
    eight = read_image(_tiff(codes8, photometric="rgb", extratags=tag), "o8.tif")
    pillow_image = Image.open(io.BytesIO(_tiff(codes8, photometric="rgb", extratags=tag)))
    expected = np.asarray(ImageOps.exif_transpose(pillow_image))
    assert sixteen.bit_depth == 16 and eight.bit_depth == 8
    assert sixteen.gray.shape == eight.gray.shape == expected.shape[:2]
    assert np.abs(sixteen.gray - eight.gray).max() < 2.5 / 255


def test_palette_and_alpha_are_composited_over_white():
    palette_image = Image.fromarray(np.array([[0, 1], [2, 3]], dtype=np.uint8), mode="P")
    palette_image.putpalette([0, 0, 0, 85, 85, 85, 170, 170, 170, 255, 255, 255])
    source = read_image(_encode(palette_image, "PNG", transparency=0), "palette.png")
    assert source.mode == "P" and source.tone == "gray"
    # index 0 is transparent black -> white; the others keep their gray level
    np.testing.assert_allclose(source.gray, [[1.0, 85 / 255], [170 / 255, 1.0]], atol=1e-9)

    gray_alpha = np.zeros((2, 2, 2), dtype=np.uint8)
    gray_alpha[..., 1] = [[0, 255], [255, 255]]  # black, transparent at the top-left
    source = read_image(_encode(Image.fromarray(gray_alpha, mode="LA"), "PNG"), "la.png")
    np.testing.assert_allclose(source.gray, [[1.0, 0.0], [0.0, 0.0]], atol=1e-9)

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent black everywhere
    source = read_image(_png(rgba), "rgba.png")
    assert source.tone == "gray"
    np.testing.assert_allclose(source.gray, 1.0, atol=1e-9)


def test_cmyk_is_converted():
    cmyk = np.zeros((4, 4, 4), dtype=np.uint8)
    cmyk[:2, ..., 3] = 255  # top half pure black ink, bottom half no ink
    source = read_image(_encode(Image.fromarray(cmyk, mode="CMYK"), "TIFF"), "cmyk.tif")
    assert source.mode == "CMYK" and source.tone == "gray"
    np.testing.assert_allclose(source.gray[:2], 0.0, atol=1e-9)
    np.testing.assert_allclose(source.gray[2:], 1.0, atol=1e-9)


def test_embedded_icc_profile_is_converted_to_srgb_at_8_and_16_bits():
    icc = _swapped_primaries_icc()
    red8 = np.zeros((4, 4, 3), dtype=np.uint8)
    red8[..., 0] = 255
    source = read_image(_png(red8, icc_profile=icc), "icc.png")
    np.testing.assert_allclose(source.rgb[0, 0], [0.0, 1.0, 0.0], atol=2 / 255)

    red16 = red8.astype(np.uint16) * 257
    data = _tiff(red16, photometric="rgb", extratags=[(34675, 7, len(icc), icc, True)])
    source = read_image(data, "icc16.tif")
    assert source.bit_depth == 16
    np.testing.assert_allclose(source.rgb[0, 0], [0.0, 1.0, 0.0], atol=2 / 255)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: _png(np.zeros((64, 64), np.uint8))[:-30], "truncated or corrupt"),
        (lambda: _encode(Image.fromarray(np.uint8(_ramp(64, 64) * 255)), "JPEG")[:400], "truncated or corrupt"),
        (lambda: b"this is not an image at all", "not a readable image"),
        (lambda: _encode(Image.new("L", (4, 4)), "GIF"), "format 'GIF' is not allowed"),
        (lambda: _encode(Image.new("RGB", (4, 4)), "BMP"), "format 'BMP' is not allowed"),
    ],
)
def test_bad_inputs_raise_one_line_bad_image_errors_naming_the_item(make, match):
    with pytest.raises(BadImageError, match=match) as caught:
        read_image(make(), "s3://archive/item-42.tif")
    message = str(caught.value)
    assert message.startswith("s3://archive/item-42.tif: ") and "\n" not in message
    assert caught.value.error_class == "bad_image"


def test_decompression_bomb_guard_stays_on():
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImageError, match="exceeds the limit of 100"):
        read_image(_png(np.zeros((20, 20), np.uint8)), "bomb.png", max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert read_image(_png(np.zeros((10, 10), np.uint8)), "fine.png", max_pixels=100).width == 10


# --- tone --------------------------------------------------------------------


def test_classify_tone_on_synthetic_prints():
    gray = np.repeat(_ramp(64, 96)[..., None], 3, axis=2)
    assert classify_tone(gray) == "gray"
    assert classify_tone(_sepia()) == "toned"
    assert classify_tone(_cyanotype()) == "toned"
    assert classify_tone(_multicolour()) == "color"
    assert classify_tone((_multicolour() * 65535).astype(np.uint16)) == "color"


def test_jpeg_noise_of_a_gray_scan_still_counts_as_gray():
    rng = np.random.default_rng(7)
    levels = (np.clip(_ramp(128, 128) + rng.normal(0, 0.05, (128, 128)), 0, 1) * 255).astype(np.uint8)
    rgb = Image.fromarray(np.repeat(levels[..., None], 3, axis=2))
    source = read_image(_encode(rgb, "JPEG", quality=60), "scan.jpg")
    assert source.format == "JPEG" and source.mode == "RGB"
    assert source.tone == "gray"
    # a faint scanner cast (1-2 units of chroma) is still gray
    cast = np.clip(np.repeat(_ramp(64, 96)[..., None], 3, axis=2) + [0.004, 0.0, -0.004], 0, 1)
    assert classify_tone(cast) == "gray"


# --- writing -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_master_round_trips_pixels_dtype_and_xmp(dtype):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, np.iinfo(dtype).max + 1, (30, 40, 3)).astype(dtype)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    data = encode_master(rgb, xmp=xmp)
    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        page = tiff.pages.first
        np.testing.assert_array_equal(page.asarray(), rgb)
        assert page.dtype == dtype
        assert page.photometric == tifffile.PHOTOMETRIC.RGB
        assert page.compression == tifffile.COMPRESSION.LZW  # baseline-safe by default
        assert page.tags[700].value == xmp
        assert 34675 in page.tags  # sRGB ICC profile
    assert read_image(data, "master.tif").bit_depth == (8 if dtype == np.uint8 else 16)


def test_access_copy_jpeg_scales_16bit_embeds_icc_and_xmp():
    rgb16 = np.full((300, 400, 3), 257 * 200, dtype=np.uint16)
    xmp = b"<x:xmpmeta>prompt</x:xmpmeta>"
    data = encode_access(rgb16, "JPEG", quality=90, max_side=100, xmp=xmp)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (100, 75)
    assert image.info["xmp"] == xmp
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))).strip()
    assert np.abs(np.asarray(image).astype(int) - 200).max() <= 1


@pytest.mark.parametrize("format_name", ["PNG", "WEBP"])
def test_access_copy_png_and_webp_carry_xmp(format_name):
    rgb = (np.random.default_rng(4).random((20, 30, 3)) * 255).astype(np.uint8)
    data = encode_access(rgb, format_name, xmp=b"<x:xmpmeta>x</x:xmpmeta>")
    image = Image.open(io.BytesIO(data))
    assert image.format == format_name and image.size == (30, 20)
    assert image.info["xmp"] == b"<x:xmpmeta>x</x:xmpmeta>"
    assert "icc_profile" in image.info
    if format_name == "PNG":
        np.testing.assert_array_equal(np.asarray(image), rgb)


def test_access_copy_16_to_8_bit_rounds():
    codes = np.array([0, 128, 129, 257 * 100 + 128, 257 * 100 + 129, 65535], dtype=np.uint16)
    rgb = np.repeat(codes[None, :, None], 3, axis=2)
    decoded = np.asarray(Image.open(io.BytesIO(encode_access(rgb, "PNG"))))[0, :, 0]
    np.testing.assert_array_equal(decoded, np.round(codes / 257.0).astype(np.uint8))


def test_access_copy_rejects_bad_arguments():
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="'GIF'"):
        encode_access(rgb, "GIF")
    with pytest.raises(ValueError, match="quality.*0"):
        encode_access(rgb, quality=0)
    with pytest.raises(ValueError, match="70000 bytes"):
        encode_access(rgb, "JPEG", xmp=b"x" * 70000)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_master(rgb.astype(np.float32))


# --- model input -------------------------------------------------------------


def test_resize_for_model_keeps_aspect_and_multiples():
    small = resize_for_model(_ramp(900, 1200), 512 * 512, 8)
    assert small.shape == (440, 592) and small.dtype == np.float32
    for height, width in [(1000, 333), (333, 1000), (64, 64), (3000, 2000)]:
        h, w = resize_for_model(np.zeros((height, width)), 512 * 512, 8).shape
        assert h % 8 == 0 and w % 8 == 0
        assert abs(h * w - 512 * 512) / (512 * 512) < 0.05
        assert abs((w / h) / (width / height) - 1) < 0.05


def test_resize_for_model_is_antialiased_and_stays_in_range():
    checker = (np.indices((1024, 1024)).sum(axis=0) % 2).astype(np.float64)
    small = resize_for_model(checker, 128 * 128, 8)
    assert small.shape == (128, 128)
    assert np.abs(small - 0.5).max() < 0.05  # averaged, not aliased to 0/1
    assert small.min() >= 0.0 and small.max() <= 1.0
    with pytest.raises(ValueError, match="multiple"):
        resize_for_model(checker, 100, 0)
    with pytest.raises(ValueError, match="2-D"):
        resize_for_model(np.zeros((4, 4, 3)), 100, 8)


def test_derivatives_embed_a_profile_with_a_fixed_date_so_reruns_are_byte_identical():
    """LittleCMS stamps the build time into a profile; a rerun an hour later must still write the same bytes."""
    rgb = np.random.default_rng(5).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    master = encode_master(rgb)
    with tifffile.TiffFile(io.BytesIO(master)) as tiff:
        master_icc = tiff.pages.first.tags[34675].value
    access_icc = Image.open(io.BytesIO(encode_access(rgb, "JPEG"))).info["icc_profile"]
    for icc in (master_icc, access_icc):
        assert struct.unpack(">6H", icc[24:36]) == SRGB_PROFILE_DATE
        # (The header bytes are the check: Pillow 12's creation_date reads LittleCMS's 0-based month as the
        # month and fails on a January date, so it cannot be the witness.)
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        assert ImageCms.getProfileDescription(profile).strip() == "sRGB built-in"
    assert encode_master(rgb) == master
