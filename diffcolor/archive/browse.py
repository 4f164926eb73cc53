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

:class:`CollectionTable` queries the runs' results files where they lie
(DuckDB over Parquet, local or through the output's fsspec filesystem): a
refresh that finds a new run rebuilds the state inside DuckDB, and a page is
one query with its filters, order and limit, so only the page's rows become
Python objects (first page about 2 s at a million records on two busy cores,
peak memory under 1 GiB: ``python -m review.bench --items 1000000``).
:func:`latest_per_item` and :func:`filter_table` are the same rules over an
in-memory Arrow table.
"""

from __future__ import annotations

import atexit
import json
import logging
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from diffcolor.archive import storage
from diffcolor.archive.layout import OutputLayout, RunLayout
from diffcolor.common import record as declarations

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


# Each row's place in the history: its run's position (oldest first), then its row in the run's file.
_ORD = "(list_position($paths, filename) - 1) * 4294967296 + file_row_number"
_SOURCE = "read_parquet($paths, filename = true, file_row_number = true, union_by_name = true)"

# The per-item state but the catalogue, in one pass over the narrow columns (record_json is not read): per item,
# its latest attempt, its current version's row (the highest version done or skipped as done; its latest done row,
# else its latest skip) and its latest decision (a review run's rows repeat a decided version: they carry
# decisions, not outcomes).
_ITEMS_SQL = """
CREATE OR REPLACE TABLE items AS
WITH rows AS NOT MATERIALIZED (
    SELECT * EXCLUDE (record_json), {ord} AS ord
    FROM (SELECT * FROM {source} UNION ALL BY NAME SELECT * FROM declared)),
picked AS MATERIALIZED (
    SELECT item_id, latest, coalesce(best, latest) AS own, best IS NOT NULL AS done, decided
    FROM (SELECT item_id, max(ord) FILTER (WHERE decision IS NULL) AS latest,
                 arg_max(ord, {{'version': coalesce(version, 0), 'done': status = 'done', 'ord': ord}})
                     FILTER (WHERE decision IS NULL AND status IN ('done', 'skipped_done')) AS best,
                 max(ord) FILTER (WHERE decision IS NOT NULL) AS decided
          FROM rows GROUP BY item_id)
    WHERE latest IS NOT NULL)
SELECT picked.item_id, {current},
       CASE WHEN picked.latest <> picked.own THEN latest.status END AS latest_status,
       CASE WHEN picked.latest <> picked.own THEN latest.error_message END AS latest_error,
       CASE WHEN picked.latest <> picked.own THEN latest.created_at END AS latest_at,
       decided.decision AS decision, decided.version AS decided_version, decided.decided_by AS decided_by,
       decided.decided_at AS decided_at, picked.latest AS latest_ord, picked.own AS own_ord
FROM picked JOIN rows AS own ON own.ord = picked.own
JOIN (SELECT ord, status, error_message, created_at FROM rows) AS latest ON latest.ord = picked.latest
LEFT JOIN (SELECT ord, decision, version, decided_by, decided_at FROM rows) AS decided ON decided.ord = picked.decided
"""

# The catalogue shown for the items ``want`` names: the latest attempt's when it has one, else the current row's.
_CATALOGUE_SQL = """
WITH raw AS MATERIALIZED (
    SELECT ord, record_json, json_extract(record_json, '$.catalogue') AS catalogue
    FROM (SELECT record_json, {ord} AS ord FROM {source} {pushed})
    WHERE ord IN (SELECT latest_ord FROM want UNION ALL SELECT own_ord FROM want)),
chosen AS (
    SELECT want.item_id, CASE WHEN latest.record_json IS DISTINCT FROM own.record_json
                                   AND catalogue_nonempty(latest.catalogue)
                              THEN latest.catalogue ELSE own.catalogue END AS catalogue
    FROM want LEFT JOIN raw AS latest ON latest.ord = want.latest_ord LEFT JOIN raw AS own ON own.ord = want.own_ord),
mapped AS (SELECT item_id, CASE WHEN json_type(catalogue) = 'OBJECT' THEN catalogue::MAP(VARCHAR, JSON) END AS m
           FROM chosen)
SELECT item_id, coalesce(catalogue_text(m), '') AS catalogue_text, catalogue_value(m['collection']) AS collection
FROM mapped
"""

# A catalogue value (JSON) as Python's f"{value}" writes it (strings as they are, True/False); null for null or "".
_MACROS = ("""CREATE OR REPLACE MACRO catalogue_value(v) AS CASE
               WHEN v IS NULL OR json_type(v) = 'NULL' THEN NULL
               WHEN json_type(v) = 'BOOLEAN' THEN CASE WHEN v::BOOLEAN THEN 'True' ELSE 'False' END
               ELSE nullif(json_extract_string(v, '$'), '') END""",
           """CREATE OR REPLACE MACRO catalogue_nonempty(c) AS CASE json_type(c)
               WHEN 'OBJECT' THEN len(json_keys(c)) > 0 WHEN 'ARRAY' THEN json_array_length(c) > 0
               WHEN 'VARCHAR' THEN json_extract_string(c, '$') <> '' WHEN 'BIGINT' THEN c::DOUBLE <> 0
               WHEN 'UBIGINT' THEN c::DOUBLE <> 0 WHEN 'DOUBLE' THEN c::DOUBLE <> 0
               WHEN 'BOOLEAN' THEN c::BOOLEAN ELSE false END""",
           f"""CREATE OR REPLACE MACRO catalogue_text(m) AS array_to_string(
               list_transform(list_filter(list_concat(
                   list_filter({list(CATALOGUE_FIRST)}, k -> list_contains(map_keys(m), k)),
                   list_sort(list_filter(map_keys(m), k -> NOT list_contains({list(CATALOGUE_FIRST)}, k)))),
                   k -> catalogue_value(m[k]) IS NOT NULL),
                   k -> replace(k, '_', ' ') || ': ' || catalogue_value(m[k])), '; ')""")


def _items_sql(source: str) -> str:
    """The query that builds the per-item state (the catalogue aside) from ``source`` (the rows of every run)."""
    own = [name for name in _read() if name not in ("item_id", "decision", "decided_by", "decided_at", "record_json")]
    current = ["CASE WHEN picked.done THEN 'done' ELSE own.status END AS status" if name == "status" else
               f'own."{name}"' for name in own]
    return _ITEMS_SQL.format(ord=_ORD, source=source, current=", ".join(current))


def _catalogue_sql(*, pushed: str = "") -> str:
    return _CATALOGUE_SQL.format(ord=_ORD, source=_SOURCE, pushed=pushed)


def _where(filters: Filters) -> tuple[str, list]:
    """The SQL condition and its parameters for ``filters``. Raises ValueError naming an unknown metric."""
    conditions, values = ["true"], []
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


class CollectionTable:
    """The browsable table of one output root, refreshed from new runs (at most every REFRESH_SECONDS).

    The runs' results files are queried where they lie (DuckDB's ``read_parquet``,
    through the output's fsspec filesystem when it is not local). A refresh that
    finds a new run rebuilds the per-item state as a table inside DuckDB from the
    narrow columns; the catalogues (parsed from each shown row's record JSON, the
    costly part) are then built in the background. Until they are, a page reads
    the record JSON of its own rows only (the scan skips to those rows), and a
    filter by text or collection waits for them. A page is one query with the
    filters, the order and the limit in it; only the page's rows become Python
    objects.
    """

    def __init__(self, output: str, *, memory_limit: str = "512MB"):
        import duckdb

        self.output = output
        self._spill = tempfile.TemporaryDirectory(prefix="diffcolor-review-")  # removed with this table
        self._runs: list[str] = []
        self._unreadable: set[str] = set()
        self._paths: list[str] = []
        self._catalogues: threading.Thread | None = None
        self._failed: BaseException | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": self._spill.name,
                                           "preserve_insertion_order": False, "autoinstall_known_extensions": False,
                                           "autoload_known_extensions": False})
        fs, _ = storage.filesystem(output)
        self._local = storage._is_local(fs)
        if not self._local:
            self._con.register_filesystem(fs)
        for macro in _MACROS:
            self._con.execute(macro)
        declared = declarations.with_columns(pa.table({"item_id": pa.array([], pa.string())})).select(list(_read()))
        self._con.register("declared_arrow", declared)
        self._con.execute("CREATE TABLE declared AS SELECT * FROM declared_arrow")
        self._con.unregister("declared_arrow")
        self._build([])
        # a query still running when the interpreter exits aborts it: interrupt it and wait
        atexit.register(_stop, weakref.ref(self))

    def refresh(self) -> None:
        """Re-lists ``runs/`` now and folds in any new run."""
        with self._lock:
            self._refresh()

    def _fresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._checked > REFRESH_SECONDS:
                self._refresh()

    def _refresh(self) -> None:
        try:  # a runs/ folder or run that is a link out of the output is not read (storage.confine)
            runs = storage.list_folders(storage.confine(self.output, OutputLayout(self.output).runs))
        except storage.OutsideRootError as error:
            logger.warning("%s", error)
            runs = []
        files = []
        for run in sorted(runs):
            try:
                uri = storage.confine(self.output, RunLayout(run).results)
            except storage.OutsideRootError as error:
                logger.warning("%s", error)
                continue
            if run in self._runs or (run not in self._unreadable and storage.exists(uri) and self._readable(run, uri)):
                files.append((run, uri))  # a run under way has no results yet: look again next time
        if [run for run, _ in files] != self._runs:
            self._build([storage.filesystem(uri)[1] if self._local else uri for _, uri in files])
            self._runs = [run for run, _ in files]
        self._checked = time.monotonic()

    def _readable(self, run: str, uri: str) -> bool:
        """Whether the results file of a new run is Parquet (its footer read); one that is not is left out, once
        warned about (results files are published whole: it will not become readable)."""
        import duckdb

        try:
            self._con.execute("SELECT count(*) FROM parquet_schema(?)",
                              [storage.filesystem(uri)[1] if self._local else uri]).fetchall()
            return True
        except duckdb.Error as error:
            logger.warning("%s is not a readable results table, left out of the collection: %s", storage.redact(uri),
                           str(error).splitlines()[0])
            self._unreadable.add(run)
            return False

    def _build(self, paths: list[str]) -> None:
        """Rebuilds the ``items`` table from the results files ``paths`` (oldest run first), then, in the
        background, its catalogues."""
        if self._catalogues is not None:
            self._catalogues.join()
        self._con.execute("DROP TABLE IF EXISTS catalogues")
        if not paths:
            self._con.execute(_items_sql("(SELECT *, NULL::VARCHAR AS filename, NULL::BIGINT AS file_row_number "
                                         "FROM declared)"), {"paths": []})
            self._con.execute("CREATE TABLE catalogues (item_id VARCHAR, catalogue_text VARCHAR, collection VARCHAR)")
            self._paths, self._catalogues = paths, None
            return
        self._con.execute(_items_sql(_SOURCE), {"paths": paths})
        self._paths, self._failed = paths, None
        cursor = self._con.cursor()

        def build() -> None:
            try:
                cursor.execute("CREATE TABLE catalogues AS " + _catalogue_sql().replace(
                    "WITH raw", "WITH want AS (SELECT item_id, latest_ord, own_ord FROM items), raw", 1),
                    {"paths": paths})
            except BaseException as error:  # noqa: BLE001  (raised where the catalogues are needed)
                self._failed = error
            finally:
                cursor.close()

        self._catalogues = threading.Thread(target=build, name="catalogues", daemon=True)
        self._catalogues.start()
        self._cursor = cursor

    def _ready(self, wait: bool) -> bool:
        """Whether the catalogues table is built (waiting for it when ``wait``)."""
        if self._catalogues is not None and (wait or not self._catalogues.is_alive()):
            self._catalogues.join()
            self._catalogues = None
            if self._failed is not None:
                raise self._failed
        return self._catalogues is None

    def table(self, *, refresh: bool = False) -> pa.Table:
        """The whole table as Arrow (every row: for tests and exports, not for pages)."""
        if refresh:
            self.refresh()
        else:
            self._fresh()
        with self._lock:
            self._ready(wait=True)
            return _arrow(self._con.execute(f"SELECT {_SHOWN} FROM items LEFT JOIN catalogues USING (item_id) "
                                            "ORDER BY item_id"))

    def page(self, filters: Filters, offset: int = 0, limit: int = 48) -> tuple[int, list[dict]]:
        """``(matching, rows)``: how many items pass ``filters`` and the ``limit`` rows from ``offset``."""
        where, values = _where(filters)
        self._fresh()
        with self._lock:
            if self._ready(wait=bool(filters.text or filters.collection)):
                source = "items LEFT JOIN catalogues USING (item_id)"
                [(total,)] = self._con.execute(f"SELECT count(*) FROM {source} WHERE {where}", values).fetchall()
                return total, _arrow(self._con.execute(_page_sql(source, where, _SHOWN),
                                                       [*values, max(0, limit), max(0, offset)])).to_pylist()
            # the catalogues are still being built: this page's own, from its rows' record JSON only
            [(total,)] = self._con.execute(f"SELECT count(*) FROM items WHERE {where}", values).fetchall()
            rows = _arrow(self._con.execute(_page_sql("items", where, "*"), [*values, max(0, limit), max(0, offset)]))
            self._con.register("want", rows.select(["item_id", "latest_ord", "own_ord"]))
            try:
                numbers = sorted({ord_ & 0xFFFFFFFF for ord_ in rows["latest_ord"].to_pylist() + rows["own_ord"]
                                  .to_pylist()})
                catalogues = _arrow(self._con.execute(_catalogue_sql(pushed="WHERE file_row_number = ANY($rows)"),
                                                      {"paths": self._paths, "rows": numbers}))
            finally:
                self._con.unregister("want")
        shown = dict(zip(catalogues["item_id"].to_pylist(), zip(catalogues["catalogue_text"].to_pylist(),
                                                               catalogues["collection"].to_pylist())))
        result = []
        for row in rows.drop_columns(["latest_ord", "own_ord"]).to_pylist():
            row["catalogue_text"], row["collection"] = shown.get(row["item_id"], ("", None))
            result.append(row)
        return total, result

    def collections(self) -> list[str]:
        """The distinct collection names, for the filter's choices."""
        self._fresh()
        with self._lock:
            self._ready(wait=True)
            values = self._con.execute("SELECT DISTINCT collection FROM catalogues WHERE collection IS NOT NULL "
                                       "AND collection <> ''").fetchall()
        return sorted(value for (value,) in values)


_SHOWN = "* EXCLUDE (latest_ord, own_ord)"


def _arrow(result) -> pa.Table:
    """A query's rows as one Arrow table (``to_arrow_table`` in newer DuckDB, ``fetch_arrow_table`` in older)."""
    fetch = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    return fetch()


def _page_sql(source: str, where: str, shown: str) -> str:
    """One page: its item ids found first (sorting the ids only, not the rows), then their rows."""
    return (f"SELECT {shown} FROM {source} WHERE item_id IN (SELECT item_id FROM {source} WHERE {where} "
            "ORDER BY item_id LIMIT ? OFFSET ?) ORDER BY item_id")


def _stop(table: weakref.ref) -> None:
    running = table()
    thread = running._catalogues if running is not None else None
    if thread is not None and thread.is_alive():
        try:
            running._cursor.interrupt()
        except Exception:  # noqa: BLE001  (closed meanwhile)
            pass
        thread.join()
