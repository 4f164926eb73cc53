"""The collection as one browsable table: the latest state of every item, from the runs' results tables.

Browsing 100,000 items must not read 100,000 item folders. Every run (the
collection flow, reprocess, review runs of :mod:`diffcolor.archive.decisions`)
publishes ``OUTPUT/runs/RUN_ID/results.parquet``; run ids sort by time, so
reading them in name order gives each item's history. Per item the table keeps
its current state, which a later skip or failure never hides:

- ``version``: the highest version a done (or skipped-as-done) row names, and
  from that version's latest done row (else its latest skip) the caption,
  prompt, metrics and smoke flag; ``status`` is ``done``. An item never done
  shows its latest row (``failed``, ``not_grayscale``);
- ``latest_status``, ``latest_error``, ``latest_at``: the latest attempt when it
  is another row than the current one (a rerun that skipped or failed), else null;
- the catalogue (as ``catalogue_text``, "title: ...; accession number: ...", and
  ``collection``), from the latest attempt that has one;
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
from diffcolor.archive.layout import OutputLayout, RunLayout
from diffcolor.common import record as declarations
from diffcolor.common.errors import MissingObjectError

logger = logging.getLogger(__name__)

_READ = ("item_id", "version", "status", "error_class", "error_message", "caption", "target_prompt", "smoke_run",
         "created_at", "decision", "decided_by", "decided_at", "record_json")
CATALOGUE_FIRST = ("title", "accession_number", "creator", "date", "collection")
REFRESH_SECONDS = 2.0  # ours: at most one listing of runs/ per two seconds, however many pages are served


def metrics() -> tuple[str, ...]:
    """The metrics curators filter by (declared ``filterable``, :mod:`diffcolor.common.record`)."""
    return tuple(declared.name for declared in declarations.filterable())


def _read() -> tuple[str, ...]:
    """The columns of a run this table keeps: its own, and the filtered and summary metrics."""
    shown = [declared.name for declared in declarations.filterable() + declarations.summary()]
    return (*_READ[:-1], *dict.fromkeys(name for name in shown if name not in _READ), _READ[-1])


def __getattr__(name: str):
    if name == "METRICS":  # the name older code imports
        return metrics()
    raise AttributeError(name)


def _catalogue_text(record_json: str | None) -> tuple[str, str | None]:
    catalogue = (json.loads(record_json).get("catalogue") if record_json else None) or {}
    keys = [key for key in CATALOGUE_FIRST if key in catalogue] + sorted(set(catalogue) - set(CATALOGUE_FIRST))
    text = "; ".join(f"{key.replace('_', ' ')}: {catalogue[key]}" for key in keys if catalogue[key] not in (None, ""))
    collection = catalogue.get("collection")
    return text, None if collection in (None, "") else str(collection)


def _run_rows(uri: str) -> pa.Table:
    """One run's rows, the columns this table needs (missing ones as nulls: older runs lack decisions)."""
    table = declarations.with_columns(pq.read_table(io.BytesIO(storage.read_bytes(uri))))
    return table.select(list(_read()))


