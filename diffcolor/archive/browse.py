"""The collection as one browsable table: the latest state of every item, from the runs' results tables.

Browsing 100,000 items must not read 100,000 item folders. Every run (the
collection flow, reprocess, review runs of :mod:`diffcolor.archive.decisions`)
publishes ``OUTPUT/runs/RUN_ID/results.parquet``; run ids sort by time, so
reading them in name order and keeping each item's last row gives its latest
outcome. Per item the table keeps:

- the latest row's status, caption, prompt, metrics, smoke flag and catalogue
  (as ``catalogue_text``, "title: ...; accession number: ...", and ``collection``);
- ``version``: the highest version any done (or skipped-as-done) row names;
- the latest decision (``decision``, ``decided_version``, ``decided_by``, ``decided_at``).

:class:`CollectionTable` caches each run's rows by run and re-reads only runs
it has not seen, so a refresh costs one listing of ``runs/``. Filtering and
paging are pyarrow compute kernels over the in-memory table: milliseconds per
page at 100,000 items (``python -m review.bench``).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffcolor.archive import storage
from diffcolor.common.errors import MissingObjectError

logger = logging.getLogger(__name__)

METRICS = ("max_delta_l", "colorfulness", "clip_score", "alignment_confidence", "gamut_clipped_fraction")
_READ = ("item_id", "version", "status", "error_class", "error_message", "caption", "target_prompt", "smoke_run",
         "created_at", *METRICS, "decision", "decided_by", "decided_at", "record_json")
CATALOGUE_FIRST = ("title", "accession_number", "creator", "date", "collection")
REFRESH_SECONDS = 2.0  # ours: at most one listing of runs/ per two seconds, however many pages are served


def _catalogue_text(record_json: str | None) -> tuple[str, str | None]:
    catalogue = (json.loads(record_json).get("catalogue") if record_json else None) or {}
    keys = [key for key in CATALOGUE_FIRST if key in catalogue] + sorted(set(catalogue) - set(CATALOGUE_FIRST))
    text = "; ".join(f"{key.replace('_', ' ')}: {catalogue[key]}" for key in keys if catalogue[key] not in (None, ""))
    collection = catalogue.get("collection")
    return text, None if collection in (None, "") else str(collection)


def _run_rows(uri: str) -> pa.Table:
    """One run's rows, the columns this table needs (missing ones as nulls: older runs lack decisions)."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    columns = {}
    for name in _READ:
        if name in table.column_names:
            columns[name] = table[name]
        else:
            kind = pa.float64() if name in METRICS else pa.bool_() if name == "smoke_run" else \
                pa.int64() if name == "version" else pa.string()
            columns[name] = pa.nulls(table.num_rows, kind)
    return pa.table(columns)


def latest_per_item(runs: list[pa.Table]) -> pa.Table:
    """One row per item from the runs' rows (oldest run first), as the module docstring describes."""
    if not runs:
        return _empty()
    rows = pa.concat_tables(runs, promote_options="permissive")
    rows = rows.append_column("order", pa.array(range(rows.num_rows), pa.int64()))
    # the latest outcome of each item: its last row that is not a review run's (those repeat a decided version)
    last = rows.filter(pc.is_null(rows["decision"])).group_by("item_id").aggregate([("order", "max")])
    latest = rows.take(last["order_max"])  # order is the row's index
    # the highest version of a done (or skipped-as-done) row
    done = rows.filter(pc.is_in(rows["status"], pa.array(["done", "skipped_done"])))
    versions = done.group_by("item_id").aggregate([("version", "max")])
    # the latest decision
    decided = rows.filter(pc.is_valid(rows["decision"]))
    last_decision = decided.group_by("item_id").aggregate([("order", "max")])
    decisions = decided.filter(pc.is_in(decided["order"], last_decision["order_max"])).select(
        ["item_id", "decision", "version", "decided_by", "decided_at"]).rename_columns(
        ["item_id", "decision", "decided_version", "decided_by", "decided_at"])
    latest = latest.drop_columns(["version", "decision", "decided_by", "decided_at"])
    table = latest.join(versions, "item_id", join_type="left outer").rename_columns(
        [*latest.column_names, "version"])
    table = table.join(decisions, "item_id", join_type="left outer")
    texts = [_catalogue_text(text) for text in table["record_json"].to_pylist()]
    table = table.drop_columns(["record_json"]).append_column(
        "catalogue_text", pa.array([text for text, _ in texts], pa.string())).append_column(
        "collection", pa.array([collection for _, collection in texts], pa.string()))
    return table.sort_by([("item_id", "ascending")])


