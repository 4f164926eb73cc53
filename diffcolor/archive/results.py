"""Result records compacted into one Parquet table per run.

Each item version has a JSON record (see :mod:`diffcolor.archive.items`); a run
collects the records it produced or skipped into ``results.parquet`` with a
fixed schema: the contract fields of docs/DESIGN.md §10.3 as typed columns, the
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
from diffcolor.common.redact import redact_value

RESULTS_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("version", pa.int64()),
        ("status", pa.string()),
        ("error_class", pa.string()),
        ("error_message", pa.string()),
        ("cache_key", pa.string()),
        ("source_uri", pa.string()),
        ("source_sha256", pa.string()),
        ("outputs", pa.map_(pa.string(), pa.string())),
        ("output_sha256", pa.map_(pa.string(), pa.string())),
        ("clip_score", pa.float64()),
        ("colorfulness", pa.float64()),
        ("max_delta_l", pa.float64()),
        ("mean_delta_l", pa.float64()),
        ("ssim_l", pa.float64()),
        ("gamut_clipped_fraction", pa.float64()),
        ("alignment_confidence", pa.float64()),
        ("seconds", pa.map_(pa.string(), pa.float64())),
        ("device_seconds", pa.float64()),  # the item's share of device time (flows.worker.placed)
        ("finetune_steps_run", pa.int64()),
        ("peak_memory_bytes", pa.int64()),
        ("seed", pa.int64()),
        ("model_id", pa.string()),
        ("model_hash", pa.string()),
        ("software_version", pa.string()),
        ("preset", pa.string()),
        ("caption", pa.string()),
        ("target_prompt", pa.string()),  # for people: as the curator wrote it, or the caption with the colour map
        ("model_prompt", pa.string()),  # what the text encoder was given (identifier tokens in uncoloured slots)
        ("prompt_alignment", pa.string()),  # color_map, aligned, unaligned or caption (diffcolor.method.render)
        ("prompt_warning", pa.string()),  # why a free prompt could not be aligned, when it could not
        ("smoke_run", pa.bool_()),
        ("created_at", pa.string()),
        ("decision", pa.string()),  # approved or rejected: a curator's decision (review runs only)
        ("decided_by", pa.string()),
        ("decided_at", pa.string()),
        ("decision_note", pa.string()),
        ("record_json", pa.string()),  # the whole record, for fields without a column
    ]
)
_MAPS = {"outputs", "output_sha256", "seconds"}


def _row(record: dict) -> dict:
    row = {}
    for name in RESULTS_SCHEMA.names:
        if name == "record_json":
            row[name] = storage.strict_json(record, default=str)
        elif name in _MAPS:
            row[name] = list((record.get(name) or {}).items())
        else:
            row[name] = record.get(name)
    return row


def results_table(records: Iterable[dict]) -> pa.Table:
    """The records as a table with :data:`RESULTS_SCHEMA`."""
    return pa.Table.from_pylist([_row(r) for r in records], schema=RESULTS_SCHEMA)


def write_results(records: Iterable[dict], uri: str, *, batch_size: int = 10_000, csv: bool = True) -> int:
    """Writes ``records`` as one Parquet object at ``uri`` (published whole); returns the row count.

    With ``csv`` (the default), ``results.csv`` is published beside it (``uri``
    with ``.csv`` for ``.parquet``): the same rows, flattened (module docstring).
    """
    buffer = io.BytesIO()
    count = 0
    with pq.ParquetWriter(buffer, RESULTS_SCHEMA, compression="zstd") as writer:
        batch: list[dict] = []
        for record in records:
            batch.append(_row(record))
            if len(batch) >= batch_size:
                writer.write_table(pa.Table.from_pylist(batch, schema=RESULTS_SCHEMA))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=RESULTS_SCHEMA))
            count += len(batch)
    storage.write_bytes(uri, buffer.getvalue())
    if csv:
        storage.write_bytes(csv_uri(uri), results_csv(buffer.getvalue(), batch_size=batch_size))
    return count


def csv_uri(uri: str) -> str:
    """Where the CSV copy of the results table at ``uri`` goes."""
    return uri.removesuffix(".parquet") + ".csv"


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CSV_LEFT_OUT = ("record_json",)


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
    keys = {name: _map_keys(parquet, name) for name in _MAPS}
    names = [name for name in RESULTS_SCHEMA.names if name not in CSV_LEFT_OUT]
    out = io.BytesIO()
    out.write("\ufeff".encode("utf-8"))
    writer = None
    for batch in parquet.iter_batches(batch_size=batch_size, columns=names):
        columns: dict[str, pa.Array] = {}
        for name in names:
            column = batch.column(name)
            if name in _MAPS:
                pairs = [dict(entry or []) for entry in column.to_pylist()]
                kind = RESULTS_SCHEMA.field(name).type.item_type
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
        header = [name for name in names if name not in _MAPS]
        out.write((",".join(f'"{name}"' for name in header) + "\n").encode())
    else:
        writer.close()
    return out.getvalue()


def read_results(uri: str) -> pa.Table:
    """A results table written by :func:`write_results`."""
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


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
