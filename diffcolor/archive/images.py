"""Archival image I/O on bytes: read sources, classify their tone, write derivatives.

docs/DESIGN.md §4.3 "Images in" and §4.4 "Images out". No filesystem access: callers hand
over the bytes they read through storage and get bytes (or a file they opened) back to write.

Reading keeps Pillow's decompression-bomb guard on, decodes only an allowlist of
formats, rejects truncated files, applies EXIF orientation, converts embedded ICC
profiles of RGB/CMYK images to sRGB, keeps 16-bit at 16 bit (16-bit RGB TIFFs are
decoded with tifffile because Pillow would drop them to 8 bits) and composites
alpha over white (how the image looks on a page). The gray image handed to the
method keeps the perceived lightness of the source: for images with colour
channels it is the neutral gray level having the pixel's CIE L*, so a neutral
pixel keeps its exact value and a sepia or cyanotype print keeps its tonal scale.
Colour maths here is numpy (scikit-image's sRGB to XYZ and Lab conversions):
the archive decodes and classifies files without loading torch.

Writing gives the archival master (lossless TIFF, 8 or 16 bit) and the access
copy (8-bit JPEG/PNG/WebP), both with an sRGB ICC profile and optional XMP.
A scan's master is written strip by strip into a file the caller opened (its
staging file, :func:`diffcolor.archive.storage.staged`), never held encoded in
memory; the access copy is built from a reduced 8-bit image.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

import numpy as np
import skimage.color
import tifffile
from PIL import (
    Image,
    ImageCms,
    ImageFile,
    ImageOps,
    PngImagePlugin,
    UnidentifiedImageError,
)

from diffcolor import __version__
from diffcolor.common.errors import BadImageError
from diffcolor.common.pixels import describe, unit_rgb

# Pillow format names we decode (docs/DESIGN.md §4.3). MPO is how Pillow names camera
# JPEGs that carry extra preview frames: a JPEG all the same.
ALLOWED_FORMATS = frozenset({"TIFF", "PNG", "JPEG", "MPO", "JPEG2000", "WEBP"})
ACCESS_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})

# Largest XMP packet a JPEG APP1 segment can hold (65535 minus length field and
# the 29-byte namespace header); longer packets would need Extended XMP.
_JPEG_MAX_XMP_BYTES = 65535 - 2 - 29

# ICC conversion: relative colorimetric keeps in-gamut colours exact, which is
# what an archival reading of the pixels wants (ours; perceptual would remap).
_ICC_INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
# Lattice for converting 16-bit RGB through LittleCMS, which Pillow drives at
# 8 bits only: nodes every 5 code values (0, 5, ..., 255), trilinear in between.
_ICC_LATTICE_STEP = 5
# The creation date written into the embedded sRGB profile (year, month, day,
# hour, minute, second): fixed, so derivatives are reproducible to the byte.
SRGB_PROFILE_DATE = (2024, 1, 1, 0, 0, 0)
# Pixels per batch in the float64 colour conversions (bounds working memory).
_CHUNK_PIXELS = 1 << 16
# The access copy's downscale reduces by whole factors first while at least this many times the final size
# is left, then resamples with Lanczos (Pillow's ``reducing_gap``; 2.0 is what its ``thumbnail`` uses).
_REDUCING_GAP = 2.0
# Largest source accepted, in pixels (ours): above the largest scans archives make (large-format negatives
# at 600 dpi, about 120 Mpx), below Pillow's own hard limit (twice ``Image.MAX_IMAGE_PIXELS``, 179 Mpx).
# Pillow's default (89 Mpx) would refuse a 100 Mpx scan; decoding keeps 2 bytes a pixel of it (300 MB here).
MAX_SOURCE_PIXELS = 150_000_000
# Compressed bytes tifffile copies out of the file at a time while decoding strips (its default, 256 MB, would
# copy most of a large scan's file beside it).
_TIFF_READ_BYTES = 8 << 20


@dataclass(frozen=True)
class ToneConfig:
    """Thresholds of :func:`classify_tone` (all ours; CIE Lab units)."""

    # C*ab below which a pixel counts as neutral. About two just-noticeable
    # differences (JND ~2.3); JPEG chroma noise of gray scans stays below it.
    neutral_chroma: float = 4.0
    # An image is gray when at most this fraction of its pixels is chromatic.
    gray_max_chromatic_fraction: float = 0.02
    # Toned when the chroma-weighted circular standard deviation of the hue of the
    # chromatic pixels is at most this (sepia drifts ~10-20 deg from shadows to
    # highlights; a colour photograph spreads over 60 deg and more).
    toned_max_hue_spread_deg: float = 30.0
    # A chromatic pixel further than this from the dominant hue is "off hue".
    toned_off_hue_deg: float = 60.0
    # Toned only when off-hue pixels carry at most this fraction of the chroma.
    toned_max_off_hue_fraction: float = 0.05
    # Pixels looked at (a regular subsample of larger images); plenty for statistics.
    max_samples: int = 1 << 18


MASTER_COMPRESSIONS = {"lzw": "lzw", "none": None, "deflate": "zlib"}  # name -> tifffile's; lzw: TIFF 6 baseline-safe


@dataclass(frozen=True)
class Resolution:
    """A scan's resolution as its file states it: pixels per ``unit`` ("inch" or "cm") along x and y."""

    x: float
    y: float
    unit: str = "inch"

    def per_inch(self) -> tuple[float, float]:
        factor = 2.54 if self.unit == "cm" else 1.0
        return self.x * factor, self.y * factor

    def scaled(self, factor: float) -> "Resolution":
        """The resolution of the same print at ``factor`` times the pixel size (a downscaled copy)."""
        return Resolution(self.x * factor, self.y * factor, self.unit)


