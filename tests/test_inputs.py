"""Each awkward input of docs/DESIGN.md §9 gets its stated status, and inputs are never written."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib

import numpy as np
import pytest
import tifffile
from conftest import gray_scene
from PIL import Image

from diffcolor.archive import storage
from diffcolor.archive.results import read_results, write_results
from diffcolor.common.errors import BadImageError, InputUnavailableError
from diffcolor.common.items import ItemRequest
from diffcolor.pipeline import colorize_item

CAPTION = "a dog sitting on a wooden bench"


def _gray8(height=48, width=64):
    return np.round(gray_scene(height, width) * 255).astype(np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png() -> bytes:
    """A valid PNG header declaring 30000 x 30000 pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100))
            + _png_chunk(b"IEND", b""))


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


BAD_INPUTS = {
    "truncated.png": lambda: _save(Image.fromarray(_gray8()), "PNG")[:150],
    "corrupt.png": lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "notes.jpg": lambda: b"This is a catalogue note, not an image.\n",
    "scan.bmp": lambda: _save(Image.fromarray(_gray8()), "BMP"),
    "bomb.png": _bomb_png,
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_images_fail_as_bad_image_naming_the_file(models, smoke, tmp_path, gray_png, name):
    source = tmp_path / "in" / name
    source.parent.mkdir()
    source.write_bytes(BAD_INPUTS[name]())
    request = ItemRequest(item_id="bad", source_uri=str(source), caption=CAPTION)
    with pytest.raises(BadImageError) as info:
        colorize_item(models, request, str(tmp_path / "out" / "bad"), smoke)
    assert name in str(info.value) and "\n" not in str(info.value)
    record = storage.read_json(str(tmp_path / "out" / "bad" / "result.json"))
    assert record["status"] == "failed" and record["error_class"] == "bad_image" and name in record["error_message"]
    # The next item is unaffected.
    [good] = colorize_item(models, ItemRequest(item_id="good", source_uri=str(gray_png), caption=CAPTION),
                           str(tmp_path / "out" / "good"), smoke)
    assert good["status"] == "done"


def _exif_rotated_jpeg() -> bytes:
    image = Image.fromarray(_gray8(48, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return _save(image, "JPEG", exif=exif.tobytes(), quality=95)


def _la_png() -> bytes:
    alpha = np.full((48, 64), 255, np.uint8)
    alpha[:8] = 0
    return _save(Image.fromarray(np.dstack([_gray8(), alpha]), mode="LA"), "PNG")


ODD_BUT_FINE = {
    "rotated.jpg": (_exif_rotated_jpeg, (64, 48), 8),
    "palette.png": (lambda: _save(Image.fromarray(_gray8()).convert("P"), "PNG"), (48, 64), 8),
    "cmyk.jpg": (lambda: _save(Image.fromarray(_gray8()).convert("CMYK"), "JPEG", quality=95), (48, 64), 8),
    "alpha.png": (_la_png, (48, 64), 8),
    "scan16.png": (lambda: _save(Image.fromarray((_gray8().astype(np.uint16) * 257)), "PNG"), (48, 64), 16),
}


@pytest.mark.parametrize("name", sorted(ODD_BUT_FINE))
def test_16bit_cmyk_palette_alpha_and_exif_rotation_are_processed(models, smoke, tmp_path, name):
    make, shape, bit_depth = ODD_BUT_FINE[name]
    source = tmp_path / name
    source.write_bytes(make())
    [record] = colorize_item(models, ItemRequest(item_id="odd", source_uri=str(source), caption=CAPTION),
                             str(tmp_path / "out"), smoke)
    assert record["status"] == "done", record["error_message"]
    master = tifffile.imread(record["outputs"]["master"])
    assert master.shape == (*shape, 3)
    assert master.dtype == (np.uint16 if bit_depth == 16 else np.uint8)
    assert record["max_delta_l"] <= 1.0


def test_missing_and_unreadable_sources_are_input_unavailable(models, smoke, tmp_path, gray_png, monkeypatch):
    request = ItemRequest(item_id="gone", source_uri=str(tmp_path / "missing.tif"), caption=CAPTION)
    with pytest.raises(InputUnavailableError, match="missing.tif"):
        colorize_item(models, request, str(tmp_path / "out1"), smoke)
    assert storage.read_json(str(tmp_path / "out1" / "result.json"))["error_class"] == "input_unavailable"

    original = os.open

    def denied(path, *args, **kwargs):  # the tests run as root, where chmod 000 would not stop a read
        if str(path).endswith("bench.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    request = ItemRequest(item_id="locked", source_uri=str(gray_png), caption=CAPTION)
    with pytest.raises(InputUnavailableError, match="permission denied"):
        colorize_item(models, request, str(tmp_path / "out2"), smoke)


def test_nothing_is_written_under_an_input_location(models, smoke, tmp_path, gray_png, monkeypatch):
    inputs = gray_png.parent
    before = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in inputs.iterdir()}
    written = []
    real_write = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (written.append(uri), real_write(uri, data)))
    colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION,
                                      targets=("a red dog on a bench",)), str(tmp_path / "out"), smoke)
    assert written and not [uri for uri in written if uri.startswith(str(inputs))]
    after = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in inputs.iterdir()}
    assert after == before


def test_outputs_go_to_any_fsspec_uri_and_compact_into_results_parquet(models, smoke, gray_png):
    out = "memory://archive/items/bench"
    records = colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION,
                                                catalogue={"accession_number": "1987.12.3"}), out, smoke)
    master = storage.read_bytes(records[0]["outputs"]["master"])
    assert records[0]["outputs"]["master"].startswith("memory://") and hashlib.sha256(master).hexdigest() == records[0]["output_sha256"]["master"]
    assert storage.read_json(f"{out}/result.json")["version"] == 1

    count = write_results(records + [dict(records[0], status="skipped_done")], "memory://archive/runs/r1/results.parquet")
    table = read_results("memory://archive/runs/r1/results.parquet")
    assert count == table.num_rows == 2
    rows = table.to_pylist()
    assert rows[0]["item_id"] == "bench" and dict(rows[0]["outputs"])["master"] == records[0]["outputs"]["master"]
    assert rows[1]["status"] == "skipped_done"
    assert rows[0]["max_delta_l"] == pytest.approx(records[0]["max_delta_l"])
    assert '"accession_number": "1987.12.3"' in rows[0]["record_json"]
