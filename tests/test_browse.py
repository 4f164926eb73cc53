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


def _runs_of(output: str) -> list[str]:
    return [uri.rstrip("/").rsplit("/", 1)[-1] for uri in storage.list_folders(OutputLayout(output).runs)]


def _reference_of(output: str, runs: list[str]) -> list:
    """The in-memory path's state from the first ``runs`` of ``output`` only."""
    return latest_per_item([declarations.with_columns(pq.read_table(io.BytesIO(storage.read_bytes(
        OutputLayout(output).run(run).results)))).select(list(browse._read())) for run in runs])


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_runs_folded_in_one_at_a_time_give_the_state_of_a_full_rebuild(tmp_path, seed, monkeypatch):
    output, history = str(tmp_path / "out"), _history(seed, items=60, runs=5)
    history.insert(1, [{"item_id": "item-9999", "version": 1, "status": "done", "decision": "approved",
                        "decided_by": "ann", "decided_at": "2026-02-01T00:00:00+00:00"}])  # decided, never attempted
    history.append([{"item_id": "item-9999", "version": 1, "status": "failed", "error_message": "late",
                     "created_at": "2026-01-09T00:00:00+00:00"}])
    folded = []
    store = CollectionTable._store
    monkeypatch.setattr(CollectionTable, "_store", lambda self, files, base: (
        folded.append((len(files), base is not None)), store(self, files, base))[1])
    table = CollectionTable(output, state_folder=str(tmp_path / "state"))
    for run, rows in enumerate(history):
        write_results(rows, OutputLayout(output).run(f"2026010{run + 1}T000000Z-run{run}").results, csv=False)
        table.refresh()
        expected = _reference_of(output, _runs_of(output))
        assert table.table().to_pylist() == expected.to_pylist(), run
        total, rows = table.page(Filters(status="done"), offset=2, limit=9)
        assert (total, rows) == (filter_table(expected, Filters(status="done")).num_rows,
                                 filter_table(expected, Filters(status="done")).slice(2, 9).to_pylist())
    assert folded == [(1, False)] + [(1, True)] * (len(history) - 1)  # each run folded into the stored state
    rebuilt = CollectionTable(output, state_folder=str(tmp_path / "rebuilt")).table()
    assert table.table().to_pylist() == rebuilt.to_pylist()
    assert any(row["item_id"] == "item-9999" and row["status"] == "failed" for row in rebuilt.to_pylist())
    assert len(folded) == len(history) + 1


def test_a_restart_opens_the_stored_state_and_folds_in_only_the_runs_published_since(tmp_path, monkeypatch):
    output, state = str(tmp_path / "out"), str(tmp_path / "state")
    history = _history(6, items=50, runs=4)
    _publish(output, history[:3])
    first = CollectionTable(output, state_folder=state)
    first.refresh()
    read = []
    fold = CollectionTable._fold
    monkeypatch.setattr(CollectionTable, "_fold", lambda self, files, base: (
        read.append(([run for run, _, _ in files], base)), fold(self, files, base))[1])
    again = CollectionTable(output, state_folder=state)
    assert again.table().to_pylist() == _reference(output).to_pylist() and read == []  # nothing read again
    write_results(history[3], OutputLayout(output).run("20260104T000000Z-run3").results, csv=False)
    restarted = CollectionTable(output, state_folder=state)
    assert restarted.table().to_pylist() == _reference(output).to_pylist()
    assert read == [(["20260104T000000Z-run3"], 3)]


def _damage(path: str) -> None:
    with open(path, "r+b") as file:
        file.seek(0)
        file.write(b"\0" * 4096 + b"not a database")


def _with_a_view(path: str) -> None:
    import duckdb

    connection = duckdb.connect(path)
    connection.execute("DROP TABLE items")
    connection.execute("CREATE VIEW items AS SELECT * FROM read_text('/etc/hostname')")
    connection.close()


def _other_format(path: str) -> None:
    import duckdb

    connection = duckdb.connect(path)
    connection.execute("UPDATE meta SET value = '0' WHERE key = 'format'")
    connection.close()


def _other_columns(path: str) -> None:
    import duckdb

    connection = duckdb.connect(path)
    connection.execute("ALTER TABLE items ADD COLUMN extra VARCHAR DEFAULT 'x'")
    connection.close()


