"""``python -m diffcolor.tools.bench_plan``: seconds of a no-op plan over a large collection on local disk.

Builds, in a scratch folder, what the plan of a nightly rerun reads: a manifest
of ``--rows`` rows, a done-index listing every row as done (with the plan keys
a run computes), and every item's folder with the objects the plan lists
(``result.json``, ``versions/v0001.json``, ``versions/v0001/master.tif`` and
``access.jpg``; empty files hard-linked to a few inodes, since the plan never
opens them). Then times the plan as the collection flow runs it: validate and
stream the manifest, read the done-index, find done items missing from the
archive (:func:`diffcolor.archive.planning.missing_done_items`, by listing),
and mark every row skip or do. A no-op plan must skip every row.

Examples::

    python -m diffcolor.tools.bench_plan --rows 100000
    python -m diffcolor.tools.bench_plan --rows 1000000 --dir /scratch/bench   # about 3 inodes and 12 KB per row
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from diffcolor.archive.layout import OutputLayout
from diffcolor.archive.manifest import read_items
from diffcolor.archive.planning import (
    missing_done_items,
    plan_items,
    read_done_index,
    update_done_index,
)
from diffcolor.common.keys import config_hash, plan_key
from diffcolor.method.presets import get_preset

MODEL_HASH = "bench-model"


def build(folder: str, rows: int) -> tuple[str, str]:
    """The manifest, done-index and item folders of ``rows`` done items under ``folder``; returns (manifest, output)."""
    manifest, output = os.path.join(folder, "manifest.parquet"), os.path.join(folder, "out")
    ids = [f"item-{n:07d}" for n in range(rows)]
    table = pa.table({"item_id": ids, "image_uri": [f"s3://museum/scans/{item}.tif" for item in ids],
                      "caption": ["a dog sitting on a wooden bench"] * rows, "seed": list(range(rows))})
    pq.write_table(table, manifest)
    config = config_hash(get_preset("default").to_dict())
    update_done_index(output, ((request.item_id, plan_key(request, config, MODEL_HASH), "done", 1)
                               for request in read_items(manifest, check=False)), run_id="bench")
    for number, item in enumerate(ids):
        if number % 15_000 == 0:  # a file system limits the links to one inode (ext4: 65,000)
            blank = os.path.join(folder, f"blank-{number}")
            open(blank, "wb").close()
        layout = OutputLayout(output).item(item)
        os.makedirs(layout.version(1))
        for path in (layout.result, layout.record(1), layout.master(1), layout.access(1, "jpg")):
            os.link(blank, path)
    return manifest, output


def plan(manifest: str, output: str) -> dict:
    """Times the collection flow's plan; returns seconds per phase and the counts."""
    config = config_hash(get_preset("default").to_dict())
    times, cpu = {}, {}
    started, cpu_started = time.perf_counter(), time.process_time()
    requests = read_items(manifest)  # validates the whole manifest first, as the flow does
    times["validate_manifest"], cpu["validate_manifest"] = time.perf_counter() - started, time.process_time() - cpu_started
    mark, cpu_mark = time.perf_counter(), time.process_time()
    done = read_done_index(output)
    times["read_done_index"], cpu["read_done_index"] = time.perf_counter() - mark, time.process_time() - cpu_mark
    mark, cpu_mark = time.perf_counter(), time.process_time()
    missing = missing_done_items(output, done)
    times["list_archive"], cpu["list_archive"] = time.perf_counter() - mark, time.process_time() - cpu_mark
    mark, cpu_mark = time.perf_counter(), time.process_time()
    skipped = todo = 0
    for item in plan_items(requests, done, config_hash=config, model_hash=MODEL_HASH, missing=missing):
        skipped += item.skip
        todo += not item.skip
    times["stream_and_mark"], cpu["stream_and_mark"] = time.perf_counter() - mark, time.process_time() - cpu_mark
    times["total"], cpu["total"] = time.perf_counter() - started, time.process_time() - cpu_started
    # Wall seconds depend on what else the machine runs; the process's CPU seconds (user + system) less so.
    return {"seconds": {name: round(value, 2) for name, value in times.items()},
            "cpu_seconds": {name: round(value, 2) for name, value in cpu.items()},
            "load_average": round(os.getloadavg()[0], 1), "skipped": skipped, "to_do": todo, "missing": len(missing)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffcolor.tools.bench_plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="manifest rows, all done (default %(default)s)")
    parser.add_argument("--dir", help="scratch folder (default: a new temporary folder, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    folder = args.dir or tempfile.mkdtemp(prefix="diffcolor-bench-plan-")
    os.makedirs(folder, exist_ok=True)
    try:
        started = time.perf_counter()
        manifest, output = build(folder, args.rows)
        built = time.perf_counter() - started
        result = plan(manifest, output)
        result.update(rows=args.rows, build_seconds=round(built, 1), cpus=os.cpu_count())
        print(json.dumps(result, indent=2))
        print(f"no-op plan of {args.rows} rows: {result['seconds']['total']:.1f} s "
              f"({result['skipped']} skipped, {result['to_do']} to do; listing the archive "
              f"{result['seconds']['list_archive']:.1f} s)", file=sys.stderr)
        if args.json:
            with open(args.json, "w") as stream:
                json.dump(result, stream, indent=2)
        return 0 if result["to_do"] == 0 else 1
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
