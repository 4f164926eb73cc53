"""``python -m diffcolor.tools.bench_merge``: the full-resolution merge against scikit-image's rgb2lab.

The goal (docs/PERFORMANCE.md, "Full-resolution merge") is a merge of a 24 Mpx
16-bit scan at memory speed: at most 1.5x the time scikit-image's ``rgb2lab``
takes to convert the same image, measured in one process so that both see the
same machine. This builds a synthetic scan (a 2:3 16-bit gray image with a
ramp, discs of other gray levels and noise; a*/b* at model resolution, long
side 512, one colour per disc, some of them outside the sRGB gamut), then,
interleaved, ``--repeats`` times each: ``rgb2lab`` of the merged uint16 RGB, and
the merge. It reports the best time of each, their ratio, the clipped
fraction, and the merge's peak memory above its inputs (the resident set
sampled while a fresh process runs one merge), and writes everything to
``--json``.

``--merge MODULE:FUNCTION`` times another implementation with the same
signature, e.g. the reference the tests keep (run from the repository root)::

    python -m diffcolor.tools.bench_merge --megapixels 24 --json bench-merge.json
    python -m diffcolor.tools.bench_merge --megapixels 24 --merge tests.reference_merge:reference_merge_full_resolution
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

DEFAULT_MERGE = "diffcolor.method.merge:merge_full_resolution"
MODEL_SIDE = 512  # the chroma's long side, as the model gives it


def synthetic_scan(megapixels: float, bit_depth: int = 16, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(gray (H, W) float64 in [0, 1] on the bit depth's codes, chroma (2, h, w) float32 at model resolution)."""
    rng = np.random.default_rng(seed)
    height = max(8, int(round((megapixels * 1e6 * 2 / 3) ** 0.5)))
    width = max(8, int(round(height * 1.5)))
    gray = np.linspace(0.1, 0.9, width, dtype=np.float32)[None, :].repeat(height, axis=0)
    regions = np.zeros((height, width), dtype=np.uint8)
    rows, cols = np.ogrid[0:height, 0:width]
    for index in range(1, 13):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.05, 0.2) * min(height, width)
        inside = (rows - cy) ** 2 + (cols - cx) ** 2 < radius**2
        regions[inside] = index
        gray[inside] = rng.uniform(0.05, 0.95)
    gray += rng.normal(0.0, 0.02, (height, width)).astype(np.float32)
    levels = 255 if bit_depth == 8 else 65535
    scan = np.round(np.clip(gray, 0.0, 1.0) * levels).astype(np.float64) / levels
    low_h = max(8, int(round(MODEL_SIDE * height / width / 8)) * 8)
    low_w = MODEL_SIDE
    colours = rng.uniform(-70.0, 70.0, (13, 2)).astype(np.float32)
    colours[0] = (8.0, 20.0)  # the background: a warm low chroma
    ys = ((np.arange(low_h) + 0.5) * height / low_h).astype(int)
    xs = ((np.arange(low_w) + 0.5) * width / low_w).astype(int)
    chroma = colours[regions[ys][:, xs]].transpose(2, 0, 1)
    return scan, torch.from_numpy(np.ascontiguousarray(chroma))


def load_merge(spec: str):
    """The merge function named ``module:function``."""
    module, _, function = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # so that tests.reference_merge imports from the repository root
    return getattr(importlib.import_module(module), function)


