"""``python -m diffcolor.tools.bench_scan``: ``diffcolor recolor`` of a large scan against a 512 px photograph.

The goal (docs/PERFORMANCE.md, "Large scans"): a recolour of a 24 Mpx 16-bit
scan takes at most 2x the recolour of a 512 px photograph, at no more than
1.5 GiB peak; a 100 Mpx scan goes through ``colorize`` and ``recolor`` at no more
than 2 GiB. Both are measured as the real command line does the work, each run
in a fresh process, in one run of this tool so that both see the same machine.

It writes a synthetic scan (a 2:3 16-bit gray TIFF, LZW by default, 600 dpi:
the ramp, discs and noise of :func:`diffcolor.tools.bench_merge.synthetic_scan`,
made strip by strip so that this process never holds the image) and a 512 px
8-bit gray JPEG photograph; colourises each once with ``--model tiny --preset
smoke`` (so that there is a stored colour state; the fit costs seconds), then,
interleaved, ``--repeats`` times each: ``diffcolor recolor`` with a new seed (a
new render, never the committed one). Each command runs in its own process;
its peak RSS is that process's high-water mark (``os.wait4``). It reports the
best wall time of each recolour, their ratio, every peak, the phases the
records give (read, render, merge, write), and writes everything to ``--json``::

    python -m diffcolor.tools.bench_scan --megapixels 24 --json bench-scan.json
    python -m diffcolor.tools.bench_scan --megapixels 24 --megapixels 100 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

GOAL_RATIO = 2.0  # recolour of the scan over that of the photograph (docs/PERFORMANCE.md)
GOAL_PEAK_BYTES = {24: int(1.5 * 2**30), 100: 2 * 2**30}  # the goal at each size; others take the next size's
PHOTO_SIDE = 512  # the photograph's long side
CAPTION = "a street with a door and a bicycle"
STRIP_ROWS = 256  # rows the scan is made and written at a time


def scan_size(megapixels: float) -> tuple[int, int]:
    """(height, width) of a 2:3 scan of ``megapixels``, as :func:`bench_merge.synthetic_scan` sizes it."""
    height = max(8, int(round((megapixels * 1e6 * 2 / 3) ** 0.5)))
    return height, max(8, int(round(height * 1.5)))


def scan_strips(height: int, width: int, bit_depth: int = 16, seed: int = 0):
    """The synthetic scan's rows as (rows, width) uint arrays, top to bottom: a ramp, twelve discs of
    other gray levels, gaussian noise (the content of bench_merge's synthetic scan, made a strip at a time)."""
    rng = np.random.default_rng(seed)
    discs = []
    for _ in range(12):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.05, 0.2) * min(height, width)
        discs.append((cy, cx, radius, rng.uniform(0.05, 0.95)))
    levels = 255 if bit_depth == 8 else 65535
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    ramp = np.linspace(0.1, 0.9, width, dtype=np.float32)[None, :]
    cols = np.arange(width)[None, :]
    for top in range(0, height, STRIP_ROWS):
        rows = np.arange(top, min(height, top + STRIP_ROWS))[:, None]
        gray = ramp.repeat(len(rows), axis=0)
        for cy, cx, radius, level in discs:
            gray[(rows - cy) ** 2 + (cols - cx) ** 2 < radius**2] = level
        gray += rng.normal(0.0, 0.02, gray.shape).astype(np.float32)
        yield np.round(np.clip(gray, 0.0, 1.0) * levels).astype(dtype)


def write_scan(path: Path, megapixels: float, compression: str = "lzw") -> tuple[int, int]:
    """A synthetic 16-bit gray TIFF scan of ``megapixels`` at 600 dpi; returns its (height, width)."""
    import tifffile

    height, width = scan_size(megapixels)
    raw = path.with_suffix(".raw")  # the pixels on disk first: tifffile streams strips from a memory map
    try:
        with raw.open("wb") as file:
            for strip in scan_strips(height, width):
                file.write(strip.tobytes())
        pixels = np.memmap(raw, dtype=np.uint16, mode="r", shape=(height, width))
        tifffile.imwrite(
            path, pixels, photometric="minisblack", compression=None if compression == "none" else compression,
            rowsperstrip=64, resolution=(600, 600), resolutionunit="INCH", metadata=None,
        )
        del pixels
    finally:
        raw.unlink(missing_ok=True)
    return height, width


def write_photo(path: Path) -> tuple[int, int]:
    """A 512 px 8-bit gray JPEG photograph with the same content; returns its (height, width)."""
    from PIL import Image

    height = round(PHOTO_SIDE * 2 / 3)
    pixels = np.concatenate(list(scan_strips(height, PHOTO_SIDE, bit_depth=8)))
    Image.fromarray(pixels, mode="L").save(path, quality=92)
    return height, PHOTO_SIDE


def run_command(args: list[str], env: dict) -> dict:
    """Runs ``python -m diffcolor ARGS`` in a fresh process: its wall time and peak RSS (bytes)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "diffcolor", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = output.decode("utf-8", "replace")[-3000:]
        raise RuntimeError(f"diffcolor {' '.join(args)} exited {process.returncode}:\n{tail}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024}  # ru_maxrss is in KiB on Linux


def _phases(item: Path) -> dict:
    """The seconds per phase the item's latest record gives (read, render, merge, write)."""
    from diffcolor.archive.layout import ItemLayout

    record = json.loads(Path(ItemLayout(str(item)).result).read_text())
    return {name: round(value, 3) for name, value in (record.get("seconds") or {}).items()}


