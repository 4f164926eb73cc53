"""What the collection run and the reprocess run share: run ids, pools, failure records, the summary.

Pools hold worker processes and do not pickle, so a task finds its run's pool
in :data:`ACTIVE_POOLS` by run id; a task that finds none runs where it is (a
Ray task worker, which keeps its own models).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from diffcolor.archive import storage
from diffcolor.archive.items import failure_record
from diffcolor.archive.layout import RunLayout
from diffcolor.archive.report import describe_counts
from diffcolor.archive.results import RecordSpool
from diffcolor.common.errors import DiffColorError, TransientError
from diffcolor.common.items import ItemRequest
from flows import stopping, worker
from flows.pool import DevicePool, ModelSpec, RunInterrupted

ACTIVE_POOLS: dict[str, DevicePool] = {}  # run id -> the run's local pool, while the run is under way
# Displays following the runs of this process (the command line's progress): objects with any of
# start(run_id, total), item(done, total, records of the item), stage(item_id, phase, step, total).
PROGRESS_LISTENERS: list = []


def notify(event: str, *args) -> None:
    """Tells every progress listener of ``event``; a listener that fails is ignored (a display never fails a run)."""
    for listener in list(PROGRESS_LISTENERS):
        handler = getattr(listener, event, None)
        if handler is None:
            continue
        try:
            handler(*args)
        except Exception:
            pass


RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def new_run_id() -> str:
    """A sortable, unique run id: UTC time to the second and six random hex digits.

    The flows name their Prefect flow runs with it (``flow_run_name``), so the
    run id is what the Prefect UI lists and :func:`current_run_id` reads back.
    """
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def current_run_id() -> str:
    """The run id of the flow run under way: its name when the flow named it, else a new one."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    name = getattr(getattr(context, "flow_run", None), "name", None)
    return name if isinstance(name, str) and RUN_ID.match(name) else new_run_id()


def is_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry only transient faults (storage, lost worker, out of memory), and
    nothing once the run is stopping."""
    if stopping.STOP.is_set():
        return False
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


def run_on_worker(run_id: str, spec: ModelSpec, function, *args):
    """On the local pool when this process holds the run's pool; else here, in a Ray task worker.

    None when the run was stopped before or while the item ran (its work is not recorded).
    """
    pool = ACTIVE_POOLS.get(run_id)
    try:
        if pool is not None:
            return pool.run(function, *args)
        return worker.run_here(spec, function, *args)
    except (RunInterrupted, worker.WorkerStopped):
        return None


def refusal(error: BaseException) -> str | None:
    """The one line of an error that refuses the run (bad manifest, model, output, option), else None.

    The flows end Failed with that line as their message instead of raising:
    Prefect would log the refusal's traceback, and the operator needs the line only.
    """
    if isinstance(error, (DiffColorError, ValueError)):
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def interruption(summary: dict) -> dict:
    """``summary`` marked as the record of a stopped run, when the run was stopped (SIGINT, SIGTERM)."""
    if stopping.STOP.is_set():
        summary["interrupted"] = True
        summary["signal"] = stopping.signal_name(stopping.received() or 2)
    return summary


def record_of_failure(request: ItemRequest, error: BaseException, preset: str) -> dict:
    """The record of an item whose task failed for good: its error class and message (``internal`` when unplanned)."""
    return failure_record(request, error, preset=preset)


def run_summary(records, run_id: str, prefix: str) -> dict:
    """Counts by status and where the results are; ``records`` is a RecordSpool or a list."""
    if not isinstance(records, RecordSpool):
        spool = RecordSpool()
        for record in records:
            spool.add(record)
        records = spool
    return {"run_id": run_id, "items": dict(records.items), "versions_written": records.versions_written,
            "counts": dict(records.counts), "results": RunLayout(prefix).results,
            "results_csv": RunLayout(prefix).results_csv, "report": RunLayout(prefix).report,
            "summary": RunLayout(prefix).summary, "interrupted": False,
            "failed_items": [r["item_id"] for r in records.failures if r["status"] == "failed"]}


def write_summary(summary: dict) -> None:
    """The run's summary as ``runs/RUN_ID/summary.json`` (``interrupted`` true for a stopped run)."""
    storage.write_json(summary["summary"], summary)


def publish_summary(summary: dict, records) -> None:
    """The run's summary as Prefect artifacts: a table of the first 1000 records and a markdown summary."""
    records = records.head if isinstance(records, RecordSpool) else records
    rows = [{"item": r["item_id"], "status": r["status"], "version": r.get("version"),
             "max dL*": None if r.get("max_delta_l") is None else round(r["max_delta_l"], 3),
             "colourfulness": None if r.get("colorfulness") is None else round(r["colorfulness"], 1),
             "error": r.get("error_message")} for r in records[:1000]]
    create_table_artifact(rows, key="colorize-collection-items", description=f"run {summary['run_id']} (first 1000 items)")
    create_markdown_artifact(
        f"### Run {summary['run_id']}\n\n{describe_counts(summary['items'], summary['versions_written'])}\n\n"
        + f"Results: `{summary['results']}` (and `{summary['results_csv']}`)  \nReport: `{summary['report']}`",
        key="colorize-collection-summary",
    )