class _RssSampler:
    """The process's resident set size, sampled every few milliseconds while in use; ``peak`` is the highest seen.

    The RSS high-water mark of ``getrusage`` never resets, so in a process whose inputs were built with larger
    temporaries it says nothing about what came after; sampling the current RSS does."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def current(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self) -> "_RssSampler":
        self.peak = self.current()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def _peak_memory(spec: str, megapixels: float, bit_depth: int, device: str, queue) -> None:
    """In a fresh process: how far the resident set rises above its level before one merge (inputs and
    libraries loaded, temporaries of building the inputs freed), in bytes, sampled while the merge runs."""
    gray, chroma = synthetic_scan(megapixels, bit_depth)
    merge = load_merge(spec)
    small_gray, small_chroma = synthetic_scan(0.05, bit_depth)
    merge(small_gray, small_chroma, bit_depth, **_device_argument(device))  # libraries loaded, pools warm
    gc.collect()
    sampler = _RssSampler()
    before = sampler.current()
    with sampler:
        merged = merge(gray, chroma, bit_depth, **_device_argument(device))
    queue.put(sampler.peak - before)
    del merged


def _device_argument(device: str) -> dict:
    return {} if device == "default" else {"device": device}


def run(megapixels: float, bit_depth: int, repeats: int, merge_spec: str, device: str, memory: bool) -> dict:
    """Times the merge and rgb2lab interleaved; returns every figure."""
    from skimage.color import rgb2lab

    merge = load_merge(merge_spec)
    gray, chroma = synthetic_scan(megapixels, bit_depth)
    merged = merge(gray, chroma, bit_depth, **_device_argument(device))  # warm-up, and the image for rgb2lab
    rgb = merged.rgb
    merge_times, lab_times = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        rgb2lab(rgb)
        lab_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        merged = merge(gray, chroma, bit_depth, **_device_argument(device))
        merge_times.append(time.perf_counter() - started)
    peak = None
    if memory:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        process = context.Process(target=_peak_memory, args=(merge_spec, megapixels, bit_depth, device, queue))
        process.start()
        peak = queue.get()
        process.join()
    return {
        "merge": merge_spec,
        "device": device,
        "size": [int(gray.shape[0]), int(gray.shape[1])],
        "megapixels": gray.size / 1e6,
        "bit_depth": bit_depth,
        "chroma_size": [int(chroma.shape[1]), int(chroma.shape[2])],
        "repeats": repeats,
        "merge_seconds": merge_times,
        "rgb2lab_seconds": lab_times,
        "merge_best_s": min(merge_times),
        "rgb2lab_best_s": min(lab_times),
        "ratio": min(merge_times) / min(lab_times),
        "goal_ratio": 1.5,
        "merge_peak_memory_bytes": peak,
        "output_bytes": int(rgb.nbytes),
        "gamut_clipped_fraction": merged.gamut_clipped_fraction,
        "max_delta_l": merged.max_delta_l,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffcolor.tools.bench_merge", description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=24.0, help="size of the synthetic scan (default 24)")
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved; the best counts")
    parser.add_argument("--merge", default=DEFAULT_MERGE, metavar="MODULE:FUNCTION",
                        help=f"the merge to time (default {DEFAULT_MERGE})")
    parser.add_argument("--device", default="default", help="passed to the merge as device= (default: not passed)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory run in a fresh process")
    parser.add_argument("--json", type=Path, default=Path("bench-merge.json"), help="where to write the figures")
    args = parser.parse_args(argv)
    if args.megapixels <= 0 or args.repeats < 1:
        parser.error(f"--megapixels and --repeats must be positive, got {args.megapixels} and {args.repeats}")

    result = run(args.megapixels, args.bit_depth, args.repeats, args.merge, args.device, not args.no_memory)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    peak = result["merge_peak_memory_bytes"]
    print(f"{result['size'][0]}x{result['size'][1]} ({result['megapixels']:.1f} Mpx), {args.bit_depth}-bit, "
          f"chroma {result['chroma_size'][0]}x{result['chroma_size'][1]}, {result['torch_threads']} torch threads")
    print(f"merge    best {result['merge_best_s']:.2f} s  ({', '.join(f'{t:.2f}' for t in result['merge_seconds'])})")
    print(f"rgb2lab  best {result['rgb2lab_best_s']:.2f} s  ({', '.join(f'{t:.2f}' for t in result['rgb2lab_seconds'])})")
    print(f"ratio    {result['ratio']:.2f}x (goal <= {result['goal_ratio']}x); clipped "
          f"{result['gamut_clipped_fraction']:.1%}; peak memory above inputs "
          f"{'-' if peak is None else f'{peak / 2**20:.0f} MiB'} (output {result['output_bytes'] / 2**20:.0f} MiB)")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
