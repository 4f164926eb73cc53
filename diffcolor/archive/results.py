"""Result records compacted into one Parquet table per run.

Each item version has a JSON record (see :mod:`diffcolor.archive.items`); a run
collects the records it produced or skipped into ``results.parquet`` with a
fixed schema: the contract fields of docs/DESIGN.md §10.3 as typed columns (as
:mod:`diffcolor.common.record` declares them), the
role-keyed fields (``outputs``, ``output_sha256``, ``seconds``) as maps, and the
whole record as JSON text so nothing is lost. Records are written in batches,
so the table is built in bounded memory.

Beside it, ``results.csv`` holds the same rows and columns for spreadsheets,
flattened: each map becomes one column per key (``outputs.master``,
``seconds.stage1``), the whole-record JSON is left out (it is in the Parquet
and in each item's ``result.json``). Text cells that a spreadsheet would take
for a formula (starting with ``=``, ``+``, ``-``, ``@``, tab or carriage
return) get a leading apostrophe, as OWASP advises against CSV injection:
captions and error messages come from outside. The file is UTF-8 with a byte
order mark, so spreadsheet programs read accents correctly.
"""

from __future__ import annotations

import io
import json
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from diffcolor.archive import storage
from diffcolor.common import record as declarations
from diffcolor.common.redact import redact_value

# The schema is derived from the record's declarations (diffcolor.common.record) when it is used.


def __getattr__(name: str):
    if name == "RESULTS_SCHEMA":  # the name older code imports
        return declarations.results_schema()
    raise AttributeError(name)


def _row(record: dict) -> dict:
    return declarations.to_row(record, record_json=storage.strict_json(record, default=str))


def results_table(records: Iterable[dict]) -> pa.Table:
    """The records as a table with the declared schema (:func:`diffcolor.common.record.results_schema`)."""
    return pa.Table.from_pylist([_row(r) for r in records], schema=declarations.results_schema())


def write_results(records: Iterable[dict], uri: str, *, batch_size: int = 10_000, csv: bool = True) -> int:
    """Writes ``records`` as one Parquet object at ``uri`` (published whole); returns the row count.

    With ``csv`` (the default), ``results.csv`` is published beside it (``uri``
    with ``.csv`` for ``.parquet``): the same rows, flattened (module docstring).
    """
    buffer = io.BytesIO()
    count = 0
    schema = declarations.results_schema()
    with pq.ParquetWriter(buffer, schema, compression="zstd") as writer:
        batch: list[dict] = []
        for record in records:
            batch.append(_row(record))
            if len(batch) >= batch_size:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    storage.write_bytes(uri, buffer.getvalue())
    if csv:
        storage.write_bytes(csv_uri(uri), results_csv(buffer.getvalue(), batch_size=batch_size))
    return count


def csv_uri(uri: str) -> str:
    """Where the CSV copy of the results table at ``uri`` goes."""
    return uri.removesuffix(".parquet") + ".csv"


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CSV_LEFT_OUT = (declarations.RECORD_JSON,)


def _map_keys(parquet: pq.ParquetFile, name: str) -> list[str]:
    keys: set[str] = set()
    for batch in parquet.iter_batches(columns=[name]):
        keys.update(key for key in pc.unique(batch.column(0).keys).to_pylist() if key)
    return sorted(keys)


def _defused(column: pa.Array) -> pa.Array:
    """A text column with formula-like cells prefixed by an apostrophe (CSV injection)."""
    values = column.to_pylist()
    return pa.array([f"'{v}" if isinstance(v, str) and v.startswith(_FORMULA_STARTS) else v for v in values],
                    type=pa.string())


def results_csv(parquet_bytes: bytes, *, batch_size: int = 10_000) -> bytes:
    """The CSV copy of a results table (module docstring), batch by batch."""
    parquet = pq.ParquetFile(io.BytesIO(parquet_bytes))
    schema = parquet.schema_arrow
    maps = {name for name in schema.names if pa.types.is_map(schema.field(name).type)}
    keys = {name: _map_keys(parquet, name) for name in maps}
    names = [name for name in schema.names if name not in CSV_LEFT_OUT]
    out = io.BytesIO()
    out.write("\ufeff".encode("utf-8"))
    writer = None
    for batch in parquet.iter_batches(batch_size=batch_size, columns=names):
        columns: dict[str, pa.Array] = {}
        for name in names:
            column = batch.column(name)
            if name in maps:
                pairs = [dict(entry or []) for entry in column.to_pylist()]
                kind = schema.field(name).type.item_type
                for key in keys[name]:
                    values = pa.array([entry.get(key) for entry in pairs], type=kind)
                    columns[f"{name}.{key}"] = _defused(values) if pa.types.is_string(kind) else values
            elif pa.types.is_string(column.type):
                columns[name] = _defused(column)
            else:
                columns[name] = column
        table = pa.table(columns)
        if writer is None:
            writer = pcsv.CSVWriter(out, table.schema)
        writer.write_table(table)
    if writer is None:  # no rows: the header alone
        header = [name for name in names if name not in maps]
        out.write((",".join(f'"{name}"' for name in header) + "\n").encode())
    else:
        writer.close()
    return out.getvalue()


def read_results(uri: str) -> pa.Table:
    """A results table written by :func:`write_results`; a column an older table lacks reads as nulls."""
    return declarations.with_columns(pq.read_table(io.BytesIO(storage.read_bytes(uri))))


class RecordSpool:
    """A run's records, spooled to a local temporary file as JSON lines.

    A run over a million items must not hold a million records in memory: the
    spool keeps only the counts by status, the first ``keep_head`` records (for
    summaries and the report's contact sheet) and up to ``keep_failures``
    failures; iterating re-reads every record from the file.
    """

    def __init__(self, keep_head: int = 2000, keep_failures: int = 10_000):
        import tempfile

        self._file = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.counts: dict[str, int] = {}  # records (item versions, skips, failures) by status
        self.items: dict[str, int] = {}  # items by outcome: an item's records arrive together, one status
        self.versions_written = 0  # new versions this run wrote (records with status done)
        self._last_item: str | None = None
        self.head: list[dict] = []
        self.failures: list[dict] = []
        self._keep_head, self._keep_failures = keep_head, keep_failures

    def add(self, record: dict) -> None:
        """Spools ``record``, redacted: every record of a run passes here on its way to results and report."""
        record = redact_value(record)
        self._file.write(json.dumps(record, default=str) + "\n")
        self.counts[record["status"]] = self.counts.get(record["status"], 0) + 1
        if record["item_id"] != self._last_item:
            self.items[record["status"]] = self.items.get(record["status"], 0) + 1
            self._last_item = record["item_id"]
        if record["status"] == "done":
            self.versions_written += 1
        if len(self.head) < self._keep_head:
            self.head.append(record)
        if record["status"] in ("failed", "not_grayscale") and len(self.failures) < self._keep_failures:
            self.failures.append(record)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def __iter__(self):
        self._file.flush()
        self._file.seek(0)
        for line in self._file:
            yield json.loads(line)
        self._file.seek(0, 2)

    def close(self) -> None:
        self._file.close()