def _goal_peak(megapixels: float) -> int:
    return next((goal for size, goal in sorted(GOAL_PEAK_BYTES.items()) if megapixels <= size),
                GOAL_PEAK_BYTES[max(GOAL_PEAK_BYTES)])


def run(sizes: list[float], repeats: int, workdir: Path, compression: str) -> dict:
    """Makes the images, colourises each once, times the recolours interleaved; returns every figure."""
    env = dict(os.environ)
    common = ["--model", "tiny", "--device", "cpu"]

    # 1. The images, and one colourisation of each (the state every recolour renders from).
    images = {"photo": {"path": workdir / "photo.jpg", "size": write_photo(workdir / "photo.jpg")}}
    for megapixels in sizes:
        path = workdir / f"scan-{megapixels:g}mpx.tif"
        images[f"{megapixels:g}mpx"] = {"path": path, "size": write_scan(path, megapixels, compression),
                                        "megapixels": megapixels}
    for name, image in images.items():
        image["item"] = workdir / f"item-{name}"
        image["colorize"] = run_command(["colorize", str(image["path"]), "--caption", CAPTION, "--out",
                                         str(image["item"]), "--preset", "smoke", *common], env)
        image["colorize"]["phases"] = _phases(image["item"])
        image["recolor"] = []

    # 2. The recolours, interleaved: photograph, then each scan, ``repeats`` times.
    for repeat in range(repeats):
        for image in images.values():
            timing = run_command(["recolor", str(image["item"]), "--target", "a street with a blue door",
                                  "--seed", str(100 + repeat), *common], env)
            timing["phases"] = _phases(image["item"])
            image["recolor"].append(timing)

    # 3. The figures: best of each, ratio to the photograph, peaks against the goals.
    photo_best = min(timing["seconds"] for timing in images["photo"]["recolor"])
    result = {"repeats": repeats, "compression": compression, "photo": _summary(images["photo"]), "scans": [],
              "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for megapixels in sizes:
        summary = _summary(images[f"{megapixels:g}mpx"])
        goal = _goal_peak(megapixels)
        summary.update(ratio=summary["recolor_best_s"] / photo_best, goal_ratio=GOAL_RATIO, goal_peak_bytes=goal,
                       recolor_peak_ok=summary["recolor_peak_rss_bytes"] <= goal,
                       colorize_peak_ok=summary["colorize_peak_rss_bytes"] <= goal)
        result["scans"].append(summary)
    return result


def _summary(image: dict) -> dict:
    best = min(image["recolor"], key=lambda timing: timing["seconds"])
    return {
        "file": image["path"].name, "size": list(image["size"]), "file_bytes": image["path"].stat().st_size,
        "megapixels": image["size"][0] * image["size"][1] / 1e6,
        "colorize_s": image["colorize"]["seconds"], "colorize_peak_rss_bytes": image["colorize"]["peak_rss_bytes"],
        "colorize_phases": image["colorize"]["phases"],
        "recolor_seconds": [timing["seconds"] for timing in image["recolor"]],
        "recolor_best_s": best["seconds"],
        "recolor_peak_rss_bytes": max(timing["peak_rss_bytes"] for timing in image["recolor"]),
        "recolor_phases": best["phases"],
    }


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffcolor.tools.bench_scan", description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, action="append",
                        help="size of a synthetic scan; repeat for several (default 24)")
    parser.add_argument("--repeats", type=int, default=2, help="recolours of each, interleaved; the best counts")
    parser.add_argument("--compression", choices=("lzw", "none", "zlib"), default="lzw",
                        help="the scan TIFF's compression (default lzw)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the images and items go (default: a "
                        "temporary folder, removed afterwards)")
    parser.add_argument("--json", type=Path, default=Path("bench-scan.json"), help="where to write the figures")
    args = parser.parse_args(argv)
    sizes = args.megapixels or [24.0]
    if min(sizes) <= 0 or args.repeats < 1:
        parser.error(f"--megapixels and --repeats must be positive, got {sizes} and {args.repeats}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scan-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(sizes, args.repeats, workdir, args.compression)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    photo = result["photo"]
    print(f"photo  {photo['size'][0]}x{photo['size'][1]}: recolor best {photo['recolor_best_s']:.1f} s, peak "
          f"{_gib(photo['recolor_peak_rss_bytes'])}; colorize {photo['colorize_s']:.1f} s, "
          f"peak {_gib(photo['colorize_peak_rss_bytes'])}")
    for scan in result["scans"]:
        print(f"scan   {scan['size'][0]}x{scan['size'][1]} ({scan['megapixels']:.1f} Mpx, "
              f"{scan['file_bytes'] / 2**20:.0f} MiB file): recolor best {scan['recolor_best_s']:.1f} s "
              f"= {scan['ratio']:.2f}x the photo (goal <= {GOAL_RATIO:g}x), peak {_gib(scan['recolor_peak_rss_bytes'])} "
              f"(goal <= {_gib(scan['goal_peak_bytes'])}); colorize {scan['colorize_s']:.1f} s, peak "
              f"{_gib(scan['colorize_peak_rss_bytes'])}")
        print(f"       recolor phases {scan['recolor_phases']}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