def _runs_dropped(path: str) -> None:
    import duckdb

    connection = duckdb.connect(path)
    connection.execute("DELETE FROM items WHERE item_id < 'item-0020'")  # and the runs say nothing of it
    connection.execute("UPDATE runs SET fingerprint = 'forged' WHERE seq = 0")
    connection.close()


@pytest.mark.parametrize("tamper", [_damage, _with_a_view, _other_format, _other_columns, _runs_dropped])
def test_a_damaged_or_foreign_stored_state_is_rebuilt_from_the_runs(tmp_path, tamper, caplog):
    output, state = str(tmp_path / "out"), str(tmp_path / "state")
    _publish(output, _history(7, items=40, runs=3))
    expected = _reference(output).to_pylist()
    stored = CollectionTable(output, state_folder=state)
    stored.refresh()
    stored.close()
    tamper(stored.state_path)
    caplog.set_level("INFO")
    table = CollectionTable(output, state_folder=state)
    assert table.table().to_pylist() == expected
    assert "is not used" in caplog.text or tamper is _runs_dropped
    assert CollectionTable(output, state_folder=state).table().to_pylist() == expected  # and stored again, whole


def test_a_results_file_replaced_since_the_state_was_stored_rebuilds_it(tmp_path):
    output, state = str(tmp_path / "out"), str(tmp_path / "state")
    _publish(output, _history(8, items=30, runs=2))
    CollectionTable(output, state_folder=state).refresh()
    write_results([{"item_id": "replaced", "version": 1, "status": "done", "created_at": "2026-01-01T00:00:00+00:00"}],
                  OutputLayout(output).run("20260101T000000Z-run0").results, csv=False)
    assert CollectionTable(output, state_folder=state).table().to_pylist() == _reference(output).to_pylist()


def test_a_state_folder_others_may_write_is_not_used(tmp_path, caplog):
    import os

    output, shared = str(tmp_path / "out"), tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    _publish(output, _history(9, items=10, runs=1))
    table = CollectionTable(output, state_folder=str(shared))
    assert table.table().num_rows and not table.state_path.startswith(str(shared))
    assert "only they can write" in caplog.text


_READER = """
import json, sys, time
from diffcolor.archive.browse import CollectionTable, Filters
import diffcolor.archive.browse as browse
browse.REFRESH_SECONDS = 0.0
table = CollectionTable(sys.argv[1], state_folder=sys.argv[2])
seen, deadline = [], time.monotonic() + 60
while time.monotonic() < deadline:
    page = table.page(Filters(), offset=1, limit=15)
    total, rows = page
    seen.append([page.runs, total, rows])  # the runs the page shows: stored, folded in memory or read in place
    if len(page.runs) == int(sys.argv[3]):
        break
print(json.dumps(seen))
"""


@pytest.mark.parametrize("stored", [True, False], ids=["restarts", "first-starts"])
def test_readers_in_other_processes_see_whole_states_while_runs_are_published(tmp_path, stored, caplog):
    import json
    import os
    import subprocess
    import sys
    import time

    output, state = str(tmp_path / "out"), str(tmp_path / "state")
    history = _history(10, items=80, runs=5)
    _publish(output, history[:1])
    if stored:  # else the readers start together without a state: each reads the runs and builds one meanwhile
        CollectionTable(output, state_folder=state).refresh()
    readers = [subprocess.Popen([sys.executable, "-c", _READER, output, state, str(len(history))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}) for _ in range(3)]
    for run in range(1, len(history)):
        time.sleep(0.3)
        write_results(history[run], OutputLayout(output).run(f"2026010{run + 1}T000000Z-run{run}").results,
                      csv=False)
    expected = {}
    for reader in readers:
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err[-2000:]
        seen = json.loads(out)
        assert seen[-1][0] == _runs_of(output)  # every run folded in at last
        for covered, total, rows in seen:
            key = tuple(covered)
            if key not in expected:
                assert list(key) == _runs_of(output)[:len(key)]
                state_rows = _reference_of(output, list(key))
                expected[key] = (state_rows.num_rows, json.loads(json.dumps(state_rows.slice(1, 15).to_pylist())))
            assert (total, rows) == expected[key], key
    caplog.set_level("INFO")  # whatever state the readers stored (some stopped mid-build) is whole
    assert CollectionTable(output, state_folder=state).table().to_pylist() == _reference(output).to_pylist()
    assert "is not used" not in caplog.text


