"""How fast the review pages page through a large collection: ``python -m review.bench [--items 100000]``.

Writes a generated output of records only (one run's results table and a
later run that fails or skips one item in a hundred; no image or item
folder), then measures, each in a fresh process (the application created,
``/api/items`` page 1 served) with that process's peak resident memory:

- the first start ever (no stored collection state: the page read from the
  runs in place while the state is built in the background);
- a restart (the stored state checked against the runs and opened);
- a restart after a new run was published (the new run's rows for the page's
  items folded over the stored state, the run stored in the background);

each also until its state is stored (time, CPU time and peak memory of the
whole process, build included; the first page must then equal the state's),
and, in a running server, the first page that shows a run published while it
runs. Then it times, through the application (FastAPI's TestClient), pages of
the JSON API and of the HTML collection page, unfiltered and filtered, at the
start and deep into the collection. Prints one line per measurement (median
of the repeats); ``--json PATH`` writes them too. ``--output DIR`` keeps the
generated output there and reuses it when it is already there (a million
records take minutes to generate); its runs are linked into a scratch output
for each bench, so the runs the bench publishes never change it. The
collection states are kept in a temporary cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from diffcolor.archive.layout import OutputLayout


def generated_records(count: int, seed: int = 0):
    """``count`` done records with catalogue fields and metrics, like a collection run writes them."""
    rng = random.Random(seed)
    for index in range(count):
        yield {"item_id": f"item-{index:06d}", "version": 1 + index % 3, "status": "done" if index % 50 else "failed",
               "caption": "a dog sitting on a wooden bench", "seed": index, "preset": "default",
               "clip_score": rng.uniform(15, 35), "colorfulness": rng.uniform(0, 60), "max_delta_l": rng.uniform(0, 2),
               "alignment_confidence": rng.random(), "gamut_clipped_fraction": rng.random() / 10,
               "smoke_run": index % 10 == 0, "created_at": "2026-01-01T00:00:00+00:00",
               "catalogue": {"title": f"Photograph {index}", "accession_number": f"1921.{index}",
                             "collection": f"collection-{index % 7}"}}


def later_records(count: int):
    """A later run: every hundredth item's rerun fails, every hundred-and-first's is skipped as done."""
    for index in range(0, count, 100):
        yield {"item_id": f"item-{index:06d}", "version": 1 + index % 3, "status": "failed",
               "error_class": "ModelError", "error_message": "out of memory", "created_at": "2026-01-02T00:00:00+00:00"}
    for index in range(1, count, 101):
        yield {"item_id": f"item-{index:06d}", "version": 1 + index % 3, "status": "skipped_done",
               "created_at": "2026-01-02T00:00:00+00:00"}


def new_run_records(count: int, run: int):
    """A run published while the server runs: every hundredth item recoloured as a new version, every
    thousandth one's decision."""
    for index in range(50 + run, count, 100):
        yield {"item_id": f"item-{index:06d}", "version": 4 + run, "status": "done", "caption": "a dog on a bench",
               "clip_score": 30.0, "created_at": f"2026-01-0{3 + run}T00:00:00+00:00",
               "catalogue": {"title": f"Photograph {index}", "collection": "recoloured"}}
    for index in range(7, count, 1000):
        yield {"item_id": f"item-{index:06d}", "version": 1 + index % 3, "status": "done", "decision": "approved",
               "decided_by": "curator", "decided_at": f"2026-02-0{1 + run}T00:00:00+00:00"}


def _publish_new_run(folder: str, items: int, run: int) -> None:
    from diffcolor.archive.layout import OutputLayout
    from diffcolor.archive.results import write_results

    write_results(new_run_records(items, run), OutputLayout(folder).run(f"2026010{3 + run}T000000Z-new{run}").results,
                  csv=False)


