"""Orchestration benchmarks (docs/DESIGN.md §5; issue targets in brackets). Prints its figures.

``python -m flows.bench plan --rows 1000000``
    Plans a manifest whose items are all done: validation, streaming read,
    plan keys and the done-index lookup, in a fresh process, reporting seconds
    and the process's peak resident memory [at most 60 s and 2 GiB on 2 cores].

``python -m flows.bench overhead --items 6``
    Colourises the same items at the smoke preset twice in one run: by calling
    the engine directly, and through the collection flow on the local pool; the
    difference per item is the flow's overhead [at most 20 %]. The pool's start
    (one model load per worker, once per run) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _write_manifest(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"item-{i:07d}" for i in range(rows)]
    table = pa.table({
        "item_id": ids,
        "image_uri": [f"s3://collection/scans/{i}.tif" for i in ids],
        "caption": ["a dog sitting on a wooden bench, with grassland and sky"] * rows,
        "seed": pa.array(range(rows), pa.int64()),
        "accession_number": [f"1987.{i}" for i in range(rows)],
    })
    pq.write_table(table, path, row_group_size=100_000)


def _plan_in_this_process(manifest: str, output: str) -> dict:
    """The planning the collection flow does, timed (runs in a fresh process)."""
    from diffcolor.archive.manifest import read_items
    from diffcolor.archive.planning import plan_items, read_done_index
    from diffcolor.common.keys import config_hash
    from diffcolor.method.presets import get_preset

    started = time.perf_counter()
    done = read_done_index(output)
    loaded = time.perf_counter()
    planned = plan_items(read_items(manifest), done, config_hash=config_hash(get_preset("default").to_dict()),
                         model_hash="0" * 64)
    skipped = pending = 0
    for item in planned:
        if item.skip:
            skipped += 1
        else:
            pending += 1
    finished = time.perf_counter()
    return {"seconds_total": finished - started, "seconds_index": loaded - started, "skipped": skipped,
            "pending": pending, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def bench_plan(rows: int) -> dict:
    from diffcolor.archive.manifest import read_items
    from diffcolor.archive.planning import update_done_index
    from diffcolor.common.keys import config_hash, plan_key
    from diffcolor.method.presets import get_preset

    with tempfile.TemporaryDirectory() as folder:
        manifest, output = Path(folder) / "manifest.parquet", str(Path(folder) / "out")
        # 1. A manifest and a done-index that lists every row as done (not timed).
        _write_manifest(manifest, rows)
        key = config_hash(get_preset("default").to_dict())
        update_done_index(output, ((r.item_id, plan_key(r, key, "0" * 64), "done", 1)
                                   for r in read_items(str(manifest), check=False)))
        # 2. Plan it in a fresh process, so its peak memory is the planning's own.
        code = f"import json; from flows.bench import _plan_in_this_process as p; print(json.dumps(p({str(manifest)!r}, {output!r})))"
        completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["rows"] = rows
    return result


def bench_overhead(items: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffcolor.archive.manifest import read_items
    from diffcolor.method.presets import get_preset
    from diffcolor.pipeline import colorize_item
    from diffcolor.method.model_names import load_named_models
    from flows.collection import RunOptions, colorize_collection

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        rng = np.random.default_rng(0)
        rows = []
        for index in range(items):
            ramp = np.linspace(0.1, 0.9, 96)[None, :] * np.ones((72, 1)) + rng.normal(0, 0.02, (72, 96))
            Image.fromarray(np.round(np.clip(ramp, 0, 1) * 255).astype(np.uint8)).save(root / f"p{index}.png")
            rows.append({"item_id": f"p{index}", "image_uri": f"p{index}.png", "caption": "a dog on a wooden bench",
                         "seed": index})
        pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
        manifest = str(root / "manifest.parquet")

        # 1. The engine called directly, models loaded once.
        models = load_named_models("tiny")
        config = get_preset("smoke")
        requests = list(read_items(manifest))
        colorize_item(models, requests[0], str(root / "warmup"), config)  # first-call costs, as a worker pays once
        started = time.perf_counter()
        for request in requests:
            colorize_item(models, request, str(root / "direct" / request.item_id), config)
        direct = time.perf_counter() - started

        # 2. The same items through the flow on the local pool (one CPU worker process).
        started = time.perf_counter()
        state = colorize_collection(manifest, str(root / "flow"), "tiny", RunOptions(preset="smoke", device="cpu"),
                                    return_state=True)
        flow_total = time.perf_counter() - started
        if not state.is_completed():
            raise RuntimeError(f"the flow run failed: {state.message}")
        seconds = state.result()["seconds"]
    return {"items": items, "direct_seconds": direct, "flow_seconds": flow_total, "flow_items_seconds": seconds["items"],
            "flow_pool_start_seconds": seconds["pool_start"], "flow_finish_seconds": seconds["finish"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan")
    plan.add_argument("--rows", type=int, default=1_000_000)
    overhead = commands.add_parser("overhead")
    overhead.add_argument("--items", type=int, default=6)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    if args.command == "plan":
        result = bench_plan(args.rows)
        print(f"plan {result['rows']:,} rows, all done: {result['seconds_total']:.1f} s "
              f"(index load {result['seconds_index']:.1f} s), peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"skipped {result['skipped']:,}, pending {result['pending']:,}   [target: <= 60 s, <= 2 GiB]")
    else:
        result = bench_overhead(args.items)
        per_direct = result["direct_seconds"] / result["items"]
        per_flow = result["flow_items_seconds"] / result["items"]
        result["overhead_fraction"] = per_flow / per_direct - 1
        print(f"{result['items']} items at the smoke preset: direct {per_direct:.2f} s/item, through the flow "
              f"{per_flow:.2f} s/item: per-item overhead {100 * result['overhead_fraction']:.0f} %   [target: <= 20 %]")
        print(f"fixed per run: pool start {result['flow_pool_start_seconds']:.1f} s (worker spawn and one model load), "
              f"results, index and report {result['flow_finish_seconds']:.1f} s; whole flow call "
              f"{result['flow_seconds']:.1f} s (Prefect's temporary server included)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
