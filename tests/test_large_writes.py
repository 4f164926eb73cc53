"""Writing a scan's derivatives in bounded memory: the master written strip by strip into a staged file and
published whole, the access copy from a reduced image, metrics without full-size copies."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from s3server import s3_bucket, s3_client, s3_endpoint  # noqa: F401 (fixtures)

from diffcolor import __version__
from diffcolor.archive import images, storage
from diffcolor.archive.images import encode_access, encode_master, reduced_8bit, write_master
from diffcolor.common.errors import StorageError
from diffcolor.method.metrics import colorfulness

MIB = 2**20
REPO = Path(__file__).resolve().parents[1]


def _smooth_rgb16(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A colourful 16-bit RGB image with gradients, edges and noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([xs / width, ys / height, 0.5 + 0.4 * np.sin(xs / 7.0 + ys / 11.0)], axis=-1)
    rgb[height // 3 : height // 2, width // 4 :] = (0.9, 0.1, 0.2)
    rgb += rng.normal(0, 0.02, rgb.shape).astype(np.float32)
    return np.round(np.clip(rgb, 0, 1) * 65535).astype(np.uint16)


def _to_8bit(rgb16: np.ndarray) -> np.ndarray:
    return ((rgb16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


# ---------------------------------------------------------------------------
# Encoding: the same pixels whatever the strips.


@pytest.mark.parametrize("factor", [1, 3, (4, 3)])
def test_reduced_8bit_is_pillows_reduce_of_the_whole_image_whatever_the_strips(monkeypatch, factor):
    rgb = _smooth_rgb16(301, 203)
    expected = np.asarray(Image.fromarray(_to_8bit(rgb)).reduce(factor))
    for chunk in (1 << 20, 203 * 7, 1):  # one strip, strips of a few boxes, one box row per strip
        monkeypatch.setattr(images, "_CHUNK_PIXELS", chunk)
        assert np.array_equal(np.asarray(reduced_8bit(rgb, factor)), expected)


def test_access_copy_downscale_is_pillows_reducing_gap_lanczos(monkeypatch):
    rgb = _smooth_rgb16(900, 1300, seed=1)
    expected = Image.fromarray(_to_8bit(rgb)).resize((200, 138), Image.Resampling.LANCZOS, reducing_gap=2.0)
    monkeypatch.setattr(images, "_CHUNK_PIXELS", 1300 * 10)  # many strips
    got = Image.open(io.BytesIO(encode_access(rgb, "PNG", max_side=200)))
    assert got.size == (200, 138)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    # Within a few levels of a fair Lanczos of the whole image (Pillow's documented trade).
    fair = np.asarray(Image.fromarray(_to_8bit(rgb)).resize((200, 138), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(np.asarray(got).astype(int) - fair).mean() < 1.0


def test_a_full_size_access_copy_keeps_every_pixel(monkeypatch):
    rgb = _smooth_rgb16(97, 61, seed=2)
    monkeypatch.setattr(images, "_CHUNK_PIXELS", 61 * 5)
    got = np.asarray(Image.open(io.BytesIO(encode_access(rgb, "PNG", max_side=None))))
    assert np.array_equal(got, _to_8bit(rgb))


def test_master_written_to_a_file_is_the_encoded_master_in_strips(tmp_path):
    rgb = _smooth_rgb16(700, 500, seed=3)
    xmp = b"<x:xmpmeta xmlns:x='adobe:ns:meta/'>master</x:xmpmeta>"
    path = tmp_path / "master.tif"
    with open(path, "wb") as stream:
        write_master(stream, rgb, xmp, resolution=images.Resolution(600, 600))
    data = path.read_bytes()
    assert data == encode_master(rgb, xmp, resolution=images.Resolution(600, 600))  # run to run, file or memory
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages.first
        assert np.array_equal(page.asarray(), rgb)
        assert page.tags["Compression"].value == 5 and page.tags["Predictor"].value == 2
        assert page.tags["RowsPerStrip"].value < 700 and len(page.dataoffsets) > 1  # strips, not one block
        assert 34675 in page.tags and page.tags[700].value == xmp


def test_master_bytes_do_not_depend_on_how_the_strips_cut_the_rows(tmp_path):
    rgb = _smooth_rgb16(257, 90, seed=5)
    expected = encode_master(rgb, compression="lzw")
    for cuts in ([257], [1] * 257, [100, 57, 100], [3, 250, 4]):
        buffer = io.BytesIO()
        tops = np.cumsum([0, *cuts])
        images.write_master_strips(buffer, (rgb[a:b] for a, b in zip(tops[:-1], tops[1:])), (257, 90), np.uint16)
        assert buffer.getvalue() == expected, cuts
    # The same bytes tifffile writes from the whole array, for every compression.
    for name, codec in images.MASTER_COMPRESSIONS.items():
        direct = io.BytesIO()
        tifffile.imwrite(direct, rgb, photometric="rgb", compression=codec, predictor=codec is not None,
                         rowsperstrip=262144 // (90 * 6), metadata=None, software=f"DiffColor Archive {__version__}",
                         extratags=[(34675, 7, len(images._srgb_icc()), images._srgb_icc(), True)])
        assert encode_master(rgb, compression=name) == direct.getvalue(), name


@pytest.mark.parametrize("cuts", [[10, 10], [25], [5, 21]])
def test_strips_that_do_not_make_the_image_are_refused(cuts):
    rgb = _smooth_rgb16(20, 8)
    tops = np.cumsum([0, *cuts])
    strips = (np.resize(rgb, (b - a, 8, 3)).astype(np.uint16) for a, b in zip(tops[:-1], tops[1:]))
    if sum(cuts) == 20:
        strips = (np.zeros((10, 8, 3), np.uint8) for _ in range(2))  # wrong dtype
    with pytest.raises(ValueError, match="strip"):
        images.write_master_strips(io.BytesIO(), strips, (20, 8), np.uint16)


def test_the_strip_merge_gives_merge_full_resolutions_pixels_and_numbers():
    import torch

    from diffcolor.method.merge import MergeConfig, StripMerge, merge_full_resolution

    rng = np.random.default_rng(6)
    gray = np.clip(rng.random((300, 220)) * 0.2 + np.linspace(0.1, 0.9, 220)[None, :], 0, 1)
    chroma = torch.from_numpy(rng.normal(0, 30, (2, 40, 30)).astype(np.float32))
    config = MergeConfig(strip_pixels=220 * 16)
    whole = merge_full_resolution(gray, chroma, 16, config)
    merge = StripMerge(gray, chroma, 16, config)
    strips = list(merge)
    assert len(strips) > 1 and all(strip.dtype == np.uint16 for strip in strips)
    assert np.array_equal(np.concatenate(strips), whole.rgb)
    assert merge.numbers.max_delta_l == whole.max_delta_l and merge.numbers.ssim_l == whole.ssim_l
    assert merge.numbers.gamut_clipped_fraction == whole.gamut_clipped_fraction


def test_colorfulness_strip_by_strip_equals_the_whole_image_formula():
    rgb = _smooth_rgb16(1100, 700, seed=4)  # several strips of FidelityConfig.chunk_pixels
    values = rgb.astype(np.float64) / 65535 * 255
    rg = values[..., 0] - values[..., 1]
    yb = 0.5 * (values[..., 0] + values[..., 1]) - values[..., 2]
    expected = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    assert colorfulness(rgb) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------
# Staged files: nothing visible before publish, everything after, sha256 of what was sent.


def _fill(size: int, seed: int):
    def writer(stream) -> None:
        block = bytes([seed]) * MIB
        for _ in range(size // MIB):
            stream.write(block)
        stream.write(bytes([seed]) * (size % MIB))

    return writer


def _leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".partial"))


def test_a_staged_local_file_is_invisible_until_published_then_whole(tmp_path):
    uri = str(tmp_path / "item" / "versions" / "v0001" / "master.tif")
    with storage.staged(uri) as staged:
        staged.write(_fill(3 * MIB + 17, 7))
        assert not storage.exists(uri)
        assert Path(staged.path).parent == Path(uri).parent  # beside it: publishing is a rename
        digest = staged.publish()
    assert storage.read_bytes(uri) == bytes([7]) * (3 * MIB + 17)
    assert digest == hashlib.sha256(bytes([7]) * (3 * MIB + 17)).hexdigest() == storage.sha256_of(uri)
    assert _leftovers(Path(uri).parent) == []
    assert oct(os.stat(uri).st_mode & 0o777) != oct(0o600)  # the umask's mode, as write_bytes gives


def test_a_failure_before_publish_leaves_the_previous_object_and_no_staging_file(tmp_path):
    uri = str(tmp_path / "master.tif")
    storage.write_bytes(uri, b"previous version, whole")
    with pytest.raises(RuntimeError, match="encoder died"):
        with storage.staged(uri) as staged:
            staged.write(_fill(MIB, 1))
            raise RuntimeError("encoder died")
    assert storage.read_bytes(uri) == b"previous version, whole"
    assert _leftovers(tmp_path) == []


def test_a_disk_error_while_writing_a_staged_file_is_a_storage_error(tmp_path):
    uri = str(tmp_path / "master.tif")

    def full(stream) -> None:
        stream.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="master.tif"):
        with storage.staged(uri) as staged:
            staged.write(full)
    assert not storage.exists(uri) and _leftovers(tmp_path) == []


def test_a_staged_file_goes_to_s3_in_parts_and_a_failed_part_leaves_nothing(s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setattr(storage, "S3_MULTIPART_THRESHOLD", 6 * MIB)
    monkeypatch.setattr(storage, "S3_PART_SIZE", 5 * MIB)
    uri = storage.join(s3_bucket, "item", "master.tif")
    size = 12 * MIB + 5
    with storage.staged(uri) as staged:
        staged.write(_fill(size, 9))
        local = staged.path
        assert not storage.exists(uri)
        digest = staged.publish()
    assert not os.path.exists(local)
    assert digest == hashlib.sha256(bytes([9]) * size).hexdigest() == storage.sha256_of(uri)
    client = s3_client(s3_endpoint)
    head = client.head_object(Bucket=s3_bucket.removeprefix("s3://"), Key="item/master.tif")
    assert head["ContentLength"] == size and head["ContentType"] == "image/tiff"
    assert "-3" in head["ETag"]  # three parts

    import s3fs

    original = s3fs.S3FileSystem.call_s3

    def fail_part_two(self, method, *args, **kwargs):
        if method == "upload_part" and kwargs.get("PartNumber") == 2:
            raise OSError("connection reset (injected) on part 2")
        return original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", fail_part_two)
    other = storage.join(s3_bucket, "item", "v2", "master.tif")
    with pytest.raises(StorageError):
        with storage.staged(other) as staged:
            staged.write(_fill(size, 10))
            staged.publish()
    assert not storage.exists(other) and not os.path.exists(staged.path)
    assert client.list_multipart_uploads(Bucket=s3_bucket.removeprefix("s3://")).get("Uploads", []) == []


def _publish_repeatedly(uri: str, rounds: int) -> None:
    for round_ in range(rounds):
        with storage.staged(uri) as staged:
            staged.write(_fill(8 * MIB, 1 + round_ % 2))
            staged.publish()


def test_a_reader_in_another_process_never_sees_a_partial_master(tmp_path):
    uri = str(tmp_path / "master.tif")
    storage.write_bytes(uri, bytes([2]) * 8 * MIB)
    writer = multiprocessing.get_context("spawn").Process(target=_publish_repeatedly, args=(uri, 12))
    writer.start()
    seen = set()
    while writer.is_alive() or not seen:
        data = storage.read_bytes(uri)
        assert len(data) == 8 * MIB and data in (bytes([1]) * 8 * MIB, bytes([2]) * 8 * MIB)
        seen.add(data[0])
    writer.join()
    assert writer.exitcode == 0
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------
# A scan through colorize and recolor: the writing phase's memory (real processes, peak RSS).

# Runs the command line with each version's merge-and-write measured: the process's peak RSS (VmHWM, reset when
# the version's writing starts) over its RSS then; and the whole process's peak; printed as JSON.
_MEASURED_CLI = textwrap.dedent("""
    import json, resource, sys
    import diffcolor.pipeline as pipeline

    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))

    write_version, phases = pipeline._write_version, []

    def measured_write_version(*args, **kwargs):
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        phases.append({"rss_before": status("VmRSS")})
        record = write_version(*args, **kwargs)
        phases[-1]["peak"] = status("VmHWM")
        return record

    pipeline._write_version = measured_write_version
    from diffcolor.cli import main
    code = main(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the whole process's, never reset
    print("WRITE_PHASES " + json.dumps({"phases": phases, "peak": peak}))
    sys.exit(code)
""")


def _run_measured(*arguments: str) -> tuple[list[dict], int]:
    """Runs the CLI in a child process; its writing phases and the child's peak RSS (bytes)."""
    done = subprocess.run([sys.executable, "-c", _MEASURED_CLI, *arguments], capture_output=True, text=True,
                          cwd=REPO, timeout=3000, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("WRITE_PHASES "))
    measured = json.loads(line.removeprefix("WRITE_PHASES "))
    return measured["phases"], measured["peak"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_merging_and_writing_a_24_mpx_scan_hold_no_full_size_copy(tmp_path, cache_dir):
    # A 24 Mpx 16-bit gray scan (6000 x 4000, 600 dpi): its master is 144 MB of pixels, 158 MB as LZW.
    height, width = 6000, 4000
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    gray = 0.5 + 0.3 * np.sin(xs / 500 + ys / 800) + np.random.default_rng(0).normal(0, 0.01, (height, width))
    scan = tmp_path / "scan.tif"
    tifffile.imwrite(scan, np.round(np.clip(gray, 0, 1) * 65535).astype(np.uint16), compression="zlib",
                     resolution=(600, 600), resolutionunit="INCH")
    del ys, xs, gray
    out = tmp_path / "item"

    colorize, _ = _run_measured("colorize", str(scan), "--caption", "a street", "--model", "tiny", "--preset",
                                "smoke", "--out", str(out), "--device", "cpu")
    recolor, recolor_peak = _run_measured("recolor", str(out), "--target", "a red street", "--device", "cpu")

    # A version's merge and writing (master, access copy, metrics, records) hold no full-size copy of the
    # output: together they add at most 256 MiB to the process (the 144 MB output array alone did not fit
    # that; with the encoded, 8-bit and float copies of the writing they added 1.6 GiB).
    assert len(colorize) == len(recolor) == 1
    for phase in colorize + recolor:
        assert phase["peak"] - phase["rss_before"] <= 256 * MIB, phase
    # The recolour's whole process within the goal for a 24 Mpx scan.
    assert recolor_peak <= 1.5 * 2**30
    record = json.loads((out / "result.json").read_text())
    with tifffile.TiffFile(record["outputs"]["master"]) as tiff:
        assert tiff.pages.first.shape == (height, width, 3) and tiff.pages.first.dtype == np.uint16
        assert 700 in tiff.pages.first.tags and 34675 in tiff.pages.first.tags
    assert storage.sha256_of(record["outputs"]["master"]) == record["output_sha256"]["master"]
    assert max(Image.open(record["outputs"]["access"]).size) == 512  # the smoke preset's access side