def test_an_output_without_runs_is_an_empty_collection(tmp_path):
    table = CollectionTable(str(tmp_path / "out"), state_folder=str(tmp_path / "state"))
    assert table.page(Filters()) == (0, []) and table.collections() == [] and table.table().num_rows == 0


def test_a_state_built_in_parts_equals_one_built_whole(tmp_path, monkeypatch):
    output = str(tmp_path / "out")
    _publish(output, _history(11, items=90, runs=3))
    whole = CollectionTable(output, state_folder=str(tmp_path / "whole")).table().to_pylist()
    monkeypatch.setattr(browse, "PART_ITEMS", 13)  # item id ranges of 13 items, folded one after the other
    in_parts = CollectionTable(output, state_folder=str(tmp_path / "parts"))
    assert in_parts.table().to_pylist() == whole == _reference(output).to_pylist()
    write_results(_history(12, items=90, runs=1)[0], OutputLayout(output).run("20260109T000000Z-late").results,
                  csv=False)
    in_parts.refresh()  # a run folded into the stored state, in parts too
    assert in_parts.table().to_pylist() == _reference(output).to_pylist()


@pytest.fixture
def held(monkeypatch):
    """Once ``release`` is cleared, background builds and folds wait for it (set again at teardown at the latest)
    before they store; ``begun`` lists those held as they start."""
    import threading

    release, begun = threading.Event(), []
    store = CollectionTable._store

    def holding(self, files, base):
        if not release.is_set():
            begun.append(([run for run, _, _ in files], base is not None))
        assert release.wait(60), "never released"
        return store(self, files, base)

    monkeypatch.setattr(CollectionTable, "_store", holding)
    release.set()
    yield release, begun
    release.set()


def _soon(condition, seconds: float = 20.0):
    import time

    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("seed", [13, 14])
def test_unfiltered_pages_while_the_state_is_built_are_the_built_states_pages(tmp_path, monkeypatch, held, seed):
    output = str(tmp_path / "out")
    history = _history(seed, items=150, runs=5)  # items with up to five attempts and decisions each
    history[2].append({"item_id": "item-0000'); --", "version": 1, "status": "done", "created_at": "2026-01-03"})
    _publish(output, history)
    expected = _reference(output)
    release, begun = held
    release.clear()
    monkeypatch.setattr(browse, "IN_PLACE_TOP", 60)  # deeper pages group the ids instead of a top-N of rows
    table = CollectionTable(output, state_folder=str(tmp_path / "state"))
    in_place = {(offset, limit): table.page(Filters(), offset=offset, limit=limit)
                for offset, limit in [(0, 7), (0, 48), (5, 13), (57, 9), (90, 30), (expected.num_rows - 2, 10),
                                      (expected.num_rows + 5, 10)]}
    assert _soon(lambda: begun) and begun == [(_runs_of(output), False)] and table.building  # in the background
    for (offset, limit), page in in_place.items():
        assert page.building and page.runs == _runs_of(output)
        assert (page[0], page[1]) == (expected.num_rows, expected.slice(offset, limit).to_pylist()), (offset, limit)
    with pytest.raises(browse.StillIndexing) as waited:  # a filtered page needs the state: it says so
        table.page(Filters(status="done"), wait=0.2)
    assert waited.value.error is None
    release.set()
    assert table.page(Filters(status="done"), offset=2, limit=5) == (
        filter_table(expected, Filters(status="done")).num_rows,
        filter_table(expected, Filters(status="done")).slice(2, 5).to_pylist())  # waited for the state
    table.refresh()
    assert not table.building and table.build_error is None
    for (offset, limit), page in in_place.items():
        built = table.page(Filters(), offset=offset, limit=limit)
        assert not built.building and (built[0], built[1]) == (page[0], page[1])


