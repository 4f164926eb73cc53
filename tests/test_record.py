"""The version record's one declaration per field: a metric declared once reaches every reader.

A new field is declared by adding it to ``diffcolor.common.record.FIELDS`` (in
code, one annotated line of ``VersionRecord``); the results table and its CSV,
the run report, the review app's filters and API, the CLI's line and the run's
Prefect table must all show it, with no other list to edit.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from diffcolor.archive import storage
from diffcolor.archive.browse import CollectionTable, Filters, filter_table
from diffcolor.archive.items import base_record, failure_record
from diffcolor.archive.report import render_report
from diffcolor.archive.results import csv_uri, read_results, write_results
from diffcolor.common import record
from diffcolor.common.errors import BadImageError
from diffcolor.common.items import ItemRequest
from review.app import ReviewConfig, create_app

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t" * 32
SHARPNESS = record.Field("how sharp the master's edges are, higher is crisper", "cycles per pixel",
                         label="sharpness", digits=2, filterable=True, statistic=True, report_row=True, summary=True)


def _record(item_id: str, version: int, **fields) -> dict:
    record = {"item_id": item_id, "version": version, "status": "done", "caption": "a dog on a bench", "seed": 1,
              "outputs": {}, "output_sha256": {}, "seconds": {"read": 0.5}, "clip_score": 20.0, "max_delta_l": 0.4,
              "colorfulness": 12.0, "finetune_steps_run": 3, "created_at": "2026-01-01T00:00:00+00:00"}
    record.update(fields)
    return record


@pytest.fixture
def sharpness(monkeypatch):
    """A new metric, declared in one place only."""
    monkeypatch.setattr(record, "FIELDS", record.declare(SHARPNESS, name="sharpness", type=pa.float64()))


def test_a_metric_declared_once_reaches_every_reader(tmp_path, sharpness, monkeypatch, capsys):
    out = str(tmp_path / "out")
    records = [_record("crisp", 1, sharpness=0.75), _record("soft", 1, sharpness=0.125),
               _record("old", 1)]  # made before the metric: no value
    results = f"{out}/runs/20260101T000000Z-aaaaaa/results.parquet"
    write_results(records, results)

    # The Parquet schema and the CSV.
    assert pq.read_schema(results).field("sharpness").type == pa.float64()
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(csv_uri(results)).decode("utf-8-sig"))))
    assert [row["sharpness"] for row in rows] == ["0.75", "0.125", ""]
    assert [row["sharpness"] for row in read_results(results).to_pylist()] == [0.75, 0.125, None]

    # The report: explained with its unit, summarised over the run, shown on each item row.
    html = render_report(records, run_id="r")
    assert ("<td>sharpness</td><td>cycles per pixel</td><td class=explain>how sharp the master&#39;s edges are, "
            "higher is crisper</td><td>2</td>") in html
    assert "sharpness 0.75" in html and "sharpness 0.12" in html and "sharpness –" in html

    # The CLI's line per record and the run's Prefect table.
    from diffcolor.cli import _print_records

    _print_records(records[:1])
    assert "sharpness 0.75" in capsys.readouterr().out
    import flows.runs

    tables = []
    monkeypatch.setattr(flows.runs, "create_table_artifact", lambda rows, **_: tables.append(rows))
    monkeypatch.setattr(flows.runs, "create_markdown_artifact", lambda *_, **__: None)
    flows.runs.publish_summary({"run_id": "r", "items": {"done": 3}, "versions_written": 3, "results": results,
                                "results_csv": csv_uri(results), "report": "report.html"}, records)
    assert [row["sharpness"] for row in tables[0]] == [0.75, 0.12, None]

    # The review app: a range filter on the page and in the API, a query parameter in /openapi.json,
    # an explanation on the item, a figure on the card.
    client = TestClient(create_app(ReviewConfig(output=out, token=TOKEN, allowed_hosts=("testserver",))))
    parameters = {p["name"]: p for p in client.get("/openapi.json").json()["paths"]["/api/items"]["get"]["parameters"]}
    for side in ("min", "max"):
        assert parameters[f"{side}_sharpness"]["schema"]["type"] == "number"
        assert "how sharp the master's edges are" in parameters[f"{side}_sharpness"]["description"]
    items = client.get("/api/items?min_sharpness=0.5").json()["items"]
    assert [item["item_id"] for item in items] == ["crisp"]
    assert [item["item_id"] for item in client.get("/api/items?max_sharpness=0.5").json()["items"]] == ["soft"]
    refused = client.get("/api/items?max_sharpness=abc")
    assert refused.status_code == 400 and "max_sharpness must be a finite number" in refused.json()["detail"]
    page = client.get("/?min_sharpness=0.5").text
    assert 'name="min_sharpness"' in page and "sharpness 0.75" in page and "soft" not in page
    assert filter_table(CollectionTable(out).table(), Filters(ranges=(("sharpness", None, 0.2),))).num_rows == 1


def test_an_undeclared_metric_is_nowhere(tmp_path):
    """The same checks fail without the declaration: the readers have no list of their own."""
    out = str(tmp_path / "out")
    results = f"{out}/runs/20260101T000000Z-aaaaaa/results.parquet"
    write_results([_record("crisp", 1, sharpness=0.75)], results)
    assert "sharpness" not in pq.read_schema(results).names
    assert "sharpness" not in render_report([_record("crisp", 1, sharpness=0.75)], run_id="r")
    client = TestClient(create_app(ReviewConfig(output=out, token=TOKEN, allowed_hosts=("testserver",))))
    assert "min_sharpness" not in client.get("/openapi.json").text
    with pytest.raises(ValueError, match="unknown metric 'sharpness'"):
        filter_table(CollectionTable(out).table(), Filters(ranges=(("sharpness", 0.0, None),)))


def test_the_readers_keep_no_parallel_lists(tmp_path):
    declared = record.names()
    # The results schema is the declarations, in order, then the whole record.
    assert read_results_schema(tmp_path) == [*declared, record.RECORD_JSON]
    # Every filterable metric, and nothing else, is a pair of query parameters of the items API.
    client = TestClient(create_app(ReviewConfig(output=str(tmp_path / "out"), token=TOKEN,
                                                allowed_hosts=("testserver",))))
    parameters = {p["name"] for p in client.get("/openapi.json").json()["paths"]["/api/items"]["get"]["parameters"]}
    bounds = {name for name in parameters if re.match("(min|max)_", name)}
    assert bounds == {f"{side}_{field.name}" for field in record.filterable() for side in ("min", "max")}
    assert bounds  # the product's filters: at least CLIP score, colourfulness and max ΔL*
    assert {"clip_score", "colorfulness", "max_delta_l"} <= {field.name for field in record.filterable()}
    # No module or template that shows the records names a metric itself.
    readers = ["diffcolor/archive/results.py", "diffcolor/archive/report.py", "diffcolor/archive/browse.py",
               "diffcolor/archive/templates/run_report.html", "review/app.py", "review/templates/collection.html",
               "review/templates/item.html", "diffcolor/cli.py", "flows/runs.py"]
    for path in readers:
        text = (ROOT / path).read_text(encoding="utf-8")
        for field in record.metrics():
            assert not re.search(rf"\b{field.name}\b", text), f"{path} names {field.name}"


def read_results_schema(tmp_path) -> list[str]:
    uri = str(tmp_path / "results.parquet")
    write_results([_record("a", 1)], uri)
    return pq.read_schema(uri).names


def test_run_config_is_carried_and_older_tables_read_it_as_null(tmp_path):
    config = "s3://museum/out/runs/20260101T000000Z-aaaaaa/config.json"
    uri = str(tmp_path / "new" / "results.parquet")
    write_results([_record("a", 1, run_config=config), _record("b", 1)], uri)
    assert pq.read_schema(uri).field("run_config").type == pa.string()
    assert [row["run_config"] for row in read_results(uri).to_pylist()] == [config, None]
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(csv_uri(uri)).decode("utf-8-sig"))))
    assert [row["run_config"] for row in rows] == [config, ""]

    # A table written before the column (and before the decision columns): every declared column reads as null,
    # and the browse table takes it.
    old = pa.table({"item_id": ["c"], "version": pa.array([1], pa.int64()), "status": ["done"],
                    "clip_score": [21.0], "record_json": ['{"item_id": "c", "version": 1, "status": "done"}']})
    out = tmp_path / "out"
    (out / "runs" / "20250101T000000Z-bbbbbb").mkdir(parents=True)
    pq.write_table(old, out / "runs" / "20250101T000000Z-bbbbbb" / "results.parquet")
    [row] = read_results(str(out / "runs" / "20250101T000000Z-bbbbbb" / "results.parquet")).to_pylist()
    assert row["run_config"] is None and row["decision"] is None and row["clip_score"] == 21.0
    assert set(row) == {*record.names(), record.RECORD_JSON}
    assert record.from_row(row)["run_config"] is None
    [item] = CollectionTable(str(out)).table().to_pylist()
    assert (item["item_id"], item["clip_score"], item["max_delta_l"]) == ("c", 21.0, None)


def test_to_row_and_from_row_round_trip():
    original = _record("a", 2, run_config="runs/r/config.json", catalogue={"title": "Dog"},
                       outputs={"master": "m.tif"}, seconds={"read": 0.5, "stage1": 2.0})
    row = record.to_row(original)
    assert row["outputs"] == [("master", "m.tif")] and row["run_config"] == "runs/r/config.json"
    table = pa.Table.from_pylist([row], schema=record.results_schema())
    back = record.from_row(table.to_pylist()[0])
    assert {key: back[key] for key in original} == original
    # Without record_json (a CSV-like row), the columns alone; maps become dicts again.
    columns_only = record.from_row({**table.to_pylist()[0], "record_json": None})
    assert columns_only["seconds"] == {"read": 0.5, "stage1": 2.0} and "catalogue" not in columns_only


def test_every_record_field_the_archive_writes_is_declared():
    request = ItemRequest(item_id="a", source_uri="/in/a.png", caption="a dog", seed=1)
    typed = set(record.VersionRecord.__annotations__)
    assert set(base_record(request, None, "smoke", None, None)) <= typed
    assert set(failure_record(request, BadImageError("truncated"))) <= typed
    with pytest.raises(ValueError, match="fresh name"):
        record.declare(record.Field(), name="clip_score", type=pa.float64())
