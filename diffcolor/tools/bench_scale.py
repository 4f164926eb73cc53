"""``python -m diffcolor.tools.bench_scale``: every figure of the large-scan and curator-loop goals, in one run.

The goals (docs/PERFORMANCE.md, "Scans at full resolution and the curator
loop") are ratios measured in one run on one machine, so this tool runs the
four benches one after another, each in its own process, and gathers their
figures against the goals:

- ``merge``: the full-resolution merge of a 24 Mpx 16-bit scan over
  scikit-image's ``rgb2lab`` of the same image (``diffcolor.tools.bench_merge``);
- ``scan``: ``diffcolor recolor`` of a 24 Mpx scan over that of a 512 px
  photograph, and the peak RSS of ``colorize`` and ``recolor`` of a 24 and a
  100 Mpx scan (``diffcolor.tools.bench_scan``);
- ``recolor``: the second recolour of an item from the review API over the
  first (``review.bench_recolor``);
- ``review``: the review application's first page at a million records
  (``review.bench``).

Each bench prints its own lines as it goes; at the end a table of every
figure against its goal, and ``--json`` gets the figures, the goals and each
bench's own JSON::

    python -m diffcolor.tools.bench_scale --json bench-scale.json
    python -m diffcolor.tools.bench_scale --only scan --large 0          # 24 Mpx only
    python -m diffcolor.tools.bench_scale --only review --review-output /var/tmp/review-1m  # reuse the records

It takes a while on a small machine (a million records to generate, two
scans to write, colourise and recolour); ``--only`` runs a part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

PARTS = ("merge", "scan", "recolor", "review")
GIB = 2**30
RATIO_GOAL_MEGAPIXELS = 24.0  # the recolour's time goal is set for scans up to this size (docs/PERFORMANCE.md)


def _commands(args: argparse.Namespace, folder: Path) -> dict[str, list[str]]:
    """The command of each part, writing its JSON to ``folder/PART.json``."""
    python = sys.executable
    sizes = [str(args.megapixels)] + ([] if args.large <= 0 else ["--megapixels", str(args.large)])
    review = [python, "-m", "review.bench", "--items", str(args.items), "--json", str(folder / "review.json")]
    if args.review_output:
        review += ["--output", str(args.review_output)]
    return {
        "merge": [python, "-m", "diffcolor.tools.bench_merge", "--megapixels", str(args.megapixels),
                  "--json", str(folder / "merge.json")],
        "scan": [python, "-m", "diffcolor.tools.bench_scan", "--megapixels", *sizes, "--repeats", str(args.repeats),
                 "--json", str(folder / "scan.json")],
        "recolor": [python, "-m", "review.bench_recolor", "--json", str(folder / "recolor.json")],
        "review": review,
    }


def _figure(name: str, value: float | None, goal: float | None, unit: str, part: str, note: str = "") -> dict:
    """One figure against its goal (every goal here is an upper bound; None: measured for information)."""
    met = None if goal is None else value is not None and value <= goal
    return {"figure": name, "value": value, "goal": goal, "unit": unit, "met": met, "part": part, "note": note}


def figures(results: dict[str, dict]) -> list[dict]:
    """The goals' figures from the parts' JSON (a part not run gives none)."""
    out = []
    if "merge" in results:
        merge = results["merge"]
        out.append(_figure(f"merge of {merge['megapixels']:.0f} Mpx over rgb2lab", merge["ratio"], merge["goal_ratio"],
                           "x", "merge", f"{merge['merge_best_s']:.2f} s vs {merge['rgb2lab_best_s']:.2f} s"))
    if "scan" in results:
        scan = results["scan"]
        photo = scan["photo"]["recolor_best_s"]
        for size in scan["scans"]:
            mpx, goal_gib = size["megapixels"], size["goal_peak_bytes"] / GIB
            # The time goal is the 24 Mpx scan's; a larger scan's ratio is shown, its goal is memory alone.
            ratio_goal = size["goal_ratio"] if mpx <= RATIO_GOAL_MEGAPIXELS else None
            out.append(_figure(f"recolor of {mpx:.0f} Mpx over a 512 px photograph", size["ratio"], ratio_goal,
                               "x", "scan", f"{size['recolor_best_s']:.1f} s vs {photo:.1f} s"))
            out.append(_figure(f"recolor of {mpx:.0f} Mpx, peak RSS", size["recolor_peak_rss_bytes"] / GIB, goal_gib,
                               "GiB", "scan"))
            out.append(_figure(f"colorize of {mpx:.0f} Mpx, peak RSS", size["colorize_peak_rss_bytes"] / GIB, goal_gib,
                               "GiB", "scan", f"{size['colorize_s']:.1f} s"))
    if "recolor" in results:
        recolor = results["recolor"]
        out.append(_figure("second recolour from the review API over the first", recolor["ratio"],
                           recolor["goal_ratio"], "x", "recolor",
                           f"{recolor['second_seconds']:.2f} s vs {recolor['first_seconds']:.2f} s"))
    if "review" in results:
        review = results["review"]
        items = f"{review['items']:,} records"
        out.append(_figure(f"review first page at {items}, restart", review["first_page_s"], 1.0, "s", "review",
                           f"{review['first_page_cpu_s']:.2f} s CPU, peak {review['peak_rss_mib']:.0f} MiB"))
        for key, label in (("first_start_ever", "first start ever"), ("restart_after_new_run", "after a new run")):
            if f"{key}_s" in review:
                out.append(_figure(f"review first page at {items}, {label}", review[f"{key}_s"], 1.0, "s", "review",
                                   f"{review[f'{key}_cpu_s']:.2f} s CPU, peak {review[f'{key}_peak_rss_mib']:.0f} MiB"))
        peak = max(review.get(key, 0.0) for key in review if key.endswith("peak_rss_mib")) / 1024
        out.append(_figure(f"review memory at {items}, peak RSS", peak, 1.0, "GiB", "review"))
    return out


def _value(figure: dict) -> str:
    value = figure["value"]
    return "-" if value is None else f"{value:.3g} {figure['unit']}".replace(" x", "x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffcolor.tools.bench_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run (default {','.join(PARTS)})")
    parser.add_argument("--megapixels", type=float, default=24.0, help="the scan for the ratios (default 24)")
    parser.add_argument("--large", type=float, default=100.0, help="the large scan for peak memory (default 100; 0: none)")
    parser.add_argument("--repeats", type=int, default=2, help="recolours of each image in the scan bench (default 2)")
    parser.add_argument("--items", type=int, default=1_000_000, help="records of the review bench (default 1000000)")
    parser.add_argument("--review-output", type=Path, default=None,
                        help="keep the review bench's generated records there, and reuse them next time")
    parser.add_argument("--json", type=Path, default=Path("bench-scale.json"), help="where to write the figures")
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"--only takes parts among {', '.join(PARTS)}, got {args.only!r}")
    if args.megapixels <= 0 or args.large < 0 or args.repeats < 1 or args.items < 1000:
        parser.error("--megapixels, --repeats must be positive, --large at least 0, --items at least 1000")

    results, failed, seconds = {}, [], {}
    with tempfile.TemporaryDirectory(prefix="diffcolor-bench-scale-") as folder:
        commands = _commands(args, Path(folder))
        for part in (part for part in PARTS if part in parts):  # one at a time: each has the machine to itself
            print(f"== {part}: {' '.join(commands[part][1:])}", flush=True)
            started = time.perf_counter()
            done = subprocess.run(commands[part], env=os.environ.copy())
            seconds[part] = round(time.perf_counter() - started, 1)
            written = Path(folder) / f"{part}.json"
            if done.returncode != 0 or not written.is_file():
                print(f"== {part}: failed (exit status {done.returncode})", file=sys.stderr, flush=True)
                failed.append(part)
                continue
            results[part] = json.loads(written.read_text())

    measured = figures(results)
    report = {"figures": measured, "parts": results, "failed": failed, "part_seconds": seconds,
              "machine": platform.platform(), "cpus": os.cpu_count(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    width = max([len(figure["figure"]) for figure in measured] + [6])
    print(f"\n{'figure':<{width}}  {'value':>10}  {'goal':>9}  met")
    for figure in measured:
        if figure["goal"] is None:
            goal, met = "no goal", "-"
        else:
            goal = f"<= {figure['goal']:g}{'x' if figure['unit'] == 'x' else ' ' + figure['unit']}"
            met = "yes" if figure["met"] else "NO"
        print(f"{figure['figure']:<{width}}  {_value(figure):>10}  {goal:>9}  {met}"
              + (f"  ({figure['note']})" if figure["note"] else ""))
    for part in failed:
        print(f"{part}: the bench failed; no figures")
    print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