def _empty() -> pa.Table:
    return pa.table({"item_id": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                     "version": pa.array([], pa.int64()), "decision": pa.array([], pa.string()),
                     "collection": pa.array([], pa.string()), "catalogue_text": pa.array([], pa.string()),
                     "smoke_run": pa.array([], pa.bool_()), "caption": pa.array([], pa.string()),
                     **{name: pa.array([], pa.float64()) for name in METRICS}})


@dataclass(frozen=True)
class Filters:
    """What the collection page filters by; None: not filtered."""

    status: str | None = None
    collection: str | None = None
    text: str | None = None  # in the item id, caption or catalogue fields, case-insensitive
    smoke: bool | None = None
    decision: str | None = None  # approved, rejected, or "none" (no decision yet)
    ranges: tuple[tuple[str, float | None, float | None], ...] = ()  # (metric, min, max)


def filter_table(table: pa.Table, filters: Filters) -> pa.Table:
    """The rows of ``table`` that pass ``filters``. Raises ValueError naming an unknown metric."""
    if not table.num_rows:
        return table
    mask = pa.array([True] * table.num_rows, pa.bool_())

    def both(condition):
        return pc.and_kleene(mask, pc.fill_null(condition, False))

    if filters.status:
        mask = both(pc.equal(table["status"], filters.status))
    if filters.collection:
        mask = both(pc.equal(table["collection"], filters.collection))
    if filters.text:
        needle = filters.text.strip()
        found = pc.or_kleene(pc.match_substring(table["item_id"], needle, ignore_case=True),
                             pc.fill_null(pc.match_substring(table["catalogue_text"], needle, ignore_case=True), False))
        found = pc.or_kleene(found, pc.fill_null(pc.match_substring(table["caption"], needle, ignore_case=True), False))
        mask = both(found)
    if filters.smoke is not None:
        mask = both(pc.equal(pc.fill_null(table["smoke_run"], False), filters.smoke))
    if filters.decision == "none":
        mask = both(pc.is_null(table["decision"]))
    elif filters.decision:
        mask = both(pc.equal(table["decision"], filters.decision))
    for metric, low, high in filters.ranges:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; filter by one of {METRICS}")
        if low is not None:
            mask = both(pc.greater_equal(table[metric], low))
        if high is not None:
            mask = both(pc.less_equal(table[metric], high))
    return table.filter(mask)


class CollectionTable:
    """The browsable table of one output root, refreshed from new runs (at most every REFRESH_SECONDS)."""

    def __init__(self, output: str):
        self.output = output
        self._runs: dict[str, pa.Table] = {}
        self._table: pa.Table = _empty()
        self._checked = 0.0
        self._lock = threading.Lock()

    def table(self, *, refresh: bool = False) -> pa.Table:
        """The latest table (re-listing ``runs/`` when ``refresh`` or when the last listing is old)."""
        with self._lock:
            if refresh or time.monotonic() - self._checked > REFRESH_SECONDS:
                self._refresh()
            return self._table

    def _refresh(self) -> None:
        try:  # a runs/ folder or run that is a link out of the output is not read (storage.confine)
            runs = storage.list_folders(storage.confine(self.output, storage.join(self.output, "runs")))
        except storage.OutsideRootError as error:
            logger.warning("%s", error)
            runs = []
        new = [run for run in runs if run not in self._runs]
        for run in new:
            try:
                self._runs[run] = _run_rows(storage.confine(self.output, storage.join(run, "results.parquet")))
            except MissingObjectError:  # a run under way has no results yet: look again next time
                continue
            except storage.OutsideRootError as error:
                logger.warning("%s", error)
                continue
        if any(run in self._runs for run in new):
            self._table = latest_per_item([self._runs[run] for run in sorted(self._runs)])
        self._checked = time.monotonic()

    def page(self, filters: Filters, offset: int = 0, limit: int = 48) -> tuple[int, list[dict]]:
        """``(matching, rows)``: how many items pass ``filters`` and the ``limit`` rows from ``offset``."""
        matching = filter_table(self.table(), filters)
        return matching.num_rows, matching.slice(max(0, offset), max(0, limit)).to_pylist()

    def collections(self) -> list[str]:
        """The distinct collection names, for the filter's choices."""
        values = pc.unique(self.table()["collection"]).to_pylist()
        return sorted(value for value in values if value)
