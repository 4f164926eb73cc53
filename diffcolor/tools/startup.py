"""How long the command line takes to start: ``diffcolor --help`` and validating a 10,000-row manifest.

    python -m diffcolor.tools.startup                      # this checkout
    python -m diffcolor.tools.startup --compare-with OLD   # and another checkout, in the same run

Each command runs in a fresh Python process (the interpreter running this
script, so both checkouts see the same installed packages), ``--repeats``
times; the median wall time is printed. A checkout's command is found in its
``pyproject.toml`` (``[project.scripts] diffcolor = "module:function"``) and
its packages are put first on ``PYTHONPATH``, so an older layout runs as it
was. The manifest is written to a temporary folder with the current code.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROWS = 10_000
HERE = Path(__file__).resolve().parents[2]


def write_manifest(path: Path, rows: int = ROWS) -> Path:
    """A valid manifest of ``rows`` items with captions, colour maps, seeds and a catalogue field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "item_id": [f"item-{i:06d}" for i in range(rows)],
        "image_uri": [f"scans/{i:06d}.tif" for i in range(rows)],
        "caption": ["A dog sitting on a wooden bench, with grassland and sky"] * rows,
        "color_map": pa.array([[("dog", "brown"), ("bench", "black")]] * rows, type=pa.map_(pa.string(), pa.string())),
        "seed": pa.array(range(rows), type=pa.int64()),
        "accession_number": [f"1987.{i}" for i in range(rows)],
    }), path)
    return path


def entry_point(checkout: Path) -> str:
    """The ``module:function`` of a checkout's ``diffcolor`` console script."""
    project = tomllib.loads((checkout / "pyproject.toml").read_text(encoding="utf-8"))
    return project["project"]["scripts"]["diffcolor"]


def time_command(checkout: Path, arguments: list[str], repeats: int) -> float:
    """Median seconds of ``diffcolor ARGUMENTS`` run from ``checkout`` in a fresh process."""
    module, function = entry_point(checkout).split(":")
    code = f"import sys; sys.argv[0] = 'diffcolor'; from {module} import {function} as main; sys.exit(main())"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")]))
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, *arguments], cwd=checkout, env=environment,
                              capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"{checkout}: diffcolor {' '.join(arguments)} exited {done.returncode}: {done.stderr[-500:]}")
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffcolor.tools.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--compare-with", type=Path, metavar="CHECKOUT", help="another checkout to time in the same run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (median reported; default 5)")
    args = parser.parse_args(argv)

    checkouts = {"this checkout": HERE}
    if args.compare_with:
        checkouts = {str(args.compare_with): args.compare_with.resolve(), **checkouts}
    with tempfile.TemporaryDirectory(prefix="diffcolor-startup-") as folder:
        manifest = str(write_manifest(Path(folder) / "manifest.parquet"))
        commands = {"diffcolor --help": ["--help"], f"manifest validate ({ROWS:,} rows)": ["manifest", "validate", manifest]}
        print(f"median of {args.repeats} runs, seconds")
        for label, checkout in checkouts.items():
            figures = ", ".join(f"{name}: {time_command(checkout, command, args.repeats):.2f}"
                                for name, command in commands.items())
            print(f"{label}: {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