def test_pages_while_the_state_is_built_read_the_results_on_s3(s3_bucket, held, caplog):
    output = storage.join(s3_bucket, "out")
    _publish(output, _history(17, items=40, runs=3))
    expected = _reference(output)
    release, _ = held
    release.clear()
    table = CollectionTable(output)
    page = table.page(Filters(), offset=3, limit=8)
    assert page.building and (page[0], page[1]) == (expected.num_rows, expected.slice(3, 8).to_pylist())
    release.set()
    table.refresh()
    assert table.page(Filters(), offset=3, limit=8) == page
    write_results(_history(18, items=40, runs=1)[0], OutputLayout(output).run("20260109T000000Z-late").results,
                  csv=False)
    expected = _reference(output)
    release.clear()
    caplog.set_level("INFO")
    page = CollectionTable(output).page(Filters(), offset=3, limit=8)  # a restart: over the stored state
    assert not page.building and (page[0], page[1]) == (expected.num_rows, expected.slice(3, 8).to_pylist())
    assert "read from the runs instead" not in caplog.text


@pytest.mark.parametrize("seed", [15, 18])
def test_a_new_runs_items_show_their_new_state_at_a_restart_before_the_fold_ends(tmp_path, monkeypatch, held, seed):
    output, state = str(tmp_path / "out"), str(tmp_path / "state")
    history = _history(seed, items=40, runs=4)
    decided = {"version": 1, "status": "done", "decision": "approved", "decided_by": "ann",
               "decided_at": "2026-02-01T00:00:00+00:00"}
    history[2].append({"item_id": "item-0002a", **decided})  # decided, never attempted: not shown
    _publish(output, history[:3])
    CollectionTable(output, state_folder=state).refresh()
    before = _reference(output)
    history[3] += [{"item_id": "item-0000", "version": 9, "status": "done", "caption": "recoloured",
                    "created_at": "2026-01-05T00:00:00+00:00", "catalogue": {"collection": "new"}},
                   {"item_id": "item-0001", "version": 1, "status": "failed", "error_message": "late failure",
                    "created_at": "2026-01-05T00:00:00+00:00"},
                   {"item_id": "item-0002a", "version": 1, "status": "done", "created_at": "2026-01-05"},  # now shown
                   {"item_id": "item-0000b", "version": 1, "status": "failed", "created_at": "2026-01-05"},  # new
                   {"item_id": "zz-last", "version": 1, "status": "done", "created_at": "2026-01-05"},
                   {"item_id": "item-0003z", **decided}]  # a decision alone: not shown
    write_results(history[3], OutputLayout(output).run("20260104T000000Z-run3").results, csv=False)
    expected = _reference(output)
    assert expected.slice(0, 9).to_pylist() != before.slice(0, 9).to_pylist()
    release, begun = held
    release.clear()
    in_place = CollectionTable._in_place
    monkeypatch.setattr(CollectionTable, "_in_place", None)  # not read from every run: over the stored state
    restarted = CollectionTable(output, state_folder=state)
    page = restarted.page(Filters(), limit=9)
    assert _soon(lambda: begun) and begun == [(["20260104T000000Z-run3"], True)]  # folded in the background
    assert restarted.building
    assert not page.building and (page[0], page[1]) == (expected.num_rows, expected.slice(0, 9).to_pylist())
    shown = {row["item_id"]: row for row in page[1]}
    assert shown["item-0000"]["version"] == 9 and "item-0000b" in shown and "item-0002a" in shown
    assert "late failure" in (shown["item-0001"]["latest_error"], shown["item-0001"]["error_message"])
    for offset, limit in [(1, 5), (3, 30), (expected.num_rows - 3, 10), (expected.num_rows + 2, 5)]:
        page = restarted.page(Filters(), offset=offset, limit=limit)  # the stored state and the new run's rows
        assert not page.building and (page[0], page[1]) == (expected.num_rows,
                                                            expected.slice(offset, limit).to_pylist())
    assert restarted._overlay == []  # those pages did not fold the new run for every item it names
    monkeypatch.setattr(CollectionTable, "_in_place", in_place)
    for filters in FILTERS + [Filters(collection="new")]:  # every filter answered at once, right
        matching = filter_table(expected, filters)
        assert restarted.page(filters, offset=1, limit=6, wait=0) == (
            matching.num_rows, matching.slice(1, 6).to_pylist()), filters
    assert restarted.collections(wait=0) == sorted({row["collection"] for row in expected.to_pylist()} - {None})
    release.set()
    restarted.refresh()
    assert not restarted.building and restarted.table().to_pylist() == expected.to_pylist()
    assert CollectionTable(output, state_folder=state).table().to_pylist() == expected.to_pylist()  # stored


