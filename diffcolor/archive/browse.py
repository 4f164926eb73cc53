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

:class:`CollectionTable` keeps this state in a DuckDB database file in a local
cache folder (:func:`default_state_folder`), built from the runs' results
files where they lie (DuckDB over Parquet, local or through the output's
fsspec filesystem) and naming the runs it covers. A restart opens it after
checking it against the runs (first page about 0.5 s at a million records on
two busy cores); a new run is folded in from its own rows alone; a state that
does not check (damaged, another format, a run changed or missing) is rebuilt
from every run. Building and folding run in a background thread: meanwhile a
few new runs are folded in memory over the stored state for the items they
name, and without a usable state the unfiltered pages are read from the runs in
place (the page's item ids, then the state of those items alone, by the
build's own queries), so the first page of the very first start comes in well
under a second too. A page is one query with its filters, order and limit, so
only the page's rows become Python objects; peak memory stays under 1 GiB
(``python -m review.bench --items 1000000``). :func:`latest_per_item` and
:func:`filter_table` are the same rules over an
in-memory Arrow table.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from diffcolor.archive import storage
from diffcolor.archive.layout import OutputLayout, RunLayout
from diffcolor.common import record as declarations
from diffcolor.common.cache import cache_root

logger = logging.getLogger(__name__)

_READ = ("item_id", "version", "status", "error_class", "error_message", "caption", "target_prompt", "smoke_run",
         "created_at", "decision", "decided_by", "decided_at", "record_json")
CATALOGUE_FIRST = ("title", "accession_number", "creator", "date", "collection")
PART_ITEMS = 200_000  # ours: items folded at once, so that a million-item state builds within the memory limit
REFRESH_SECONDS = 2.0  # ours: at most one listing of runs/ per two seconds, however many pages are served
OVERLAY_ROWS = 200_000  # ours: new runs of at most this many rows are shown at once, folded in memory over the state
RETRY_SECONDS = 60.0  # ours: a failed background build is tried again after a minute
PEEK_MEMORY = "256MB"  # ours: DuckDB's limit for the pages read from the runs in place while the state is built
IN_PLACE_TOP = 10_000  # ours: pages read in place up to this offset find their ids by a top-N of the rows


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


# The stored state: a DuckDB database file per output root, in a local cache folder, holding per item its state
# (the ``items`` table: what a page shows, and what folding in a later run needs) and the runs folded into it.
# Bump STATE_FORMAT whenever these tables or the rules that fill them change: a file of another format is rebuilt.
STATE_FORMAT = "1"
_FOLDED = ("item_id", "decision", "decided_by", "decided_at", "record_json")
_BEST = "STRUCT(version BIGINT, done BOOLEAN, ord BIGINT)"

# Each row's place in the history: its run's position among the runs folded in (oldest first), then its row in
# the run's file; a run published later takes the next positions, so a state folded from the first runs stays
# valid when the later ones are folded into it.
_ORD = "($base + list_position($paths, filename) - 1) * 4294967296 + file_row_number"
_SOURCE = "read_parquet($paths, filename = true, file_row_number = true, union_by_name = true)"


def _source(only: list[str] | None) -> str:
    """The runs' rows, or those of the items ``only`` names (their id range pushed down to the Parquet reader, which
    skips the row groups outside it)."""
    if only is None:
        return _SOURCE
    return (f"(SELECT * FROM {_SOURCE} WHERE item_id BETWEEN {_literal(min(only))} AND {_literal(max(only))} "
            f"AND item_id IN ({', '.join(_literal(item_id) for item_id in only)}))")


# The items a page of the whole collection shows, in item order, from the runs' results files where they lie: those
# with an attempt (a row that is not a decision), the state's ``_latest_ord IS NOT NULL``.
_ATTEMPTED = """SELECT item_id FROM (SELECT item_id, decision FROM (
    SELECT * FROM read_parquet($paths, union_by_name = true) UNION ALL BY NAME SELECT * FROM temp.declared))
WHERE decision IS NULL"""


def _own() -> list[str]:
    """The columns of an item's current row that the table shows as they are (``status`` aside)."""
    return [name for name in _read() if name not in _FOLDED]


def _schema_sql(schema: str) -> list[str]:
    """The stored state's tables in ``schema``: ``items`` (typed like the declared results columns), ``runs``
    (position, run folder name, fingerprint of its results file) and ``meta`` (format and output root)."""
    own = ", ".join(f'"{name}"' for name in _own())
    return [f"""CREATE TABLE {schema}.items AS SELECT item_id, {own}, NULL::{_BEST} AS _best,
                NULL::BIGINT AS _own_ord, NULL::BIGINT AS _latest_ord, status AS _latest_status,
                error_message AS _latest_error, created_at AS _latest_at, decision, version AS decided_version,
                decided_by, decided_at, NULL::BIGINT AS _decided_ord, NULL::JSON AS _own_catalogue,
                NULL::JSON AS _latest_catalogue, NULL::VARCHAR AS catalogue_text, NULL::VARCHAR AS collection
                FROM temp.declared LIMIT 0""",
            f"CREATE TABLE {schema}.runs (seq BIGINT, run VARCHAR, fingerprint VARCHAR)",
            f"CREATE TABLE {schema}.meta (key VARCHAR, value VARCHAR)"]


# Folding runs into the state, from the new runs' results files where they lie. Per item, of the new rows: the
# latest attempt, the best done one (the highest version done or skipped as done; its latest done row, else its
# latest skip) and the latest decision (a review run's rows repeat a decided version: they carry decisions, not
# outcomes), from the narrow columns; merged with the item's stored state: the better of the two current versions,
# the new latest attempt and decision where there are new ones; an item never done shows its latest attempt. Then
# the rows chosen are read whole (their record JSON only for their catalogues).
_ROWS = """rows AS NOT MATERIALIZED (
    SELECT * EXCLUDE (record_json), {ord} AS ord
    FROM (SELECT * FROM {source} UNION ALL BY NAME SELECT * FROM temp.declared))"""
_PLAN_SQL = """
CREATE OR REPLACE TEMP TABLE plan AS
WITH {rows},
picked AS (
    SELECT item_id, max(ord) FILTER (WHERE decision IS NULL) AS latest,
           max({{'version': coalesce(version, 0)::BIGINT, 'done': status = 'done', 'ord': ord::BIGINT}})
               FILTER (WHERE decision IS NULL AND status IN ('done', 'skipped_done')) AS best,
           max(ord) FILTER (WHERE decision IS NOT NULL) AS decided
    FROM rows GROUP BY item_id),
chosen AS (
    SELECT picked.*, old._best AS best_old,
           CASE WHEN best IS NOT NULL AND (old._best IS NULL OR best > old._best) THEN best END AS best_new
    FROM picked LEFT JOIN state.items AS old ON old.item_id = picked.item_id)
SELECT item_id, latest, decided, best_old, best_new,
       CASE WHEN best_new IS NOT NULL THEN best_new.ord WHEN best_old IS NOT NULL THEN NULL ELSE latest END AS own_new,
       (row_number() OVER (ORDER BY item_id) - 1) // $part_items AS part
FROM chosen
"""
_CATALOGUES_SQL = """
CREATE OR REPLACE TEMP TABLE catalogues AS
SELECT ord, json_extract(record_json, '$.catalogue') AS catalogue
FROM (SELECT record_json, {ord} AS ord FROM {source})
WHERE ord IN (SELECT own_new FROM temp.plan WHERE part = $part UNION ALL SELECT latest FROM temp.plan WHERE part = $part)
"""
_MERGED_SQL = """
WITH {rows},
raw AS (
    SELECT plan.item_id, {own},
           CASE WHEN own_new IS NULL THEN old.status WHEN coalesce(best_new, best_old) IS NOT NULL THEN 'done'
                ELSE own.status END AS status,
           coalesce(best_new, best_old) AS _best, coalesce(own_new, old._own_ord) AS _own_ord,
           coalesce(plan.latest, old._latest_ord) AS _latest_ord,
           CASE WHEN plan.latest IS NULL THEN old._latest_status ELSE latest.status END AS _latest_status,
           CASE WHEN plan.latest IS NULL THEN old._latest_error ELSE latest.error_message END AS _latest_error,
           CASE WHEN plan.latest IS NULL THEN old._latest_at ELSE latest.created_at END AS _latest_at,
           CASE WHEN plan.decided IS NULL THEN old.decision ELSE decided.decision END AS decision,
           CASE WHEN plan.decided IS NULL THEN old.decided_version ELSE decided.version END AS decided_version,
           CASE WHEN plan.decided IS NULL THEN old.decided_by ELSE decided.decided_by END AS decided_by,
           CASE WHEN plan.decided IS NULL THEN old.decided_at ELSE decided.decided_at END AS decided_at,
           coalesce(plan.decided, old._decided_ord) AS _decided_ord,
           CASE WHEN own_new IS NULL THEN old._own_catalogue ELSE own_catalogue.catalogue END AS _own_catalogue,
           CASE WHEN plan.latest IS NULL THEN old._latest_catalogue ELSE latest_catalogue.catalogue
                END AS _latest_catalogue
    FROM (SELECT * FROM temp.plan WHERE part = $part) AS plan
    LEFT JOIN state.items AS old ON old.item_id = plan.item_id
    LEFT JOIN (SELECT * FROM rows WHERE ord IN (SELECT own_new FROM temp.plan WHERE part = $part)) AS own
        ON own.ord = plan.own_new
    LEFT JOIN (SELECT ord, status, error_message, created_at FROM rows
               WHERE ord IN (SELECT latest FROM temp.plan WHERE part = $part)) AS latest ON latest.ord = plan.latest
    LEFT JOIN (SELECT ord, decision, version, decided_by, decided_at FROM rows
               WHERE ord IN (SELECT decided FROM temp.plan WHERE part = $part)) AS decided
        ON decided.ord = plan.decided
    LEFT JOIN temp.catalogues AS own_catalogue ON own_catalogue.ord = plan.own_new
    LEFT JOIN temp.catalogues AS latest_catalogue ON latest_catalogue.ord = plan.latest),
-- the catalogue describes the object, not a version: the latest attempt's when it has one, else the current row's;
-- its text from the known fields alone (one parse) where it has no others
mapped AS (
    SELECT *, CASE WHEN json_type(shown) = 'OBJECT' THEN json_extract(shown, {known}) END AS known,
           CASE WHEN json_type(shown) = 'OBJECT' THEN json_keys(shown) END AS keys
    FROM (SELECT *, CASE WHEN catalogue_nonempty(_latest_catalogue) THEN _latest_catalogue
                         ELSE _own_catalogue END AS shown FROM raw))
SELECT * EXCLUDE (shown, known, keys),
       CASE WHEN known IS NULL THEN ''
            WHEN len(keys) = {present} THEN concat_ws('; ', {parts})
            ELSE coalesce(catalogue_text(shown::MAP(VARCHAR, JSON)), '') END AS catalogue_text,
       catalogue_value(known[{collection}]) AS collection
FROM mapped ORDER BY item_id
"""

def _merged_sql(source: str = _SOURCE) -> str:
    """The query of the folded state of the items the new runs name (their current row first, then the stored
    state's), ordered by item id."""
    own = ", ".join(f'CASE WHEN own_new IS NULL THEN old."{name}" ELSE own."{name}" END AS "{name}"'
                    for name in _own() if name != "status")
    return _MERGED_SQL.format(
        rows=_ROWS.format(ord=_ORD, source=source), own=own, known=[f"$.{key}" for key in CATALOGUE_FIRST],
        present=" + ".join(f"(known[{index}] IS NOT NULL)::INTEGER" for index in range(1, len(CATALOGUE_FIRST) + 1)),
        parts=", ".join(f"'{key.replace('_', ' ')}: ' || catalogue_value(known[{index}])"
                        for index, key in enumerate(CATALOGUE_FIRST, 1)),
        collection=CATALOGUE_FIRST.index("collection") + 1)


# A catalogue value (JSON) as Python's f"{value}" writes it (strings as they are, True/False); null for null or "".
_MACROS = ("""CREATE OR REPLACE TEMP MACRO catalogue_value(v) AS CASE
               WHEN v IS NULL OR json_type(v) = 'NULL' THEN NULL
               WHEN json_type(v) = 'BOOLEAN' THEN CASE WHEN v::BOOLEAN THEN 'True' ELSE 'False' END
               ELSE nullif(json_extract_string(v, '$'), '') END""",
           """CREATE OR REPLACE TEMP MACRO catalogue_nonempty(c) AS CASE json_type(c)
               WHEN 'OBJECT' THEN len(json_keys(c)) > 0 WHEN 'ARRAY' THEN json_array_length(c) > 0
               WHEN 'VARCHAR' THEN json_extract_string(c, '$') <> '' WHEN 'BIGINT' THEN c::DOUBLE <> 0
               WHEN 'UBIGINT' THEN c::DOUBLE <> 0 WHEN 'DOUBLE' THEN c::DOUBLE <> 0
               WHEN 'BOOLEAN' THEN c::BOOLEAN ELSE false END""",
           f"""CREATE OR REPLACE TEMP MACRO catalogue_text(m) AS array_to_string(
               list_transform(list_filter(list_concat(
                   list_filter({list(CATALOGUE_FIRST)}, k -> list_contains(map_keys(m), k)),
                   list_sort(list_filter(map_keys(m), k -> NOT list_contains({list(CATALOGUE_FIRST)}, k)))),
                   k -> catalogue_value(m[k]) IS NOT NULL),
                   k -> replace(k, '_', ' ') || ': ' || catalogue_value(m[k])), '; ')""")


def _shown() -> str:
    """The columns a page shows, from the stored state (the latest attempt only where it is another row)."""
    own = ", ".join(f'"{name}"' for name in _own())
    return (f"item_id, {own}, CASE WHEN _latest_ord <> _own_ord THEN _latest_status END AS latest_status, "
            "CASE WHEN _latest_ord <> _own_ord THEN _latest_error END AS latest_error, "
            "CASE WHEN _latest_ord <> _own_ord THEN _latest_at END AS latest_at, "
            "decision, decided_version, decided_by, decided_at, catalogue_text, collection")


def _where(filters: Filters) -> tuple[str, list]:
    """The SQL condition and its parameters for ``filters``. Raises ValueError naming an unknown metric."""
    conditions, values = ["_latest_ord IS NOT NULL"], []  # an item with decisions only is not shown
    if filters.status:
        conditions.append("status = ?")
        values.append(filters.status)
    if filters.collection:
        conditions.append("collection = ?")
        values.append(filters.collection)
    if filters.text:
        conditions.append("(strpos(lower(item_id), lower(?)) > 0"
                          " OR coalesce(strpos(lower(catalogue_text), lower(?)) > 0, false)"
                          " OR coalesce(strpos(lower(caption), lower(?)) > 0, false))")
        values += [filters.text.strip()] * 3
    if filters.smoke is not None:
        conditions.append("coalesce(smoke_run, false) = ?")
        values.append(filters.smoke)
    if filters.decision == "none":
        conditions.append("decision IS NULL")
    elif filters.decision:
        conditions.append("decision = ?")
        values.append(filters.decision)
    for metric, low, high in filters.ranges:
        if metric not in metrics():
            raise ValueError(f"unknown metric {metric!r}; filter by one of {metrics()}")
        for bound, operator in ((low, ">="), (high, "<=")):
            if bound is not None:
                conditions.append(f'"{metric}" {operator} ?')
                values.append(float(bound))
    return " AND ".join(conditions), values


def default_state_folder() -> str:
    """Where the collection states are kept: ``DIFFCOLOR_CACHE/review`` (else ``XDG_CACHE_HOME`` or
    ``~/.cache``, then ``diffcolor/review``): a local folder of this user's, whatever the output's storage."""
    return os.path.join(cache_root(), "review")


def _private(folder: str) -> bool:
    """Whether ``folder`` (made if missing, owner only) is this user's and writable by no one else: a state file
    another user could replace is not read."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        status = os.lstat(folder)
    except OSError as error:
        logger.warning("cannot use %s for the collection state: %s", folder, error)
        return False
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o022:
        logger.warning("%s is not a folder of this user's that only they can write: the collection state is kept "
                       "in a temporary folder instead", folder)
        return False
    return True


class StaleState(Exception):
    """A stored state that is not one this module wrote for this output (another format, edited, damaged)."""


class StillIndexing(Exception):
    """A page that needs the collection state, asked while it is built (``error``: None) or after its build
    failed (``error``: why)."""

    def __init__(self, error: str | None = None):
        self.error = error
        super().__init__(f"the collection state could not be built: {error}" if error else
                         "the collection is still being indexed")


class Page(tuple):
    """``(matching, rows)`` of :meth:`CollectionTable.page`, with ``building`` (the collection is still being
    indexed: the page was read from the runs in place, and filtered pages wait for the state) and ``runs`` (the
    runs the page shows, oldest first)."""

    building: bool
    runs: list[str]

    def __new__(cls, total: int, rows: list[dict], *, building: bool, runs: list[str]):
        page = super().__new__(cls, (total, rows))
        page.building, page.runs = building, runs
        return page


class CollectionTable:
    """The browsable table of one output root, refreshed from new runs (at most every REFRESH_SECONDS).

    The per-item state is stored in a DuckDB database file in a local cache folder
    (:func:`default_state_folder`; ``state_folder`` chooses another), keyed by the
    output root and naming the runs folded into it with their results files'
    fingerprints (size and modification time or ETag). At start the stored state
    is used when it is consistent with the output: the format this code writes,
    only tables of the expected columns (no views, macros or constraints), its runs
    still there unchanged and every other run later than them. A refresh that finds
    new runs folds only those in (their rows read from the results files where they
    lie, through the output's fsspec filesystem when not local); any other change
    (a run gone, changed or inserted before the last one folded, a damaged file)
    rebuilds the state from every run. A new state is written beside the stored
    one under a private name and renamed over it, so processes sharing the folder
    each read a whole state; pages are read with file access disabled, so a
    tampered state file can make a page wrong but cannot make it read anything
    else. A page is one query with its filters, order and limit; only the page's
    rows become Python objects.

    Building or folding the stored state runs in a background thread, so pages are
    served meanwhile and none shows an item's state wrong: new runs of at most
    OVERLAY_ROWS rows are folded at once, in memory, for the items they name, over
    the stored state (every page and filter answered at once); otherwise (the
    first start, a state rebuilt) the unfiltered pages are answered from the runs
    in place (the page's item ids first, then the state of those items alone, by
    the same queries as the build), and other pages wait for the state or say
    that it is being built (:class:`StillIndexing`). A build that fails is logged
    and tried again after RETRY_SECONDS; the pages go on as while it ran.
    """

    def __init__(self, output: str, *, memory_limit: str = "512MB", state_folder: str | None = None):
        self.output = output
        self._spill = tempfile.TemporaryDirectory(prefix="diffcolor-review-")  # removed with this table
        folder = state_folder or default_state_folder()
        folder = folder if _private(folder) else self._spill.name
        key = hashlib.sha256(f"{STATE_FORMAT}\0{output}".encode()).hexdigest()[:32]
        self.state_path = os.path.join(folder, f"collection-{key}.duckdb")
        self._memory_limit = memory_limit
        self._covered: list[tuple[str, str]] = []  # (run, fingerprint) folded into the open state, oldest first
        self._verified = False  # whether the open state's runs were checked against the output
        self._unreadable: set[str] = set()
        self._identity: tuple[int, int] | None = None  # (device, inode) of the open state file
        self._handle = None  # the open state file (copied when new runs are folded in)
        self._collections: list[str] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when a background build ends
        self._builder = None  # reads the runs, writes states: made when first needed (a restart may not)
        self._peeker = None  # reads the runs for pages and listings while the builder works
        self._listing: list[tuple[str, str, str]] | None = None  # the runs last listed (run, URI, fingerprint)
        self._overlay: list[tuple[str, str]] = []  # runs after the stored state's, folded into temp.overlay of _con
        self._stale = False  # whether the open state covers runs that changed or are gone: not shown
        self._task: threading.Thread | None = None  # the background build or fold
        self._base_handle = None  # the stored state the background fold copies
        self._failed: tuple[float, str, list] | None = None  # (when, why, of which runs) the last build failed
        self._attempted: tuple[tuple, int] | None = None  # (runs, items with an attempt) for in-place pages
        self._rows: dict[tuple[str, str], int] = {}  # rows of the results files (URI, fingerprint) read
        self._closing = False
        self._local = storage._is_local(storage.filesystem(output)[0])
        self._con = None
        self._open()
        # a query still running when the interpreter exits aborts it: interrupt it
        atexit.register(_stop, weakref.ref(self))

    def _connect(self, memory_limit: str | None = None):
        """A DuckDB connection in memory (spilling to this table's temporary folder) with the declared results
        columns as the empty table ``temp.declared``."""
        import duckdb

        connection = duckdb.connect(config={
            "memory_limit": memory_limit or self._memory_limit, "temp_directory": self._spill.name,
            "preserve_insertion_order": False, "autoinstall_known_extensions": False,
            "autoload_known_extensions": False})
        connection.execute("SET enable_progress_bar = false")
        connection.execute(f"CREATE TEMP TABLE declared ({_declared_columns()})")
        return connection

    @property
    def _build(self):
        """The connection the background thread builds and folds states on."""
        if self._builder is None:
            self._builder = self._reader()
        return self._builder

    @property
    def _peek(self):
        """The connection pages read the runs in place on, and listings check new runs on (under the lock)."""
        if self._peeker is None:
            self._peeker = self._reader(PEEK_MEMORY)
        return self._peeker

    def _reader(self, memory_limit: str | None = None):
        """A connection that reads the runs (through the output's filesystem) with the fold's macros."""
        connection = self._connect(memory_limit)
        if not self._local:
            connection.register_filesystem(storage.filesystem(self.output)[0])
        for macro in _MACROS:
            connection.execute(macro)
        return connection

    # 1. The stored state: opened read-only, checked, or none.

    def _open(self) -> bool:
        """Opens the stored state when there is one that passes :meth:`_check`; else keeps the open one (if any)."""
        import duckdb

        try:
            handle = open(self.state_path, "rb")  # noqa: SIM115  (kept open: the file this state was read from)
        except FileNotFoundError:
            return False
        identity = _identity(handle)
        if identity == self._identity:
            handle.close()
            return True
        connection = self._connect()
        try:
            expected = _expected_schema(connection)
            connection.execute(f"ATTACH {_literal(self.state_path)} AS state (READ_ONLY)")
            # what the file holds is data, never code or a path to read: no file access from here on
            connection.execute("SET enable_external_access = false")
            connection.execute("SET lock_configuration = true")
            if _identity(self.state_path) != identity:
                raise StaleState("replaced while it was opened")
            covered = self._check(connection, expected)
        except (duckdb.Error, StaleState, OSError) as error:
            connection.close()
            handle.close()
            logger.info("the stored collection state %s is not used (%s)", self.state_path,
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
            return False
        if self._con is not None:
            self._con.close()
            self._handle.close()
        self._con, self._handle, self._covered, self._verified = connection, handle, covered, False
        self._identity, self._collections, self._overlay, self._stale = identity, None, [], False
        return True

    def _check(self, connection, expected: dict[str, list]) -> list[tuple[str, str]]:
        """The runs the attached state covers. Raises StaleState where it is not a state this code wrote for this
        output: other tables or columns, constraints, another format or output, runs out of order. (Views and
        macros in it are never run: the queries name its tables, ``state.items``, and its macros are not on the
        search path.)"""
        tables = sorted(name for (name,) in connection.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'state'").fetchall())
        [(constraints,)] = connection.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE database_name = 'state'").fetchall()
        if constraints or tables != sorted(expected):
            raise StaleState(f"holds the tables {tables} and {constraints} constraints")
        for name, columns in expected.items():
            if connection.execute(f"DESCRIBE state.{name}").fetchall() != columns:
                raise StaleState(f"its {name} table has other columns")
        meta = dict(connection.execute("SELECT key, value FROM state.meta").fetchall())
        if meta != {"format": STATE_FORMAT, "output": self.output}:
            raise StaleState(f"it is format {meta.get('format')!r} of {meta.get('output')!r}")
        runs = connection.execute("SELECT seq, run, fingerprint FROM state.runs ORDER BY seq").fetchall()
        if [seq for seq, _, _ in runs] != list(range(len(runs))) or [run for _, run, _ in runs] != sorted(
                {run for _, run, _ in runs}):
            raise StaleState("its runs are out of order")
        return [(run, fingerprint) for _, run, fingerprint in runs]

    def close(self) -> None:
        """Closes the state and the query engine (the stored state stays for the next start); a background build
        still running is interrupted (its partial file is removed)."""
        with self._lock:
            self._closing, task = True, self._task
            if task is not None and self._builder is not None:
                self._builder.interrupt()
        if task is not None:
            task.join(timeout=30)
        with self._lock:
            for connection in (self._con, self._builder, self._peeker):
                if connection is not None:
                    connection.close()
            if self._handle is not None:
                self._handle.close()
            self._con = self._builder = self._peeker = self._handle = self._identity = None
            self._covered, self._overlay = [], []

    # 2. The runs of the output, and which of them the state lacks.
    @property
    def building(self) -> bool:
        """Whether the stored state lacks runs of the output (being built or folded in, in the background)."""
        with self._lock:
            return not self._settled()

    @property
    def build_error(self) -> str | None:
        """Why the last background build failed, while it is not built again; else None."""
        with self._lock:
            return self._failed[1] if self._failed else None

    def refresh(self, *, wait: bool = True) -> None:
        """Re-lists ``runs/`` now and folds in any new run; with ``wait``, until the stored state covers them all
        (raises :class:`StillIndexing` when its build fails)."""
        with self._lock:
            self._refresh()
            if wait:
                self._wait(self._settled, None)

    def _fresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._checked > REFRESH_SECONDS:
                self._refresh()

    def _listed_runs(self) -> list[tuple[str, str]]:
        return [(run, fingerprint) for run, _, fingerprint in self._listing or ()]

    def _current(self) -> bool:
        """Whether the open connection shows every run listed (the stored state, and the overlay's runs)."""
        return (self._con is not None and not self._stale and self._listing is not None
                and self._covered + self._overlay == self._listed_runs())

    def _settled(self) -> bool:
        """Whether the stored state covers every run listed, and no build runs."""
        return self._task is None and self._current() and not self._overlay

    def _refresh(self) -> None:
        """Lists the runs (lock held). A stored state that lacks runs (or covers runs that changed) is built or
        folded in the background; new runs after the stored state's, when few, are shown meanwhile over it (see
        :meth:`page`)."""
        self._open()  # a state another process stored meanwhile
        files = self._listed()
        listed = [(run, fingerprint) for run, _, fingerprint in files]
        self._listing, self._checked = files, time.monotonic()
        if self._con is not None and listed[:len(self._covered)] == self._covered:
            self._verified, self._stale = True, False
            if self._overlay and listed[:len(self._covered) + len(self._overlay)] != self._covered + self._overlay:
                self._show([])  # an overlay run gone or changed: the stored state alone
        else:
            self._stale = self._con is not None
            self._overlay = []
        if self._task is None and (self._stale or self._con is None or self._covered != listed) and not (
                self._failed and self._failed[2] == listed and time.monotonic() - self._failed[0] < RETRY_SECONDS):
            base = None if self._stale or self._con is None else list(self._covered)
            self._base_handle = None if base is None else os.fdopen(os.dup(self._handle.fileno()), "rb")
            self._task = threading.Thread(target=self._background, args=(files[len(base or ()):], base),
                                          name="collection-state", daemon=True)
            self._task.start()

    def _background(self, files: list[tuple[str, str, str]], base: list[tuple[str, str]] | None) -> None:
        """Stores the state with ``files`` folded into ``base`` (or built from them); logs a failure."""
        failed = None
        try:
            with self._lock:  # after the page being answered (its listing started this build)
                closing = self._closing
            if not closing:
                self._store(files, base)
        except Exception as error:  # noqa: BLE001  (pages go on from the runs; tried again later)
            failed = (time.monotonic(), f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                      [*(base or ()), *((run, fingerprint) for run, _, fingerprint in files)])
            if not self._closing:
                logger.error("building the collection state %s failed (pages are answered from the runs meanwhile; "
                             "tried again in %.0f s or when the runs change): %s", self.state_path, RETRY_SECONDS,
                             failed[1],
                             exc_info=not isinstance(error, OSError))
        with self._lock:
            self._task, self._failed = None, failed
            if self._base_handle is not None:
                self._base_handle.close()
                self._base_handle = None
            try:
                if not self._closing:
                    self._refresh()  # the state stored (or another's), and what was published meanwhile
            except Exception as error:  # noqa: BLE001  (the next page lists the runs again)
                logger.warning("listing the runs of %s failed: %s", storage.redact(self.output), error)
                self._checked = 0.0
            finally:
                self._changed.notify_all()

    def _wait(self, ready, wait: float | None) -> None:
        """Waits (lock held) until ``ready()``, at most ``wait`` seconds (None: however long the build takes).
        Raises StillIndexing when the time is up, or when the build failed."""
        deadline = None if wait is None else time.monotonic() + wait
        while not ready():
            if self._task is None:
                self._refresh()  # nothing under way: list again (and start what is missing, unless it just failed)
                if ready():
                    return
                if self._task is None:
                    raise StillIndexing(self._failed[1] if self._failed else "the collection state could not be "
                                        "opened")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise StillIndexing(None)
            self._changed.wait(left)

    def _new(self) -> list[tuple[str, str, str]] | None:
        """The runs listed after the stored state's when they are few (at most OVERLAY_ROWS rows): shown over it
        before they are folded in; else None (no state, a stale one, or many new rows)."""
        if self._con is None or self._stale or self._listing is None:
            return None
        if self._listed_runs()[:len(self._covered)] != self._covered:
            return None
        new = self._listing[len(self._covered):]
        rows = 0
        for _, uri, fingerprint in new:
            if (uri, fingerprint) not in self._rows:
                [(count,)] = self._peek.execute("SELECT sum(num_rows) FROM parquet_file_metadata(?)",
                                                [self._path(uri)]).fetchall()
                self._rows[uri, fingerprint] = count or 0
            rows += self._rows[uri, fingerprint]
        return new if rows <= OVERLAY_ROWS else None

    def _show(self, new: list[tuple[str, str, str]]) -> None:
        """Opens the stored state again with the runs ``new`` (those after its own) folded in memory into
        ``temp.overlay`` for the items they name (none: the stored state alone)."""
        import duckdb

        if not new:
            self._identity = None
            self._open()
            return
        connection = None
        try:
            connection = self._reader(PEEK_MEMORY)
            connection.execute(f"ATTACH {_literal(self.state_path)} AS state (READ_ONLY)")
            if _identity(self.state_path) != self._identity:
                raise StaleState("replaced meanwhile")
            self._fold_on(connection, new, len(self._covered), overlay=True)
            connection.execute("SET enable_external_access = false")
            connection.execute("SET lock_configuration = true")
        except (duckdb.Error, StaleState, OSError) as error:
            if connection is not None:
                connection.close()
            self._overlay = []
            logger.info("the new runs are shown once folded into the stored state (%s)",
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
            return
        self._con.close()
        self._con, self._overlay, self._collections = connection, [(run, mark) for run, _, mark in new], None

    def _listed(self) -> list[tuple[str, str, str]]:
        """``(run, results URI, fingerprint)`` of the runs with a readable results file, oldest first; the open
        state's runs keep the fingerprints checked once (results files are published whole, never rewritten)."""
        try:  # a runs/ folder or run that is a link out of the output is not read (storage.confine)
            runs = storage.list_folders(storage.confine(self.output, OutputLayout(self.output).runs))
        except storage.OutsideRootError as error:
            logger.warning("%s", error)
            runs = []
        known = dict(self._covered) if self._verified else {}
        files = []
        for run in sorted(runs):
            name = run.rstrip("/").rsplit("/", 1)[-1]
            try:
                uri = storage.confine(self.output, RunLayout(run).results)
            except storage.OutsideRootError as error:
                logger.warning("%s", error)
                continue
            if name in known:
                files.append((name, uri, known[name]))
            elif name not in self._unreadable:
                fingerprint = _fingerprint(uri)  # a run under way has no results yet: look again next time
                if fingerprint is not None and (name in dict(self._covered) or self._readable(name, uri)):
                    files.append((name, uri, fingerprint))
        return files

    def _path(self, uri: str) -> str:
        return storage.filesystem(uri)[1] if self._local else uri

    def _readable(self, run: str, uri: str) -> bool:
        """Whether the results file of a new run is Parquet (its footer read); one that is not is left out, once
        warned about (results files are published whole: it will not become readable)."""
        import duckdb

        try:
            self._peek.execute("SELECT count(*) FROM parquet_schema(?)", [self._path(uri)]).fetchall()
            return True
        except duckdb.Error as error:
            logger.warning("%s is not a readable results table, left out of the collection: %s", storage.redact(uri),
                           str(error).splitlines()[0])
            self._unreadable.add(run)
            return False

    # 3. A new state: the stored one (or none) with the new runs folded in, stored whole under a private name,
    # then renamed over the stored one (in the background thread).
    def _store(self, files: list[tuple[str, str, str]], base: list[tuple[str, str]] | None) -> None:
        staging = f"{self.state_path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        _remove_stale_staging(self.state_path)
        try:
            if base is not None:  # the open state's own file (the path may name a newer one by now)
                self._copy_open_state(staging)
            self._build.execute(f"ATTACH {_literal(staging)} AS state")
            try:
                if base is None:
                    for statement in _schema_sql("state"):
                        self._build.execute(statement)
                    self._build.execute("INSERT INTO state.meta VALUES ('format', ?), ('output', ?)",
                                        [STATE_FORMAT, self.output])
                self._fold(files, len(base or ()))
                self._build.execute("CHECKPOINT state")
            finally:
                self._build.execute("DETACH state")
            os.replace(staging, self.state_path)
        finally:
            for leftover in (staging, staging + ".wal"):
                if os.path.exists(leftover):
                    os.remove(leftover)
        # another process may store its state meanwhile: whichever is there now is opened (a whole one, checked)
        with self._lock:
            if not any(self._open() for _ in range(3)):
                logger.warning("the collection state %s changed while it was opened; looking again at the next "
                               "refresh", self.state_path)

    def _copy_open_state(self, staging: str) -> None:
        """Copies the stored state the fold started from (the one checked, whatever the path names now)."""
        self._base_handle.seek(0)
        with open(staging, "xb") as target:
            shutil.copyfileobj(self._base_handle, target, 1 << 20)

    def _fold(self, files: list[tuple[str, str, str]], base: int) -> None:
        """Folds the runs ``files`` (oldest first, later than every run the attached state covers) into it."""
        self._fold_on(self._build, files, base)

    def _fold_on(self, connection, files: list[tuple[str, str, str]], base: int, *, only: list[str] | None = None,
                 overlay: bool = False) -> None:
        """Folds ``files`` into the state attached to ``connection`` as ``state``: the items ``only`` names (else
        every item), into ``temp.overlay`` with ``overlay`` (the attached state read only)."""
        paths = [self._path(uri) for _, uri, _ in files]
        if paths:
            source = _source(only)
            parameters = {"paths": paths, "base": base}
            if only is not None:  # the few rows of these items, read once
                connection.execute(f"CREATE OR REPLACE TEMP TABLE wanted AS SELECT * FROM {source}", {"paths": paths})
                source = "temp.wanted"
            connection.execute(_PLAN_SQL.format(rows=_ROWS.format(ord=_ORD, source=source)),
                               {**parameters, "part_items": PART_ITEMS})
            [(parts,)] = connection.execute("SELECT coalesce(max(part) + 1, 0) FROM temp.plan").fetchall()
            merged, into = _merged_sql(source), "temp.overlay" if overlay else "temp.merged" if base else "state.items"
            if into != "state.items":  # the items the new runs name are replaced
                connection.execute(f"CREATE OR REPLACE TEMP TABLE {into.split('.')[1]} AS SELECT * FROM state.items "
                                   "LIMIT 0")
            for part in range(parts):  # item id ranges of PART_ITEMS, each folded whole in bounded memory
                if self._closing and connection is self._builder:
                    raise InterruptedError("the collection table is closing")
                connection.execute(_CATALOGUES_SQL.format(ord=_ORD, source=source), {**parameters, "part": part})
                connection.execute(f"INSERT INTO {into} BY NAME {merged}", {**parameters, "part": part})
                if into == "state.items" and only is None:
                    connection.execute("CHECKPOINT state")  # the part written out: its memory is free again
            if into == "temp.merged":
                connection.execute("DELETE FROM state.items WHERE item_id IN (SELECT item_id FROM temp.plan)")
                connection.execute("INSERT INTO state.items BY NAME SELECT * FROM temp.merged ORDER BY item_id")
                connection.execute("DROP TABLE temp.merged")
            connection.execute("DROP TABLE temp.plan; DROP TABLE IF EXISTS temp.catalogues; "
                               "DROP TABLE IF EXISTS temp.wanted")
        if files and not overlay:
            connection.executemany("INSERT INTO state.runs VALUES (?, ?, ?)", [
                [base + index, run, fingerprint] for index, (run, _, fingerprint) in enumerate(files)])

    # 4. Pages.
    def _items(self) -> str:
        """The open state's items as SQL: the stored ones, those the overlay's runs name replaced."""
        if not self._overlay:
            return "state.items"
        return ("(SELECT * FROM state.items ANTI JOIN temp.overlay USING (item_id) "
                "UNION ALL BY NAME SELECT * FROM temp.overlay)")

    def table(self, *, refresh: bool = False) -> pa.Table:
        """The whole table as Arrow (every row: for tests and exports, not for pages), once the state is stored."""
        if refresh:
            self.refresh()
        else:
            self._fresh()
        with self._lock:
            self._wait(self._settled, None)
            return _arrow(self._con.execute(f"SELECT {_shown()} FROM {self._items()} WHERE _latest_ord IS NOT NULL "
                                            "ORDER BY item_id"))

    def page(self, filters: Filters, offset: int = 0, limit: int = 48, *, wait: float | None = None) -> Page:
        """``(matching, rows)``: how many items pass ``filters`` and the ``limit`` rows from ``offset``, as a
        :class:`Page`. While the state is built, an unfiltered page is read from the runs in place; a filtered
        one waits for the state at most ``wait`` seconds (None: however long), then raises StillIndexing."""
        import duckdb

        where, values = _where(filters)
        offset, limit = max(0, offset), max(0, limit)
        with self._lock:  # held from the listing on: a background build it starts begins once this page is served
            if time.monotonic() - self._checked > REFRESH_SECONDS:
                self._refresh()
            new = None if self._current() else self._new()
            if not self._current() and filters == Filters():
                try:
                    total, rows = self._over_state(new, offset, limit) if new else self._in_place(offset, limit)
                except (OSError, duckdb.IOException) as error:  # a run gone since the listing: listed again
                    logger.info("the runs changed while a page was read from them (%s)", str(error).splitlines()[0])
                    self._refresh()
                    new = None if self._current() else self._new()
                    total, rows = self._over_state(new, offset, limit) if new else self._in_place(offset, limit)
            else:
                self._ready(wait)
                items = self._items()
                [(total,)] = self._con.execute(f"SELECT count(*) FROM {items} WHERE {where}", values).fetchall()
                rows = _arrow(self._con.execute(_page_sql(where, items), [*values, limit, offset])).to_pylist()
            building = not self._current() and self._new() is None
            return Page(total, rows, building=building, runs=[run for run, _ in self._listed_runs()])

    def _ready(self, wait: float | None) -> None:
        """Makes the open connection show every run listed (lock held): new runs folded in memory over the stored
        state where they are few, else once the background build is done (at most ``wait`` seconds)."""
        if not self._current():
            new = self._new()
            if new is not None:
                self._show(new)
        self._wait(self._current, wait)

    def _over_state(self, new: list[tuple[str, str, str]], offset: int, limit: int) -> tuple[int, list[dict]]:
        """An unfiltered page from the stored state and the few runs ``new`` after it: the page's item ids (of
        either), then those runs folded over the stored state for these items alone."""
        import duckdb

        paths = [self._path(uri) for _, uri, _ in new]
        attempted = "SELECT item_id FROM state.items WHERE _latest_ord IS NOT NULL"
        try:
            self._peek.execute(f"ATTACH {_literal(self.state_path)} AS state (READ_ONLY)")
            if _identity(self.state_path) != self._identity:
                raise StaleState("replaced meanwhile")
            self._peek.execute(f"CREATE OR REPLACE TEMP TABLE fresh AS SELECT DISTINCT item_id FROM ({_ATTEMPTED})",
                               {"paths": paths})
            key = tuple(self._listed_runs())
            if self._attempted is None or self._attempted[0] != key:
                # the stored state's attempted items, and the new runs' less those among them (a semi join built
                # on the new runs' few ids)
                [(count,)] = self._peek.execute(f"SELECT (SELECT count(*) FROM ({attempted})) + (SELECT count(*) FROM "
                                                f"temp.fresh) - (SELECT count(*) FROM ({attempted}) WHERE item_id IN "
                                                "(SELECT item_id FROM temp.fresh))").fetchall()
                self._attempted = (key, count)
            wanted = offset + limit
            ids = [item_id for (item_id,) in self._peek.execute(
                f"SELECT item_id FROM (({attempted} ORDER BY item_id LIMIT $wanted) UNION (SELECT item_id FROM "
                "temp.fresh ORDER BY item_id LIMIT $wanted)) ORDER BY item_id LIMIT $limit OFFSET $offset",
                {"wanted": wanted, "limit": limit, "offset": offset}).fetchall()]
            if not ids:
                return self._attempted[1], []
            self._fold_on(self._peek, new, len(self._covered), only=ids, overlay=True)
            listed = ", ".join(_literal(item_id) for item_id in ids)
            items = (f"(SELECT * FROM (SELECT * FROM state.items WHERE item_id IN ({listed})) ANTI JOIN temp.overlay "
                     "USING (item_id) UNION ALL BY NAME SELECT * FROM temp.overlay)")
            rows = _arrow(self._peek.execute(_page_sql("_latest_ord IS NOT NULL", items), [limit, 0]))
            return self._attempted[1], rows.to_pylist()
        except (duckdb.Error, StaleState, OSError) as error:
            failed = str(error).splitlines()[0] if str(error) else type(error).__name__
        finally:
            self._peek.execute("DROP TABLE IF EXISTS temp.fresh; DROP TABLE IF EXISTS temp.overlay")
            self._peek.execute("DETACH DATABASE IF EXISTS state")
        logger.info("a page over the stored state was read from the runs instead (%s)", failed)
        self._attempted = None
        return self._in_place(offset, limit)

    def _in_place(self, offset: int, limit: int) -> tuple[int, list[dict]]:
        """An unfiltered page from the runs listed, in place: the page's item ids (a top-N of the attempted items'
        ids), then the state of those items alone, folded from every run as the build folds it."""
        files = self._listing or []
        paths = [self._path(uri) for _, uri, _ in files]
        if not paths:
            return 0, []
        key = tuple(self._listed_runs())
        if self._attempted is None or self._attempted[0] != key:
            [(count,)] = self._peek.execute(f"SELECT count(DISTINCT item_id) FROM ({_ATTEMPTED})",
                                            {"paths": paths}).fetchall()
            self._attempted = (key, count)
        ids = self._page_ids(paths, offset, limit)
        if not ids:
            return self._attempted[1], []
        self._peek.execute("ATTACH ':memory:' AS state")
        try:
            for statement in _schema_sql("state"):
                self._peek.execute(statement)
            self._fold_on(self._peek, files, 0, only=ids)
            rows = _arrow(self._peek.execute(_page_sql("_latest_ord IS NOT NULL", "state.items"), [limit, 0]))
        finally:
            self._peek.execute("DETACH state")
        return self._attempted[1], rows.to_pylist()

    def _page_ids(self, paths: list[str], offset: int, limit: int) -> list[str]:
        """The ids of the attempted items ``offset`` to ``offset + limit`` in item order: near the start, from the
        smallest ids of the rows (a top-N, however many rows an item has, fetched again with more rows until
        enough distinct ids are found); deeper, grouped by item."""
        wanted = offset + limit
        if wanted <= IN_PLACE_TOP:
            fetch = 2 * wanted
            while True:
                found = [item_id for (item_id,) in self._peek.execute(
                    f"{_ATTEMPTED} ORDER BY item_id LIMIT $fetch", {"paths": paths, "fetch": fetch}).fetchall()]
                distinct = list(dict.fromkeys(found))
                if len(distinct) >= wanted or len(found) < fetch:
                    return distinct[offset:wanted]
                fetch *= 4
        return [item_id for (item_id,) in self._peek.execute(
            f"SELECT item_id FROM ({_ATTEMPTED}) GROUP BY item_id ORDER BY item_id LIMIT $limit OFFSET $offset",
            {"paths": paths, "limit": limit, "offset": offset}).fetchall()]

    def collections(self, *, wait: float | None = None) -> list[str]:
        """The distinct collection names, for the filter's choices (as :meth:`page` waits for a filtered page)."""
        self._fresh()
        with self._lock:
            self._ready(wait)
            if self._collections is None:
                values = self._con.execute(f"SELECT DISTINCT collection FROM {self._items()} WHERE collection IS NOT "
                                           "NULL AND collection <> '' AND _latest_ord IS NOT NULL").fetchall()
                self._collections = sorted(value for (value,) in values)
            return list(self._collections)


_DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.large_string(): "VARCHAR", pa.int64(): "BIGINT", pa.int32(): "INTEGER",
                 pa.float64(): "DOUBLE", pa.float32(): "FLOAT", pa.bool_(): "BOOLEAN"}


def _declared_columns() -> str:
    """The declared results columns this table reads, as SQL column definitions."""
    schema = declarations.with_columns(pa.table({"item_id": pa.array([], pa.string())})).select(list(_read())).schema
    unknown = [field for field in schema if field.type not in _DUCKDB_TYPES]
    if unknown:
        raise TypeError(f"no DuckDB type for the declared results column {unknown[0].name!r} ({unknown[0].type})")
    return ", ".join(f'"{field.name}" {_DUCKDB_TYPES[field.type]}' for field in schema)


def _expected_schema(connection) -> dict[str, list]:
    """How DuckDB describes the stored state's tables, made in memory on ``connection``."""
    connection.execute("ATTACH ':memory:' AS template")
    for statement in _schema_sql("template"):
        connection.execute(statement)
    expected = {name: connection.execute(f"DESCRIBE template.{name}").fetchall() for name in ("items", "meta", "runs")}
    connection.execute("DETACH template")
    return expected


def _fingerprint(uri: str) -> str | None:
    """The size and modification time (or ETag) of the file at ``uri``; None when there is none."""
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    except Exception as error:
        if not storage._is_backend_error(error):
            raise
        raise storage.backend_error(uri, "checking", error, fs) from error
    if info.get("type") not in (None, "file"):
        return None
    stamp = next((info[key] for key in ("ETag", "etag", "mtime", "LastModified", "last_modified") if info.get(key)),
                 "")
    return f"{info.get('size')}:{stamp}"


def _literal(text: str) -> str:
    """``text`` as an SQL string literal (ATTACH takes no parameters)."""
    return "'" + text.replace("'", "''") + "'"


def _identity(file) -> tuple[int, int]:
    """(device, inode) of an open file or a path: which file it is, whatever its name."""
    status = os.fstat(file.fileno()) if hasattr(file, "fileno") else os.stat(file)
    return status.st_dev, status.st_ino


def _remove_stale_staging(state_path: str, older_than: float = 3600.0) -> None:
    """Removes the staging files a killed process left beside ``state_path`` (those older than an hour)."""
    folder, name = os.path.split(state_path)
    for leftover in os.listdir(folder):
        if leftover.startswith(name + ".") and leftover.endswith((".tmp", ".tmp.wal")):
            try:
                if time.time() - os.lstat(os.path.join(folder, leftover)).st_mtime > older_than:
                    os.remove(os.path.join(folder, leftover))
            except OSError:
                pass  # removed by another process meanwhile


def _arrow(result) -> pa.Table:
    """A query's rows as one Arrow table (``to_arrow_table`` in newer DuckDB, ``fetch_arrow_table`` in older)."""
    fetch = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    return fetch()


def _page_sql(where: str, items: str = "state.items") -> str:
    """One page of ``items``: its item ids found first (sorting the ids only, not the rows), then their rows."""
    return (f"SELECT {_shown()} FROM {items} WHERE item_id IN (SELECT item_id FROM {items} WHERE {where} "
            "ORDER BY item_id LIMIT ? OFFSET ?) ORDER BY item_id")


def _stop(table: weakref.ref) -> None:
    """Interrupts a query of ``table`` still running at exit, waits for its background build to end and closes the
    table (a thread still in the query engine, or a connection left open, when the interpreter ends aborted the
    process: "terminate called without an active exception")."""
    running = table()
    if running is None:
        return
    running._closing = True
    for connection in (running._builder, running._peeker, running._con):
        if connection is not None:
            try:
                connection.interrupt()
            except Exception:  # noqa: BLE001  (closed meanwhile)
                pass
    task = running._task
    if task is not None:
        task.join(timeout=60)
    try:  # the connections closed now: the query engine's threads must not meet the interpreter's finalisation
        running.close()
    except Exception:  # noqa: BLE001  (closed meanwhile, or a build that did not end: nothing more to do at exit)
        pass
