"""How fast the review pages page through a large collection: ``python -m review.bench [--items 100000]``.

Writes a generated output of records only (one run's results table, no image
or item folder), then times, through the application (FastAPI's TestClient):
the first load of the collection table, and pages of the JSON API and of the
HTML collection page, unfiltered and filtered, at the start and deep into the
collection. Prints one line per measurement (median of the repeats).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time


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


def _median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    from fastapi.testclient import TestClient

    from diffcolor.archive.layout import OutputLayout
    from diffcolor.archive.results import write_results
    from review.app import ReviewConfig, create_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_results(generated_records(args.items), OutputLayout(folder).run("20260101T000000Z-bench0").results,
                      csv=False)
        print(f"generated {args.items} records in {time.perf_counter() - start:.1f} s")
        client = TestClient(create_app(ReviewConfig(output=folder, token="b" * 32)), base_url="http://127.0.0.1")
        start = time.perf_counter()
        assert client.get("/api/items?limit=1").json()["total"] == args.items
        print(f"first load of the collection table: {time.perf_counter() - start:.2f} s (once per server)")
        deep = (args.items // 48 - 1) * 48
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
            print(f"{name}: {_median_ms(lambda: client.get(path), args.repeats):.1f} ms per page "
                  f"(median of {args.repeats})")


if __name__ == "__main__":
    main()