def test_a_failed_background_build_is_logged_and_pages_are_still_served(tmp_path, monkeypatch, caplog):
    output = str(tmp_path / "out")
    _publish(output, _history(16, items=30, runs=2))
    expected = _reference(output)
    store = CollectionTable._store

    def failing(self, files, base):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CollectionTable, "_store", failing)
    table = CollectionTable(output, state_folder=str(tmp_path / "state"))
    page = table.page(Filters(), offset=4, limit=5)
    assert (page[0], page[1]) == (expected.num_rows, expected.slice(4, 5).to_pylist()) and page.building
    with pytest.raises(browse.StillIndexing, match="No space left on device"):
        table.page(Filters(status="done"))  # not waiting for a build that failed
    assert table._task is None and "No space left on device" in table.build_error
    assert "building the collection state" in caplog.text and "No space left on device" in caplog.text
    assert table.page(Filters(), limit=3)[1] == expected.slice(0, 3).to_pylist()  # still served
    monkeypatch.setattr(CollectionTable, "_store", store)
    monkeypatch.setattr(browse, "RETRY_SECONDS", 0.0)
    table.refresh()  # tried again
    assert table.build_error is None and table.table().to_pylist() == expected.to_pylist()


def test_a_run_removed_while_the_state_is_built_is_left_out_of_the_next_page_and_the_build(tmp_path, monkeypatch,
                                                                                           held):
    import shutil

    output = str(tmp_path / "out")
    _publish(output, _history(19, items=30, runs=3))
    release, begun = held
    release.clear()
    table = CollectionTable(output, state_folder=str(tmp_path / "state"))
    assert table.page(Filters(), limit=4).building and _soon(lambda: begun)
    monkeypatch.setattr(browse, "REFRESH_SECONDS", 3600.0)  # the next page keeps the listing it has
    shutil.rmtree(f"{output}/runs/20260102T000000Z-run1")
    expected = _reference(output)
    page = table.page(Filters(), offset=2, limit=6)  # the run's file is gone: listed again, read without it
    assert page.runs == _runs_of(output) and (page[0], page[1]) == (expected.num_rows,
                                                                     expected.slice(2, 6).to_pylist())
    release.set()  # the build of the former runs fails; the one of the runs there now follows at once
    assert _soon(lambda: table.build_error is None and not table.building)
    assert table.table().to_pylist() == expected.to_pylist()


def test_many_new_rows_at_a_restart_are_read_from_every_run_until_they_are_folded_in(tmp_path, monkeypatch, held):
    output, state = str(tmp_path / "out"), str(tmp_path / "state")
    history = _history(20, items=40, runs=3)
    _publish(output, history[:2])
    CollectionTable(output, state_folder=state).refresh()
    write_results(history[2], OutputLayout(output).run("20260103T000000Z-run2").results, csv=False)
    expected = _reference(output)
    release, begun = held
    release.clear()
    monkeypatch.setattr(browse, "OVERLAY_ROWS", 5)  # more new rows than are folded in memory
    monkeypatch.setattr(CollectionTable, "_over_state", None)
    restarted = CollectionTable(output, state_folder=state)
    page = restarted.page(Filters(), offset=2, limit=9)
    assert page.building and (page[0], page[1]) == (expected.num_rows, expected.slice(2, 9).to_pylist())
    with pytest.raises(browse.StillIndexing):
        restarted.page(Filters(status="done"), wait=0.1)
    assert _soon(lambda: begun) and begun == [(["20260103T000000Z-run2"], True)]  # folded into the stored state
    release.set()
    assert restarted.page(Filters(status="done")) == (filter_table(expected, Filters(status="done")).num_rows,
                                                      filter_table(expected, Filters(status="done")).slice(
                                                          0, 48).to_pylist())