def _first_page(output: str, expected: int) -> None:
    """In this (fresh) process: the application created and its first page served; prints seconds and peak RSS."""
    start = time.perf_counter()
    from fastapi.testclient import TestClient

    from review.app import ReviewConfig, create_app
    imported, used = time.perf_counter(), _cpu_seconds()
    client = TestClient(create_app(ReviewConfig(output=output, token="b" * 32)), base_url="http://127.0.0.1")
    response = client.get("/api/items?limit=48")
    served, first_used = time.perf_counter(), _cpu_seconds() - used
    assert response.status_code == 200 and response.json()["total"] == expected, response.text[:200]
    first_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the state built or folded in the background meanwhile, stored for the next start: the first page equals its own
    client.app.state.table.refresh()
    stored, used = time.perf_counter(), _cpu_seconds() - used
    again = client.get("/api/items?limit=48").json()
    assert again["items"] == response.json()["items"] and not again["building"], "the first page is not the state's"
    print(json.dumps({"imports_s": imported - start, "first_page_s": served - imported, "first_page_cpu_s": first_used,
                      "building": response.json()["building"], "peak_rss_bytes": first_rss,
                      "stored_s": stored - imported, "stored_cpu_s": used,
                      "stored_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process (DuckDB's included)
    return usage.ru_utime + usage.ru_stime


def _generate(folder: str, items: int) -> None:
    from diffcolor.archive.layout import OutputLayout
    from diffcolor.archive.results import write_results

    later = OutputLayout(folder).run("20260102T000000Z-bench1").results
    if os.path.exists(later):
        print(f"reusing the generated records in {folder}")
        return
    start = time.perf_counter()
    write_results(generated_records(items), OutputLayout(folder).run("20260101T000000Z-bench0").results, csv=False)
    write_results(later_records(items), later, csv=False)
    print(f"generated {items} records in {time.perf_counter() - start:.1f} s")


def _median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="where to generate (or find) the records; default: a temporary folder")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    parser.add_argument("--first-page", help=argparse.SUPPRESS)  # the fresh process that measures the cold start
    args = parser.parse_args(argv)
    if args.first_page:
        return _first_page(args.first_page, args.items)

    with tempfile.TemporaryDirectory() as temporary:
        folder = args.output or os.path.join(temporary, "generated")
        _generate(folder, args.items)
        scratch = os.path.join(temporary, "output")
        generated, linked = OutputLayout(folder), OutputLayout(scratch)
        for run in os.listdir(generated.runs):  # linked, not copied: the generated runs stay as they are
            os.makedirs(linked.run_prefix(run))
            source, target = generated.run(run).results, linked.run(run).results
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        os.environ["DIFFCOLOR_CACHE"] = os.path.join(temporary, "cache")  # this process's and its children's
        measured = _measure(scratch, args.items, args.repeats)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(measured, file, indent=2)


def _measure(folder: str, items: int, repeats: int) -> dict:
    from fastapi.testclient import TestClient

    from diffcolor.archive import browse

    from review.app import ReviewConfig, create_app

    def cold_start() -> dict:
        return json.loads(subprocess.run([sys.executable, "-m", "review.bench", "--first-page", folder, "--items",
                                          str(items)], check=True, capture_output=True, text=True).stdout)

    first, cold = cold_start(), cold_start()
    _publish_new_run(folder, items, 0)
    after_run = cold_start()
    measured = {"items": items, "first_page_s": round(cold["first_page_s"], 3),
                "first_page_cpu_s": round(cold["first_page_cpu_s"], 3), "cpus": os.cpu_count(),
                "imports_s": round(cold["imports_s"], 3), "peak_rss_mib": round(cold["peak_rss_bytes"] / 2**20, 1),
                "first_start_ever_s": round(first["first_page_s"], 3),
                "first_start_ever_cpu_s": round(first["first_page_cpu_s"], 3),
                "first_start_ever_peak_rss_mib": round(first["peak_rss_bytes"] / 2**20, 1),
                "restart_after_new_run_s": round(after_run["first_page_s"], 3),
                "restart_after_new_run_cpu_s": round(after_run["first_page_cpu_s"], 3),
                "restart_after_new_run_peak_rss_mib": round(after_run["peak_rss_bytes"] / 2**20, 1),
                "pages_ms": {}}
    for key, run in (("first_start_ever", first), ("restart", cold), ("restart_after_new_run", after_run)):
        measured[f"{key}_building"] = run["building"]
        measured[f"{key}_stored_s"] = round(run["stored_s"], 3)
        measured[f"{key}_stored_cpu_s"] = round(run["stored_cpu_s"], 3)
        measured[f"{key}_stored_peak_rss_mib"] = round(run["stored_peak_rss_bytes"] / 2**20, 1)
    for name, run in (("first start ever (state built from every run in the background)", first),
                      ("restart (stored state checked and opened)", cold),
                      ("restart after a new run (the page's items folded over the stored state, the run stored in "
                       "the background)", after_run)):
        print(f"first page, {name}: {run['first_page_s']:.2f} s ({run['first_page_cpu_s']:.2f} s of CPU on "
              f"{os.cpu_count()} CPUs){' read from the runs in place' if run['building'] else ''}, after "
              f"{run['imports_s']:.2f} s of imports; peak RSS {run['peak_rss_bytes'] / 2**20:.0f} MiB; state stored "
              f"after {run['stored_s']:.2f} s ({run['stored_cpu_s']:.2f} s of CPU), peak RSS "
              f"{run['stored_peak_rss_bytes'] / 2**20:.0f} MiB")
    client = TestClient(create_app(ReviewConfig(output=folder, token="b" * 32)), base_url="http://127.0.0.1")
    assert client.get("/api/items?limit=1").json()["total"] == items
    # a run published while the server runs: the first page that shows it (the runs listed at once, not after the
    # usual pause between listings)
    _publish_new_run(folder, items, 1)
    browse.REFRESH_SECONDS, pause = 0.0, browse.REFRESH_SECONDS
    start = time.perf_counter()
    page = client.get("/api/items?limit=48&collection=recoloured")
    measured["page_after_new_run_s"] = round(time.perf_counter() - start, 3)
    browse.REFRESH_SECONDS = pause
    assert page.json()["total"] > 0, page.text[:200]
    print(f"first page showing a run published while the server runs: {measured['page_after_new_run_s']:.2f} s")
    client.app.state.table.refresh()  # the pages below from the stored state, not while it is folded in
    deep = (items // 48 - 1) * 48
    cases = {
        "API page 1": "/api/items?limit=48",
        f"API page at offset {deep}": f"/api/items?limit=48&offset={deep}",
        "API filtered (status, collection, text, clip range, smoke)":
            "/api/items?status=done&collection=collection-3&q=1921.4&min_clip_score=20&smoke=false",
        "API filtered by decision": "/api/items?decision=none&offset=4800",
        "HTML collection page 1": "/",
        f"HTML collection page {deep // 48 + 1}": f"/?page={deep // 48 + 1}",
        "HTML filtered page": "/?q=Photograph%2099&min_colorfulness=10&max_colorfulness=40",
    }
    for name, path in cases.items():
        assert client.get(path).status_code == 200, path
        measured["pages_ms"][name] = round(_median_ms(lambda: client.get(path), repeats), 1)
        print(f"{name}: {measured['pages_ms'][name]:.1f} ms per page (median of {repeats})")
    return measured


if __name__ == "__main__":
    main()
