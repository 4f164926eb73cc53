"""Bounded memory on large scans: decoding keeps the gray plane at its codes, and the command line colourises and
recolours a 100-megapixel 16-bit scan within 2 GiB (docs/PERFORMANCE.md, "Large scans").

Peaks are each run's own RSS high-water mark, in a fresh process (``os.wait4``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from diffcolor.tools.bench_scan import CAPTION, write_scan

MIB = 2**20

# In a fresh process: the file's bytes read, then the decode; prints how far the decode took the RSS above what
# the process held before it (its high-water mark, VmHWM, less its RSS then: ru_maxrss would also count the
# parent's, which a child inherits across exec) and what it kept.
_DECODE = textwrap.dedent("""
    import json, sys
    import imagecodecs  # tifffile's codecs, imported on first use: a fixed cost, paid before the measure
    from diffcolor.archive.images import read_image

    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

    data = open(sys.argv[1], "rb").read()
    before = status("VmRSS")
    source = read_image(data, sys.argv[1], keep_rgb=sys.argv[2] == "keep")
    after = status("VmHWM")
    print(json.dumps({"added": after - before, "kept": source.codes.nbytes, "tone": source.tone,
                      "shape": list(source.codes.shape), "file": len(data)}))
""")


def _decode_peak(path, keep_rgb: bool = False) -> dict:
    completed = subprocess.run([sys.executable, "-c", _DECODE, str(path), "keep" if keep_rgb else "drop"],
                               capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(completed.stdout)


def _ramp(height: int, width: int) -> np.ndarray:
    """A 16-bit gray ramp with noise in every row (so that the file does not compress to nothing)."""
    noise = np.random.default_rng(0).integers(0, 512, (height, width), dtype=np.uint16)
    return np.linspace(4096, 60000, width, dtype=np.uint16)[None, :] + noise


def _ramp_rgb(height: int, width: int) -> np.ndarray:
    """A 16-bit sepia-toned RGB version of :func:`_ramp` (a toned print's scan)."""
    tint = np.array([1.0, 0.9, 0.75])
    return (_ramp(height, width)[..., None] * tint).astype(np.uint16)


def test_a_16bit_gray_scan_decodes_into_its_own_codes_and_little_more(tmp_path):
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, _ramp(2000, 3000), photometric="minisblack", compression="lzw", rowsperstrip=64)
    peak = _decode_peak(path)
    assert peak["tone"] == "gray" and peak["kept"] == 2 * peak["shape"][0] * peak["shape"][1]
    # The codes (12 MB), decoded strip by strip into one array, and a few strips' buffers; the float64 plane
    # and Pillow's copies took 11x the codes before.
    assert peak["added"] <= peak["kept"] + 40 * MIB, peak


def test_a_16bit_rgb_scan_decodes_without_full_size_float_copies(tmp_path):
    path = tmp_path / "toned.tif"
    tifffile.imwrite(path, _ramp_rgb(2000, 3000), photometric="rgb", compression="lzw", rowsperstrip=64)
    peak = _decode_peak(path)
    assert peak["tone"] == "toned"
    # The gray plane (12 MB), a few strips' buffers, the colour conversion of a few rows at a time and the tone
    # class's subsample; the float64 RGB and its float32 copy took 25x the gray plane before.
    assert peak["added"] <= peak["kept"] + 100 * MIB, peak
    kept = _decode_peak(path, keep_rgb=True)  # who asks for the RGB pays for it: 6x the gray plane in float32
    assert kept["added"] >= peak["added"] + 5 * peak["kept"], (kept, peak)


def _diffcolor(args: list[str]) -> tuple[int, str]:
    """Runs ``python -m diffcolor ARGS``: its peak RSS (bytes) and output."""
    process = subprocess.Popen([sys.executable, "-m", "diffcolor", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=dict(os.environ))
    output = process.stdout.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    return usage.ru_maxrss * 1024, output


@pytest.mark.slow
@pytest.mark.parametrize(("megapixels", "limit_gib"), [(100, 2.0)])
def test_colorize_and_recolor_of_a_large_16bit_scan_stay_within_the_memory_goal(tmp_path, megapixels, limit_gib):
    scan, item = tmp_path / "scan.tif", tmp_path / "item"
    height, width = write_scan(scan, megapixels)
    common = ["--model", "tiny", "--device", "cpu"]
    colorize_peak, _ = _diffcolor(["colorize", str(scan), "--caption", CAPTION, "--out", str(item),
                                   "--preset", "smoke", *common])
    record = json.loads((item / "result.json").read_text())
    assert record["status"] == "done" and (record["output_width"], record["output_height"]) == (width, height)
    recolor_peak, _ = _diffcolor(["recolor", str(item), "--target", "a street with a blue door", *common])
    record = json.loads((item / "result.json").read_text())
    assert record["version"] == 2 and record["output_bit_depth"] == 16
    limit = limit_gib * 2**30
    assert colorize_peak <= limit and recolor_peak <= limit, (colorize_peak / 2**30, recolor_peak / 2**30)