def latest_per_item(runs: list[pa.Table]) -> pa.Table:
    """One row per item from the runs' rows (oldest run first), as the module docstring describes."""
    if not runs:
        return _empty()
    rows = pa.concat_tables(runs, promote_options="permissive")
    rows = rows.append_column("order", pa.array(range(rows.num_rows), pa.int64()))
    # a review run's rows repeat a decided version: they carry decisions, not outcomes
    attempts = rows.filter(pc.is_null(rows["decision"]))
    last = attempts.group_by("item_id").aggregate([("order", "max")]).rename_columns(["item_id", "last"])
    # the current version: the highest version a done (or skipped-as-done) row names; of its rows, the latest
    # done one (it carries the version's metrics), else the latest skip
    done = attempts.filter(pc.is_in(attempts["status"], pa.array(["done", "skipped_done"])))
    rank = pc.add(pc.add(pc.multiply(pc.fill_null(done["version"], 0), _VERSION_STEP),
                         pc.multiply(pc.cast(pc.equal(done["status"], "done"), pa.int64()), _DONE_STEP)),
                  done["order"])
    best = pa.table({"item_id": done["item_id"], "rank": rank}).group_by("item_id").aggregate([("rank", "max")])
    best = pa.table({"item_id": best["item_id"], "current": pc.bit_wise_and(best["rank_max"], _DONE_STEP - 1)})
    chosen = last.join(best, "item_id", join_type="left outer")
    # an item never done shows its latest outcome (failed, not_grayscale)
    current = rows.take(pc.coalesce(chosen["current"], chosen["last"]))
    latest = rows.take(chosen["last"])
    done_now = pc.is_in(current["status"], pa.array(["done", "skipped_done"]))
    # the latest attempt when it is not the current version's own row: a later failure or skip is noted, never shown
    # in its place
    other = pc.not_equal(latest["order"], current["order"])
    current = current.set_column(current.column_names.index("status"), "status",
                                 pc.if_else(done_now, pa.scalar("done"), current["status"]))
    current = current.drop_columns(["decision", "decided_by", "decided_at", "order"]).append_column(
        "latest_status", pc.if_else(other, latest["status"], pa.scalar(None, pa.string()))).append_column(
        "latest_error", pc.if_else(other, latest["error_message"], pa.scalar(None, pa.string()))).append_column(
        "latest_at", pc.if_else(other, latest["created_at"], pa.scalar(None, pa.string())))
    # the latest decision
    decided = rows.filter(pc.is_valid(rows["decision"]))
    last_decision = decided.group_by("item_id").aggregate([("order", "max")])
    decisions = decided.filter(pc.is_in(decided["order"], last_decision["order_max"])).select(
        ["item_id", "decision", "version", "decided_by", "decided_at"]).rename_columns(
        ["item_id", "decision", "decided_version", "decided_by", "decided_at"])
    table = current.join(decisions, "item_id", join_type="left outer")
    # the catalogue describes the object, not a version: the latest attempt's, else the current row's
    catalogue_of = dict(zip(latest["item_id"].to_pylist(), latest["record_json"].to_pylist()))
    texts = [_catalogue_text(_with_catalogue(catalogue_of.get(item_id), own))
             for item_id, own in zip(table["item_id"].to_pylist(), table["record_json"].to_pylist())]
    table = table.drop_columns(["record_json"]).append_column(
        "catalogue_text", pa.array([text for text, _ in texts], pa.string())).append_column(
        "collection", pa.array([collection for _, collection in texts], pa.string()))
    return table.sort_by([("item_id", "ascending")])


_DONE_STEP = 1 << 40  # rank = version * _VERSION_STEP + done * _DONE_STEP + row order (< 2**40 rows)
_VERSION_STEP = 1 << 41


def _with_catalogue(latest: str | None, own: str | None) -> str | None:
    """The record JSON whose catalogue to show: the latest attempt's when it has one, else the current row's."""
    if latest and latest != own and (json.loads(latest).get("catalogue") or None) is not None:
        return latest
    return own


def _empty() -> pa.Table:
    return pa.table({"item_id": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                     "version": pa.array([], pa.int64()), "decision": pa.array([], pa.string()),
                     "collection": pa.array([], pa.string()), "catalogue_text": pa.array([], pa.string()),
                     "smoke_run": pa.array([], pa.bool_()), "caption": pa.array([], pa.string()),
                     **{name: pa.array([], pa.string()) for name in ("latest_status", "latest_error", "latest_at")},
                     **{name: pa.array([], declarations.field(name).type) for name in _read() if name not in _READ}})


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
        if metric not in metrics():
            raise ValueError(f"unknown metric {metric!r}; filter by one of {metrics()}")
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
            runs = storage.list_folders(storage.confine(self.output, OutputLayout(self.output).runs))
        except storage.OutsideRootError as error:
            logger.warning("%s", error)
            runs = []
        new = [run for run in runs if run not in self._runs]
        for run in new:
            try:
                self._runs[run] = _run_rows(storage.confine(self.output, RunLayout(run).results))
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
