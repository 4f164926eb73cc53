"""The collection table queried in place (DuckDB over the runs' results files): same state, pages only read."""

from __future__ import annotations

import io
import random

import pyarrow.parquet as pq
import pytest

from diffcolor.archive import browse, storage
from diffcolor.archive.browse import CollectionTable, Filters, filter_table, latest_per_item
from diffcolor.archive.layout import OutputLayout, RunLayout
from diffcolor.archive.results import write_results
from diffcolor.common import record as declarations


def _history(seed: int, items: int, runs: int) -> list[list[dict]]:
    """Runs of a mixed history: done versions, later skips and failures, never-done items, decisions, catalogues."""
    rng = random.Random(seed)
    history = []
    for run in range(runs):
        rows = []
        for index in rng.sample(range(items), k=items * 2 // 3):
            item, version = f"item-{index:04d}", rng.randint(1, 3)
            status = rng.choice(["done", "done", "skipped_done", "failed", "not_grayscale"])
            catalogue = rng.choice([None, {}, {"title": f"Photo {index}", "collection": rng.choice(["a", "b", ""]),
                                               "zeta_note": rng.choice(["x", None, ""]),
                                               "accession_number": f"19.{run}"},
                                    {"date": "1921", "creator": "Ann", "flag": rng.choice([True, False])}])
            rows.append({"item_id": item, "version": version, "status": status,
                         "error_class": "ModelError" if status == "failed" else None,
                         "error_message": f"failed in run {run}" if status == "failed" else None,
                         "caption": rng.choice(["a dog on a bench", "A CAT", None]), "smoke_run": rng.random() < 0.2,
                         "clip_score": rng.uniform(15, 35) if status == "done" else None,
                         "colorfulness": rng.uniform(0, 60), "created_at": f"2026-01-0{run + 1}T00:00:00+00:00",
                         **({"catalogue": catalogue} if catalogue is not None else {})})
            if rng.random() < 0.15:  # a review run's row: a decision on a version, not an outcome
                rows.append({"item_id": item, "version": version, "status": "done",
                             "decision": rng.choice(["approved", "rejected"]), "decided_by": f"curator{run}",
                             "decided_at": f"2026-02-0{run + 1}T00:00:00+00:00"})
        history.append(rows)
    return history


def _publish(output: str, history: list[list[dict]]) -> None:
    for run, rows in enumerate(history):
        write_results(rows, OutputLayout(output).run(f"2026010{run + 1}T000000Z-run{run}").results, csv=False)


def _reference(output: str) -> list:
    """The state the former in-memory path (pyarrow, every row loaded) builds from the same runs."""
    runs = [declarations.with_columns(pq.read_table(io.BytesIO(storage.read_bytes(
        RunLayout(run).results)))).select(list(browse._read()))
        for run in storage.list_folders(OutputLayout(output).runs)]
    return latest_per_item(runs)


FILTERS = [Filters(), Filters(status="done"), Filters(status="failed"), Filters(collection="a"),
           Filters(text="photo 1"), Filters(text="CAT"), Filters(text="creator: ann"), Filters(smoke=True),
           Filters(smoke=False), Filters(decision="none"), Filters(decision="approved"),
           Filters(ranges=(("clip_score", 20.0, 30.0),)), Filters(status="done", smoke=False, text="dog")]


@pytest.mark.parametrize("seed", [1, 2])
def test_the_query_gives_the_state_and_pages_of_the_in_memory_path(tmp_path, seed):
    output = str(tmp_path / "out")
    _publish(output, _history(seed, items=120, runs=5))
    expected, table = _reference(output), CollectionTable(output)
    got = table.table()
    assert got.column_names == expected.column_names
    assert got.to_pylist() == expected.to_pylist()
    rows = expected.to_pylist()  # a mixed history: done with a later skip or failure, never done, decided
    assert any(row["status"] == "done" and row["latest_status"] in ("failed", "not_grayscale") for row in rows)
    assert any(row["status"] != "done" for row in rows) and any(row["decision"] for row in rows)
    for filters in FILTERS:
        matching = filter_table(expected, filters)
        total, rows = table.page(filters, offset=3, limit=7)
        assert (total, rows) == (matching.num_rows, matching.slice(3, 7).to_pylist()), filters
    assert table.collections() == ["a", "b"]


def test_a_new_run_is_folded_in_and_a_later_failure_never_hides_the_done_version(tmp_path):
    output = str(tmp_path / "out")
    _publish(output, [[{"item_id": "x", "version": 2, "status": "done", "caption": "a dog", "clip_score": 30.0,
                        "created_at": "2026-01-01T00:00:00+00:00", "catalogue": {"title": "Dog"}}]])
    table = CollectionTable(output)
    assert table.page(Filters())[1][0]["status"] == "done"
    write_results([{"item_id": "x", "version": 3, "status": "failed", "error_message": "out of memory",
                    "created_at": "2026-01-02T00:00:00+00:00"}],
                  OutputLayout(output).run("20260102T000000Z-run1").results, csv=False)
    table.refresh()
    [row] = table.page(Filters())[1]
    assert (row["status"], row["version"], row["clip_score"], row["latest_status"], row["latest_error"],
            row["catalogue_text"]) == ("done", 2, 30.0, "failed", "out of memory", "title: Dog")


def test_a_page_reads_the_files_in_place_and_materialises_only_its_rows(tmp_path, monkeypatch):
    output = str(tmp_path / "out")
    write_results(({"item_id": f"item-{index:05d}", "version": 1, "status": "done", "caption": "a dog",
                    "clip_score": float(index % 30), "created_at": "2026-01-01T00:00:00+00:00",
                    "catalogue": {"title": f"Photo {index}"}} for index in range(20_000)),
                  OutputLayout(output).run("20260101T000000Z-run0").results, csv=False)

    def refused(*args, **kwargs):
        raise AssertionError("the results were loaded whole into Python")

    for name in ("latest_per_item", "filter_table"):
        monkeypatch.setattr(browse, name, refused)
    monkeypatch.setattr(storage, "read_bytes", refused)
    table = CollectionTable(output)
    table.refresh()  # the runs listed and the state built: what a page then reads
    fetched = []
    connection = table._con

    class Counting:  # what leaves the query engine for Python
        def __getattr__(self, name):
            return getattr(connection, name)

        def execute(self, *args):
            result = connection.execute(*args)
            return _Result(result, fetched)

    table._con = Counting()
    total, rows = table.page(Filters(ranges=(("clip_score", 10.0, None),)), offset=5000, limit=50)
    assert total == sum(index % 30 >= 10 for index in range(20_000)) and len(rows) == 50
    assert rows[0]["item_id"] == "item-07510" and rows[0]["catalogue_text"] == "title: Photo 7510"
    assert max(fetched) <= 50 and sum(fetched) <= 101, fetched  # the page's rows, their catalogues, one count


class _Result:
    def __init__(self, result, fetched):
        self._result, self._fetched = result, fetched

    def fetchall(self):
        rows = self._result.fetchall()
        self._fetched.append(len(rows))
        return rows

    def to_arrow_table(self):
        table = browse._arrow(self._result)
        self._fetched.append(table.num_rows)
        return table


def test_the_table_reads_results_on_s3(s3_bucket):
    output = storage.join(s3_bucket, "out")
    _publish(output, _history(3, items=40, runs=3))
    expected = _reference(output)
    table = CollectionTable(output)
    assert table.table().to_pylist() == expected.to_pylist()
    assert table.page(Filters(status="done"), limit=5)[0] == filter_table(expected, Filters(status="done")).num_rows


def test_an_unknown_metric_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        CollectionTable(str(tmp_path)).page(Filters(ranges=(("nope", 1.0, None),)))


def test_an_unreadable_results_file_is_left_out_with_a_warning(tmp_path, caplog):
    output = str(tmp_path / "out")
    _publish(output, [[{"item_id": "x", "version": 1, "status": "done", "created_at": "2026-01-01T00:00:00+00:00"}]])
    storage.write_bytes(OutputLayout(output).run("20260109T000000Z-bad").results, b"not parquet")
    table = CollectionTable(output)
    assert table.page(Filters())[0] == 1
    assert "20260109T000000Z-bad/results.parquet is not a readable results table" in caplog.text
    caplog.clear()
    table.refresh()
    assert table.page(Filters())[0] == 1 and "not a readable" not in caplog.text  # warned once