@dataclass
class SourceImage:
    """A decoded source image, ready for the method.

    The gray plane is kept as integer codes (2 bytes a pixel at most, the size of
    a 16-bit scan's own plane): a float copy of a 100-megapixel scan would take
    800 MB. :attr:`gray` gives the float levels for callers that want them.
    """

    codes: np.ndarray  # (H, W) uint8 or uint16: sRGB-encoded gray levels times the dtype's largest value
    bit_depth: int  # 8 or 16: the bit depth of the source and of the master
    width: int  # pixels, after EXIF orientation
    height: int  # pixels, after EXIF orientation
    format: str  # Pillow format name, e.g. "TIFF"
    tone: str  # "gray", "toned" (sepia, cyanotype...) or "color"
    mode: str  # the Pillow mode the file decoded to, e.g. "I;16", "RGB", "P"
    rgb: np.ndarray | None  # (H, W, 3) float32 sRGB in [0, 1] when the source had colour channels
    resolution: Resolution | None = None  # as the file states it (None: no physical unit given)

    @property
    def gray(self) -> np.ndarray:
        """(H, W) float64 in [0, 1], sRGB-encoded gray levels (a new full-size array on every call)."""
        return self.codes / float(np.iinfo(self.codes.dtype).max)

    def reduced(self, factor: int) -> np.ndarray:
        """(ceil(H / factor), ceil(W / factor)) float32 in [0, 1]: the mean of each factor x factor block (the
        last row and column of blocks may be narrower), computed a strip at a time: the model-resolution copy's
        first step, without a full-size float copy (Pillow's ``reducing_gap`` does the same before resampling)."""
        factor = max(1, int(factor))
        scale = 1.0 / float(np.iinfo(self.codes.dtype).max)
        if factor == 1:  # exactly the float levels, as float32
            return (self.codes * scale).astype(np.float32)
        height, width = self.codes.shape
        starts = np.arange(0, width, factor)
        widths = np.minimum(starts + factor, width) - starts
        out = np.empty((-(-height // factor), len(starts)), dtype=np.float32)
        for index, top in enumerate(range(0, height, factor)):
            block = self.codes[top : top + factor].sum(axis=0, dtype=np.float64)
            out[index] = np.add.reduceat(block, starts) / (widths * _block_rows(top, factor, height)) * scale
        return out


def _block_rows(top: int, factor: int, height: int) -> int:
    """Rows in the block of ``factor`` rows starting at ``top`` (the last may be short)."""
    return min(factor, height - top)


def read_image(
    data: bytes,
    name: str,
    *,
    max_pixels: int | None = None,
    tone_config: ToneConfig = ToneConfig(),
    keep_rgb: bool = True,
) -> SourceImage:
    """Decode an archival source image from bytes.

    Multi-frame files (TIFF pages, animations) give their first frame. Alpha is
    composited over white. ICC profiles of RGB/CMYK images are converted to sRGB
    (relative colorimetric); a gray image's profile is not applied.

    Args:
        data: the file's bytes.
        name: how to name the image in errors (its URI or item id).
        max_pixels: largest width * height accepted; default
            :data:`MAX_SOURCE_PIXELS`. Pillow's own guard (an error above twice
            ``Image.MAX_IMAGE_PIXELS``) stays on, so this can lower the limit;
            raising it past that needs the operator to set
            ``Image.MAX_IMAGE_PIXELS`` at start-up. (Pillow's warning between
            once and twice that global is not given: this limit is the one.)
        tone_config: thresholds for the gray / toned / colour class.
        keep_rgb: keep the colour-managed RGB of a source with colour channels
            (``rgb``, 12 bytes a pixel); False leaves it None, which is all the
            colourisation needs (its gray plane and tone class).

    Returns:
        :class:`SourceImage`.

    Raises:
        BadImageError: for data that is not an image, a format outside
            TIFF/PNG/JPEG/JPEG 2000/WebP, too many pixels (decompression bomb),
            truncated or corrupt data, an unsupported mode or pixel range, or an
            unreadable ICC profile. The message is one line and names ``name``.
        RuntimeError: if ``ImageFile.LOAD_TRUNCATED_IMAGES`` was switched on in this
            process, which would let truncated files through.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; "
            "DiffColor refuses to decode images that way (truncated files would pass)"
        )
    limit = MAX_SOURCE_PIXELS if max_pixels is None else max_pixels

    # 1. Read the header only: format and size, before any pixel is decoded.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _bad(name, f"decompression bomb refused by Pillow ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _bad(name, f"not a readable image ({type(exc).__name__}: {exc})") from exc

    # 2. Allowlist of formats and the pixel budget.
    if image.format not in ALLOWED_FORMATS:
        raise _bad(name, f"format {image.format!r} is not allowed (allowed: TIFF, PNG, JPEG, JPEG2000, WEBP)")
    width, height = image.size
    if limit is not None and width * height > limit:
        raise _bad(
            name,
            f"{width}x{height} = {width * height} pixels exceeds the limit of {limit} (decompression bomb guard)",
        )

    # 3. Decode everything now, so truncation and corruption surface here. 16-bit TIFFs (gray and RGB,
    #    the scanners' masters) are decoded by tifffile a strip at a time straight into the gray plane
    #    (Pillow would drop 16-bit RGB to 8 bits, and hold copies of a gray plane); the rest by Pillow.
    format_name, mode = image.format, image.mode
    try:
        # Read before decoding: Pillow's TIFF decoder may apply and drop the tag.
        orientation = int(image.getexif().get(0x0112, 1) or 1)
        resolution = _resolution(image)
        icc = image.info.get("icc_profile")
        if _is_16bit_tiff(image):
            image.close()
            image = None
            source = _read_16bit_tiff(data, name, orientation, icc, format_name, mode, tone_config, keep_rgb)
        else:
            image.load()
            if orientation != 1:  # exif_transpose copies even when there is nothing to turn
                image = ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except BadImageError:
        raise
    except Exception as exc:  # Pillow's decoders raise many types; all mean a bad file
        raise _bad(name, f"truncated or corrupt {format_name} data ({type(exc).__name__}: {exc})") from exc

    # 4. The gray plane (and RGB when kept), colour-managed, alpha composited; the stated resolution,
    #    turned with the pixels (EXIF orientations 5 to 8 swap the axes).
    if resolution is not None and orientation in (5, 6, 7, 8):
        resolution = Resolution(resolution.y, resolution.x, resolution.unit)
    if image is not None:
        source = _from_pillow(image, format_name, mode, name, tone_config, keep_rgb)
    source.resolution = resolution
    return source


def _resolution(image: Image.Image) -> Resolution | None:
    """The resolution and unit the file states (TIFF tags, JPEG's JFIF density, PNG's pHYs); None without a unit."""
    try:
        if image.format == "TIFF":
            tags = image.tag_v2
            unit = {2: "inch", 3: "cm"}.get(int(tags.get(296, 2)))
            x, y = tags.get(282), tags.get(283)
            if unit and x and y:
                return Resolution(float(x), float(y), unit)
            return None
        if image.format == "JPEG" and image.info.get("jfif_unit") in (1, 2):
            x, y = image.info["jfif_density"]
            return Resolution(float(x), float(y), "inch" if image.info["jfif_unit"] == 1 else "cm") if x and y else None
        dpi = image.info.get("dpi")  # PNG pHYs in metres, and the others', as dots per inch
        if dpi and dpi[0] and dpi[1]:
            return Resolution(float(dpi[0]), float(dpi[1]), "inch")
    except (TypeError, ValueError, KeyError, ZeroDivisionError):
        pass  # a malformed resolution is no resolution, not a bad image
    return None


def classify_tone(rgb: np.ndarray, config: ToneConfig = ToneConfig()) -> str:
    """Class a photograph as gray, toned monochrome or colour from its chroma.

    Args:
        rgb: (H, W, 3) sRGB image: float in [0, 1], uint8 or uint16.
        config: thresholds.

    Returns:
        ``"gray"`` when (nearly) all pixels are neutral; ``"toned"`` when the
        chromatic pixels share one hue (sepia, selenium, cyanotype); ``"color"``
        when they spread over several hues.

    Raises:
        ValueError: on a wrong shape or dtype.
    """
    # 1. A regular subsample is enough for statistics.
    unit_rgb(rgb[:1, :1] if isinstance(rgb, np.ndarray) else rgb, check_range=False)  # type check only
    step = max(1, math.ceil(math.sqrt(rgb.shape[0] * rgb.shape[1] / config.max_samples)))
    sample = unit_rgb(rgb[::step, ::step], check_range=False)

    # 2. Chroma and hue of every sampled pixel (CIE Lab, D65).
    lab = skimage.color.rgb2lab(sample).reshape(-1, 3)
    a, b = lab[:, 1], lab[:, 2]
    chroma = np.hypot(a, b)
    chromatic = chroma > config.neutral_chroma

    # 3. Gray: almost no chromatic pixels.
    if float(chromatic.mean()) <= config.gray_max_chromatic_fraction:
        return "gray"

    # 4. Toned: the chromatic pixels' hues concentrate around one direction.
    a, b, chroma = a[chromatic], b[chromatic], chroma[chromatic]
    resultant = float(np.hypot(a.sum(), b.sum()) / chroma.sum())  # 1 for a single hue
    spread_deg = math.degrees(math.sqrt(-2.0 * math.log(max(resultant, 1e-12))))
    dominant = math.atan2(float(b.sum()), float(a.sum()))
    off_hue_deg = np.abs(np.rad2deg(np.remainder(np.arctan2(b, a) - dominant + math.pi, 2 * math.pi) - math.pi))
    off_hue_fraction = float(chroma[off_hue_deg > config.toned_off_hue_deg].sum() / chroma.sum())
    if spread_deg <= config.toned_max_hue_spread_deg and off_hue_fraction <= config.toned_max_off_hue_fraction:
        return "toned"
    return "color"


def encode_master(rgb: np.ndarray, xmp: bytes | None = None, *, resolution: Resolution | None = None,
                  compression: str = "lzw") -> bytes:
    """The archival master's bytes: :func:`write_master` into memory (for small images and tests; a scan's
    master is written to a file with :func:`write_master`, which holds no encoded copy).

    Raises:
        ValueError: as :func:`write_master`.
    """
    buffer = io.BytesIO()
    write_master(buffer, rgb, xmp, resolution=resolution, compression=compression)
    return buffer.getvalue()


def write_master(file: BinaryIO | str, rgb: np.ndarray, xmp: bytes | None = None, *,
                 resolution: Resolution | None = None, compression: str = "lzw") -> None:
    """Write the archival master of ``rgb`` ((H, W, 3) uint8 or uint16) to ``file``: :func:`write_master_strips`
    of the whole array.

    Raises:
        ValueError: as :func:`write_master_strips`.
    """
    _check_output_rgb(rgb)
    write_master_strips(file, [rgb], rgb.shape[:2], rgb.dtype, xmp, resolution=resolution, compression=compression)


def write_master_strips(file: BinaryIO | str, strips: Iterable[np.ndarray], size: tuple[int, int], dtype,
                        xmp: bytes | None = None, *, resolution: Resolution | None = None,
                        compression: str = "lzw") -> None:
    """Write the archival master, a lossless RGB TIFF at the image's bit depth, to ``file`` from its rows.

    LZW compression with horizontal differencing by default (lossless, part of
    TIFF 6 and accepted by every archival validator; ``"none"`` writes it
    uncompressed, ``"deflate"`` smaller but outside the baseline), photometric
    RGB, the source's resolution and unit (600 dpi stays 600 dpi), an embedded
    sRGB ICC profile (tag 34675: the pixels are sRGB-encoded, whatever the
    source's profile was) and, when given, the XMP packet in tag 700.

    The image is organised in strips of about 256 KB (tifffile's default for
    compressed data), each encoded and written as soon as its rows have come,
    so the memory the write needs is a few strips whatever the image size. The
    bytes depend on the pixels and the arguments only, not on how ``strips``
    cut the rows.

    Args:
        file: a seekable binary file opened for writing, or a local path.
        strips: (rows, W, 3) arrays of ``dtype``, the image's rows top to bottom, any number of rows each.
        size: (H, W) of the image.
        dtype: uint8 (8-bit master) or uint16 (16-bit master).
        xmp: an XMP packet (UTF-8 bytes) or None.
        resolution: the source's stated resolution; None writes none.
        compression: one of :data:`MASTER_COMPRESSIONS`.

    Raises:
        ValueError: on a wrong dtype or size, strips that do not fit it or do not make ``size`` rows,
            ``xmp`` that is not bytes, or an unknown compression.
    """
    # 1. Check inputs.
    dtype = np.dtype(dtype)
    if dtype not in (np.uint8, np.uint16):
        raise ValueError(f"rgb must be uint8 or uint16, got dtype {dtype}")
    height, width = (int(side) for side in size)
    if height < 1 or width < 1:
        raise ValueError(f"a master needs at least one pixel, got size {size!r}")
    if xmp is not None and not isinstance(xmp, (bytes, bytearray)):
        raise ValueError(f"xmp must be bytes, got {type(xmp).__name__}")
    if compression not in MASTER_COMPRESSIONS:
        raise ValueError(f"master compression must be one of {sorted(MASTER_COMPRESSIONS)}, got {compression!r}")
    codec = MASTER_COMPRESSIONS[compression]
    place = {} if resolution is None else {"resolution": (resolution.x, resolution.y),
                                           "resolutionunit": "INCH" if resolution.unit == "inch" else "CENTIMETER"}

    # 2. Extra tags: the colour space, and provenance when given.
    extratags = [(34675, 7, len(_srgb_icc()), _srgb_icc(), True)]
    if xmp:
        extratags.append((700, 1, len(xmp), bytes(xmp), True))

    # 3. Each strip encoded as tifffile encodes it (its predictor and codec functions: the same bytes as
    #    tifffile writing the whole array), then written.
    rows_per_strip = max(1, 262144 // (width * 3 * dtype.itemsize))
    compress = None if codec is None else tifffile.TIFF.COMPRESSORS[{"lzw": 5, "zlib": 8}[codec]]
    predict = tifffile.TIFF.PREDICTORS[2]  # horizontal differencing

    def encoded() -> Iterator[bytes]:
        for block in _row_blocks(strips, rows_per_strip, height, width, dtype):
            yield block.tobytes() if compress is None else compress(predict(block, axis=-2))

    blocks = encoded()
    tifffile.imwrite(
        file,
        blocks,
        shape=(height, width, 3),
        dtype=dtype,
        photometric="rgb",
        compression=codec,
        predictor=codec is not None,
        rowsperstrip=rows_per_strip,
        metadata=None,
        **place,
        software=f"DiffColor Archive {__version__}",
        extratags=extratags,
    )
    for _ in blocks:  # tifffile takes the strips it needs and stops: the rest runs the strips' own end and checks
        raise ValueError(f"the strips hold more than the master's {height} rows")


def _row_blocks(strips: Iterable[np.ndarray], rows: int, height: int, width: int, dtype) -> Iterator[np.ndarray]:
    """The rows of ``strips`` regrouped into blocks of ``rows`` rows (the last may be shorter); ValueError
    when a strip does not fit (W, 3) of ``dtype`` or the strips do not make ``height`` rows."""
    carry, seen = None, 0
    for strip in strips:
        if not isinstance(strip, np.ndarray) or strip.ndim != 3 or strip.shape[1:] != (width, 3) or strip.dtype != dtype:
            raise ValueError(f"a strip of the master must be a (rows, {width}, 3) {dtype} array, got {describe(strip)}")
        seen += strip.shape[0]
        if seen > height:
            raise ValueError(f"the strips hold more than the master's {height} rows")
        buffer = strip if carry is None or not len(carry) else np.concatenate([carry, strip])
        whole = len(buffer) // rows * rows
        for top in range(0, whole, rows):
            yield np.ascontiguousarray(buffer[top : top + rows])
        carry = buffer[whole:]
    if seen != height:
        raise ValueError(f"the strips hold {seen} rows, the master {height}")
    if carry is not None and len(carry):
        yield np.ascontiguousarray(carry)


def encode_access(
    rgb: np.ndarray,
    format: str = "JPEG",
    quality: int = 92,
    max_side: int | None = None,
    xmp: bytes | None = None,
    resolution: Resolution | None = None,
) -> bytes:
    """Encode the access copy: an 8-bit JPEG, PNG or WebP with sRGB profile and XMP.

    Args:
        rgb: (H, W, 3) uint8 or uint16 (scaled to 8 bit with rounding).
        format: "JPEG", "PNG" or "WEBP" (case-insensitive; "JPG" accepted).
        quality: JPEG/WebP quality, 1..100 (ignored for PNG).
        max_side: when given and smaller than the longer side, downscale (Lanczos)
            so that the longer side is ``max_side``, keeping the aspect ratio.
        xmp: an XMP packet (UTF-8 bytes) or None. JPEG holds at most 65504 bytes
            of XMP (one APP1 segment).
        resolution: the source's stated resolution; a downscaled copy states
            it scaled alike (the same print size), in dots per inch.

    Returns:
        The file's bytes.

    Raises:
        ValueError: on a wrong shape/dtype, unknown format, quality out of range,
            non-positive ``max_side``, or XMP that is not bytes or too long for JPEG.
    """
    _check_output_rgb(rgb)
    access = AccessCopy(rgb.shape[:2], format, quality, max_side, xmp, resolution)
    rows = max(1, _CHUNK_PIXELS // rgb.shape[1])
    for top in range(0, rgb.shape[0], rows):
        access.add(rgb[top : top + rows])
    return access.encode()


class AccessCopy:
    """:func:`encode_access` from the image's rows fed top to bottom (:meth:`add`), then :meth:`encode`:
    the arguments are checked first, and only the reduced 8-bit image is kept, never the image whole."""

    def __init__(self, size: tuple[int, int], format: str = "JPEG", quality: int = 92, max_side: int | None = None,
                 xmp: bytes | None = None, resolution: Resolution | None = None) -> None:
        # 1. Check inputs.
        pillow_format = "JPEG" if format.upper() == "JPG" else format.upper()
        if pillow_format not in ACCESS_FORMATS:
            raise ValueError(f"access format must be one of {sorted(ACCESS_FORMATS)}, got {format!r}")
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an int in 1..100, got {quality!r}")
        if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
            raise ValueError(f"max_side must be a positive int or None, got {max_side!r}")
        if xmp is not None and not isinstance(xmp, (bytes, bytearray)):
            raise ValueError(f"xmp must be bytes, got {type(xmp).__name__}")
        if xmp and pillow_format == "JPEG" and len(xmp) > _JPEG_MAX_XMP_BYTES:
            raise ValueError(
                f"XMP packet of {len(xmp)} bytes does not fit a JPEG APP1 segment (max {_JPEG_MAX_XMP_BYTES}); "
                "shorten it or use PNG/WEBP for the access copy"
            )
        self.format, self.quality, self.xmp, self.resolution = pillow_format, quality, xmp, resolution

        # 2. The final size keeping the aspect ratio, and the whole factors reduced by first: an exact box
        #    reduction that leaves at least twice the final size, then Lanczos (what Pillow's
        #    ``resize(reducing_gap=2.0)`` does), so a scan is never held whole at 8 bits.
        height, width = size
        self.size, self.box = None, None
        reduce_by = (1, 1)
        if max_side is not None and max(height, width) > max_side:
            factor = max_side / max(height, width)
            self.size = (max(1, round(width * factor)), max(1, round(height * factor)))
            self.resolution = None if resolution is None else resolution.scaled(self.size[0] / width)
            reduce_by = (int(width / self.size[0] / _REDUCING_GAP) or 1, int(height / self.size[1] / _REDUCING_GAP) or 1)
            self.box = (0, 0, width / reduce_by[0], height / reduce_by[1])
        self._reduction = Reduction(size, reduce_by)

    def add(self, strip: np.ndarray) -> None:
        """The next rows of the image: (rows, W, 3) uint8 or uint16."""
        self._reduction.add(strip)

    def encode(self) -> bytes:
        """The access copy's bytes, once every row was added."""
        # 3. Downscale.
        image = self._reduction.image()
        if self.size is not None:
            image = image.resize(self.size, Image.Resampling.LANCZOS, box=self.box)

        # 4. Save with the sRGB profile, the resolution and the XMP packet.
        options: dict = {"icc_profile": _srgb_icc()}
        if self.resolution is not None:
            options["dpi"] = tuple(round(value, 4) for value in self.resolution.per_inch())
        if self.format == "JPEG":
            options.update(quality=self.quality, optimize=True)
        elif self.format == "WEBP":
            options.update(quality=self.quality)
        if self.xmp:
            if self.format == "PNG":
                # Pillow writes no XMP for PNG itself; iTXt "XML:com.adobe.xmp" is the
                # XMP specification's PNG embedding, and what Pillow reads back.
                info = PngImagePlugin.PngInfo()
                info.add_itxt("XML:com.adobe.xmp", bytes(self.xmp).decode("utf-8"), zip=False)
                options["pnginfo"] = info
            else:
                options["xmp"] = bytes(self.xmp)
        buffer = io.BytesIO()
        image.save(buffer, format=self.format, **options)
        return buffer.getvalue()


def reduced_8bit(rgb: np.ndarray, factor: int | tuple[int, int]) -> Image.Image:
    """``rgb`` ((H, W, 3) uint8 or uint16) at 8 bits reduced by whole ``factor`` (x, y) by box means:
    ``Image.fromarray(rgb8).reduce(factor)``, computed strip by strip (:class:`Reduction`).

    Raises:
        ValueError: on a wrong shape or dtype, or a factor below 1.
    """
    _check_output_rgb(rgb)
    reduction = Reduction(rgb.shape[:2], factor)
    rows = max(1, _CHUNK_PIXELS // rgb.shape[1])
    for top in range(0, rgb.shape[0], rows):
        reduction.add(rgb[top : top + rows])
    return reduction.image()


class Reduction:
    """An image at 8 bits (16-bit values scaled with rounding) reduced by whole factors by box means, from its
    rows fed top to bottom: the same pixels as Pillow's ``reduce`` of the whole image, with the memory of
    the result and one strip."""

    def __init__(self, size: tuple[int, int], factor: int | tuple[int, int]) -> None:
        self.factor_x, self.factor_y = (factor, factor) if isinstance(factor, int) else factor
        if self.factor_x < 1 or self.factor_y < 1:
            raise ValueError(f"reduction factor must be at least 1, got {factor!r}")
        self.height, self.width = size
        self._reduced = Image.new("RGB", (-(-self.width // self.factor_x), -(-self.height // self.factor_y)))
        self._carry: np.ndarray | None = None  # rows short of a whole box, kept for the next strip
        self._row = 0  # the next row of the reduced image

    def add(self, strip: np.ndarray) -> None:
        """The next rows: (rows, W, 3) uint8 or uint16."""
        _check_output_rgb(strip)
        if strip.shape[1] != self.width:
            raise ValueError(f"a strip must be {self.width} pixels wide, got {describe(strip)}")
        if strip.dtype == np.uint16:
            strip = ((strip.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        if self._carry is not None:
            strip = np.concatenate([self._carry, strip])
        whole = len(strip) // self.factor_y * self.factor_y  # whole boxes only: the same means
        self._paste(strip[:whole])
        self._carry = strip[whole:].copy() if whole < len(strip) else None

    def image(self) -> Image.Image:
        """The reduced image, once every row was added (a last partial box is the mean of its rows)."""
        if self._carry is not None:
            self._paste(self._carry)
            self._carry = None
        return self._reduced

    def _paste(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        image = Image.fromarray(np.ascontiguousarray(rows))
        if self.factor_x > 1 or self.factor_y > 1:
            image = image.reduce((self.factor_x, self.factor_y))
        self._reduced.paste(image, (0, self._row))
        self._row += image.height


# --- reading helpers -------------------------------------------------------------


def _from_pillow(
    image: Image.Image, format_name: str, original_mode: str, name: str, tone_config: ToneConfig, keep_rgb: bool
) -> SourceImage:
    """SourceImage from a decoded, oriented Pillow image (all but 16-bit TIFF)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return _from_codes(np.asarray(image).astype(np.uint16, copy=False), 16, format_name, original_mode)
    if mode == "I":
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise _bad(name, f"32-bit integer pixels in [{low}, {high}] are outside the 16-bit range")
        return _from_codes(values.astype(np.uint16), 16, format_name, original_mode)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        if not (0.0 <= low and high <= 1.0):
            raise _bad(name, f"floating-point pixels in [{low}, {high}] are outside [0, 1]")
        return _from_codes(_codes16(values), 16, format_name, original_mode)
    if mode in ("1", "L"):
        return _from_codes(np.asarray(image.convert("L")), 8, format_name, original_mode)
    if mode in ("LA", "La"):
        gray_alpha = np.asarray(image.convert("LA")).astype(np.float64) / 255.0
        gray = _over_white(gray_alpha[..., :1], gray_alpha[..., 1:])[..., 0]
        return _from_codes(_codes16(gray), 8, format_name, original_mode)
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "P", "PA", "YCbCr"):
        values = np.asarray(_to_srgb(image, name))
        return _from_rgb(values, 8, format_name, original_mode, tone_config, None, keep_rgb)
    raise _bad(name, f"pixel mode {mode!r} is not supported")


def _to_srgb(image: Image.Image, name: str) -> Image.Image:
    """RGB or RGBA in sRGB: ICC profile applied when present, palette expanded."""
    if image.mode in ("P", "PA"):
        return image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    has_alpha = image.mode in ("RGBA", "RGBa")
    target_mode = "RGBA" if has_alpha else "RGB"
    if image.mode in ("RGBa", "RGBX", "YCbCr"):
        image = image.convert(target_mode)
    icc = image.info.get("icc_profile")
    if icc and image.mode in ("RGB", "RGBA", "CMYK"):
        try:
            source_profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(
                image, source_profile, _srgb_profile(), renderingIntent=_ICC_INTENT, outputMode=target_mode
            )
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            raise _bad(name, f"embedded ICC profile cannot be applied ({exc})") from exc
    # No profile: sRGB is assumed (the web's default); CMYK uses Pillow's naive conversion.
    return image.convert(target_mode) if image.mode != target_mode else image


def _is_16bit_tiff(image: Image.Image) -> bool:
    """A 16-bit unsigned TIFF, gray (black is zero, one sample) or RGB(A): what tifffile decodes for us."""
    if image.format != "TIFF":
        return False
    tags = image.tag_v2
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    samples, photometric = tags.get(277, 1), tags.get(262)
    if not all(b == 16 for b in bits) or tags.get(339, 1) not in (1, (1,) * len(bits)):
        return False
    return (photometric == 1 and samples == 1) or (photometric == 2 and samples >= 3)


def _read_16bit_tiff(data: bytes, name: str, orientation: int, icc: bytes | None, format_name: str, mode: str,
                     tone_config: ToneConfig, keep_rgb: bool) -> SourceImage:
    """First page of a 16-bit gray or RGB(A) TIFF as a SourceImage, oriented.

    Strips are decoded and converted one at a time (a few MB of the file copied
    out at a time), so what stays is the gray plane; tiled and planar files are
    decoded whole first. Every strip or tile must lie inside the file: tifffile
    fills what is missing with zeros, where Pillow refuses a truncated file, and
    so do we.
    """
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages.first
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                if count <= 0 or offset + count > len(data):
                    raise _bad(name, f"truncated or corrupt TIFF data (a strip of {count} bytes at {offset} lies "
                                     f"outside the file's {len(data)} bytes)")
            height, width, samples = page.imagelength, page.imagewidth, page.samplesperpixel
            if samples not in (1, 3, 4) or page.imagedepth != 1:
                raise _bad(name, f"16-bit TIFF with {samples} samples per pixel and depth {page.imagedepth} is not "
                                 "supported")
            if page.is_tiled or (samples > 1 and page.planarconfig != 1):  # not whole rows per segment
                values = page.asarray(buffersize=_TIFF_READ_BYTES)
                if page.axes.startswith("S"):  # planar configuration: samples first
                    values = np.moveaxis(values, 0, -1)
                blocks = iter([(0, values.reshape(height, width, samples))])
            else:
                blocks = _tiff_strips(page, height, width, samples)
            if samples == 1:
                codes = np.empty((height, width), dtype=np.uint16)
                for top, block in blocks:
                    codes[top : top + len(block)] = block[..., 0]
                source = _from_codes(codes, 16, format_name, mode)
            else:
                source = _from_rgb_blocks(blocks, height, width, format_name, mode, tone_config,
                                          _icc_16bit_converter(icc, name), keep_rgb)
    except BadImageError:
        raise
    except MemoryError:
        raise
    except ValueError as exc:
        if "imagecodecs" in str(exc):
            # A deployment problem, not a bad image: fail loudly, do not class the item.
            raise RuntimeError(f"{name}: decoding this TIFF needs the 'imagecodecs' package ({exc})") from exc
        raise _bad(name, f"corrupt 16-bit TIFF ({exc})") from exc
    except Exception as exc:  # tifffile/zlib raise many types on corrupt data
        raise _bad(name, f"corrupt 16-bit TIFF ({type(exc).__name__}: {exc})") from exc
    return _oriented(source, orientation)


def _tiff_strips(page, height: int, width: int, samples: int):
    """(top row, (rows, W, samples) uint16 codes) for each strip of a contiguous, untiled page, top to bottom."""
    for segment, indices, _ in page.segments(buffersize=_TIFF_READ_BYTES, maxworkers=1):
        top = indices[2]
        block = segment[0, : height - top, :width].reshape(-1, width, samples)
        if block.dtype.kind != "u" or block.dtype.itemsize != 2:
            raise ValueError(f"16-bit TIFF strip decoded to {block.dtype}")
        yield top, block.astype(np.uint16, copy=False)


def _oriented(source: SourceImage, orientation: int) -> SourceImage:
    """The source turned by its EXIF/TIFF orientation (a copy of the planes only when there is a turn)."""
    if orientation in (1, 0):
        return source
    source.codes = np.ascontiguousarray(_apply_orientation(source.codes, orientation))
    if source.rgb is not None:
        source.rgb = np.ascontiguousarray(_apply_orientation(source.rgb, orientation))
    source.height, source.width = source.codes.shape
    return source


def _icc_16bit_converter(icc: bytes | None, name: str):
    """A function applying an embedded ICC profile to float RGB in [0, 1] through an 8-bit LittleCMS lattice
    (None without a profile).

    Pillow drives LittleCMS at 8 bits per channel, so the transform is sampled on
    a lattice of 8-bit codes and interpolated trilinearly for the 16-bit pixels:
    smooth (no 8-bit banding), within about half an 8-bit step of a direct
    16-bit transform.
    """
    if not icc:
        return None
    from scipy.interpolate import (
        RegularGridInterpolator,  # scikit-image's own dependency
    )

    # 1. Transform every lattice node once.
    nodes = np.arange(0, 256, _ICC_LATTICE_STEP, dtype=np.uint8)
    grid = np.stack(np.meshgrid(nodes, nodes, nodes, indexing="ij"), axis=-1)  # (n, n, n, 3)
    lattice = Image.fromarray(np.ascontiguousarray(grid.reshape(-1, len(nodes), 3)))
    try:
        converted = ImageCms.profileToProfile(
            lattice, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _srgb_profile(),
            renderingIntent=_ICC_INTENT, outputMode="RGB",
        )
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        raise _bad(name, f"embedded ICC profile cannot be applied ({exc})") from exc
    table = np.asarray(converted).reshape(grid.shape).astype(np.float64) / 255.0

    # 2. The pixels are interpolated a block at a time by the caller.
    axis = nodes.astype(np.float64) / 255.0
    interpolate = RegularGridInterpolator((axis, axis, axis), table, method="linear")
    return lambda rgb: np.clip(interpolate(rgb.reshape(-1, 3)).reshape(rgb.shape), 0.0, 1.0)


def _codes16(gray: np.ndarray) -> np.ndarray:
    """Gray levels in [0, 1] as 16-bit codes (half a code, 8e-6, at most from the level)."""
    return np.round(np.clip(gray, 0.0, 1.0) * 65535.0).astype(np.uint16)


def _from_codes(codes: np.ndarray, bit_depth: int, format_name: str, mode: str) -> SourceImage:
    height, width = codes.shape
    return SourceImage(
        codes=np.ascontiguousarray(codes), bit_depth=bit_depth, width=width, height=height,
        format=format_name, tone="gray", mode=mode, rgb=None,
    )


def _from_rgb(values: np.ndarray, bit_depth: int, format_name: str, mode: str, tone_config: ToneConfig,
              convert, keep_rgb: bool) -> SourceImage:
    """SourceImage from (H, W, 3 or 4) uint8 sRGB codes (see :func:`_from_rgb_blocks`)."""
    source = _from_rgb_blocks(iter([(0, values)]), values.shape[0], values.shape[1], format_name, mode, tone_config,
                              convert, keep_rgb)
    source.bit_depth = bit_depth
    return source


def _from_rgb_blocks(blocks, height: int, width: int, format_name: str, mode: str, tone_config: ToneConfig,
                     convert, keep_rgb: bool) -> SourceImage:
    """SourceImage from blocks of rows ``(top, (rows, W, 3 or 4) uint8/uint16 sRGB codes)`` (alpha straight),
    converted a few rows at a time: colour-managed with ``convert`` (when given), composited over white, the gray
    plane as 16-bit codes of the neutral gray with each pixel's L*. The tone is classed on the regular subsample
    :func:`classify_tone` takes, gathered as the rows pass. Nothing float is full-size except ``rgb`` when kept;
    the bit depth is the codes'."""
    codes = np.empty((height, width), dtype=np.uint16)
    rgb = np.empty((height, width, 3), dtype=np.float32) if keep_rgb else None
    step = max(1, math.ceil(math.sqrt(height * width / tone_config.max_samples)))  # classify_tone's own sample
    rows = max(1, _CHUNK_PIXELS // width)
    sampled, scale, bit_depth = [], 1.0, 8

    def unit(block: np.ndarray) -> np.ndarray:
        block = block.astype(np.float64) * scale
        if block.shape[-1] == 4:
            block = _over_white(block[..., :3], block[..., 3:])
        return block if convert is None else convert(block)

    for top, block in blocks:
        scale = 1.0 / float(np.iinfo(block.dtype).max)
        bit_depth = 8 * block.dtype.itemsize
        for start in range(0, len(block), rows):
            at = top + start
            part = unit(block[start : start + rows])
            codes[at : at + len(part)] = _codes16(_gray_keeping_lightness(part))
            if rgb is not None:
                rgb[at : at + len(part)] = part
        sampled.append(block[(np.arange(top, top + len(block)) % step) == 0, ::step])
    return SourceImage(
        codes=codes, bit_depth=bit_depth, width=width, height=height, format=format_name,
        tone=classify_tone(unit(np.concatenate(sampled)), tone_config), mode=mode, rgb=rgb,
    )


def _gray_keeping_lightness(rgb: np.ndarray) -> np.ndarray:
    """(H, W) neutral gray levels with the L* of each sRGB pixel (float64).

    L* is a function of relative luminance Y alone, and a neutral sRGB gray
    ``(g, g, g)`` has Y equal to ``g`` linearised (sRGB's Y row sums to 1), so
    the gray level of the same L* is the pixel's Y encoded with the sRGB curve.
    """
    luminance = skimage.color.rgb2xyz(np.asarray(rgb, dtype=np.float64))[..., 1]
    return np.clip(_srgb_encode(luminance), 0.0, 1.0)


def _srgb_encode(linear: np.ndarray) -> np.ndarray:
    """The sRGB transfer curve (IEC 61966-2-1): linear light to encoded values (scikit-image's constants)."""
    linear = np.maximum(linear, 0.0)
    return np.where(linear > 0.0031308, 1.055 * np.power(linear, 1.0 / 2.4) - 0.055, 12.92 * linear)


def _over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite straight-alpha values over white, in the encoded values as viewers do."""
    return color * alpha + (1.0 - alpha)


def _apply_orientation(values: np.ndarray, orientation: int) -> np.ndarray:
    """numpy equivalent of ImageOps.exif_transpose for EXIF/TIFF orientation 1..8."""
    if orientation == 2:
        return values[:, ::-1]
    if orientation == 3:
        return values[::-1, ::-1]
    if orientation == 4:
        return values[::-1]
    if orientation == 5:
        return values.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(values, k=-1)
    if orientation == 7:
        return values[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(values, k=1)
    return values


# --- writing helpers -------------------------------------------------------------


def _check_output_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ValueError(f"rgb must be a non-empty (H, W, 3) array, got {describe(rgb)}")
    if rgb.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"rgb must be uint8 or uint16, got dtype {rgb.dtype}")


def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.lru_cache(maxsize=1)
def _srgb_icc() -> bytes:
    """The sRGB profile embedded in every derivative, identical in every process.

    LittleCMS stamps the moment a profile is built into its header (bytes 24-35,
    the ICC ``dateTimeNumber``); left there, two runs over the same input would
    write derivatives that differ in those bytes alone. The header gets a fixed
    date instead (the profile carries no MD5 id that would cover it).
    """
    profile = bytearray(_srgb_profile().tobytes())
    profile[24:36] = struct.pack(">6H", *SRGB_PROFILE_DATE)
    return bytes(profile)


def _bad(name: str, reason: str) -> BadImageError:
    """A one-line BadImageError naming the image."""
    return BadImageError(" ".join(f"{name}: {reason}".split()))
