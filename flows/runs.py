"""What the collection run and the reprocess run share: the run's lifecycle, failure records, the summary.

A flow opens a :class:`Run` (its id, its folder ``runs/RUN_ID/``, its records),
asks it for its configuration (:meth:`Run.configure`, the preset with its
overrides applied once), its manifest (:meth:`Run.read_manifest`, read once),
records that configuration (:meth:`Run.write_config`, ``runs/RUN_ID/config.json``,
before any item starts), asks it for a device pool (:meth:`Run.pool`), adds
every record to it (:meth:`Run.add`) and closes it with the one end-of-run
sequence (:meth:`Run.finish`: results, done-index, report, summary, Prefect
artifacts, an interrupted run marked so; :meth:`Run.outcome`: the flow's state).

Pools hold worker processes and do not pickle, so a task finds its run's pool
by run id (:func:`run_on_worker`); a task that finds none runs where it is (a
Ray task worker, which keeps its own models).
"""

from __future__ import annotations

import re
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Cancelled, Completed, Failed, State

from diffcolor import __version__
from diffcolor.archive import storage
from diffcolor.archive.items import failure_record
from diffcolor.archive.layout import OutputLayout, RunLayout
from diffcolor.archive.manifest import ManifestFile, read_manifest
from diffcolor.archive.planning import update_done_index
from diffcolor.archive.report import describe_counts, write_report
from diffcolor.archive.results import RecordSpool, write_results
from diffcolor.common import record as declarations
from diffcolor.common.errors import DiffColorError, TransientError
from diffcolor.common.items import ItemRequest
from diffcolor.common.redact import redact_value
from diffcolor.method.presets import PipelineConfig, apply_overrides, get_preset
from flows import stopping, worker
from flows.checks import handed_over
from flows.pool import DevicePool, ModelSpec, RunInterrupted
from flows.warm import pool_for

_POOLS: dict[str, DevicePool] = {}  # run id -> the run's local pool, while the run is under way (Run.pool)
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
    pool = _POOLS.get(run_id)
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
    if isinstance(error, DiffColorError):  # raised on purpose (UserError among them); anything else is a bug
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


def _rounded(value, digits: int | None):
    return round(value, digits) if isinstance(value, float) and digits is not None else value


def publish_summary(summary: dict, records) -> None:
    """The run's summary as Prefect artifacts: a table of the first 1000 records and a markdown summary."""
    records = records.head if isinstance(records, RecordSpool) else records
    shown = declarations.summary()  # the record's summary fields, as the CLI prints them
    rows = [{"item": r["item_id"], "status": r["status"], "version": r.get("version"),
             **{field.ascii_label: _rounded(r.get(field.name), field.digits) for field in shown},
             "error": r.get("error_message")} for r in records[:1000]]
    create_table_artifact(rows, key="colorize-collection-items", description=f"run {summary['run_id']} (first 1000 items)")
    create_markdown_artifact(
        ("## SMOKE RUN\n\n**Random-weight tiny bundle: these images test the pipeline; they are not "
         "colourisations.**\n\n" if summary.get("smoke") else "")
        + f"### Run {summary['run_id']}\n\n{describe_counts(summary['items'], summary['versions_written'])}\n\n"
        + f"Results: `{summary['results']}` (and `{summary['results_csv']}`)  \nReport: `{summary['report']}`",
        key="colorize-collection-summary",
    )


def live_pools() -> list[DevicePool]:
    """The pools of the runs under way in this process (to look at, e.g. their worker pids; the runs own them)."""
    return list(_POOLS.values())


def refusing(name: str, body, *args):
    """``body(*args)``, a flow's work, with the command line's stop handling; a refusal (:func:`refusal`) ends
    the flow Failed with its one line, logged as ``NAME refused: LINE``."""
    stopping.reclaim_signals()  # the command line's stop handling, in place of Prefect's SIGTERM handler
    try:
        return body(*args)
    except Exception as error:
        line = refusal(error)
        if line is None:
            raise
        get_run_logger().error("%s refused: %s", name, line)
        return Failed(message=line)


def resolve_config(preset: str, overrides: dict) -> PipelineConfig:
    """The preset with its overrides applied, once a run: what the command line resolved when it did, else here."""
    checked = handed_over()
    if checked is not None and checked.config is not None and checked.preset == preset \
            and checked.overrides == dict(overrides):
        return checked.config
    return apply_overrides(get_preset(preset), overrides)


def pipeline_config(config: dict) -> PipelineConfig:
    """The pipeline configuration of a run's ``config.json`` (as :func:`read_run_config` returns it)."""
    return PipelineConfig.from_dict(config["config"])


def read_run_config(uri: str) -> dict:
    """A run's ``config.json``: what :meth:`Run.write_config` wrote."""
    return storage.read_json(uri)


class Run:
    """One run of a flow, opened when the flow starts and closed by :meth:`finish` (module docstring).

    ``name`` is the word of its log lines and messages (``run``, ``reprocess``); ``config`` is ``preset``
    with ``overrides`` applied (:func:`resolve_config`), what ``config.json`` records.
    """

    def __init__(self, output: str, name: str, *, preset: str, overrides: dict, config: PipelineConfig):
        self.run_id = current_run_id()  # the flow run's name
        self.output, self.name = output, name
        self.preset, self.overrides, self.config = preset, dict(overrides), config
        self.prefix = OutputLayout(output).run_prefix(self.run_id)
        self.config_uri = RunLayout(self.prefix).config
        self.records = RecordSpool()
        self.devices: int | None = None  # the devices of the run's last pool (None: no pool, or Ray's)
        self._times: dict[str, float] = {}

    # -- Opening ----------------------------------------------------------------

    @staticmethod
    def read_manifest(uri: str) -> ManifestFile:
        """The manifest, read once for the whole run: the one the command line read and checked, else read here."""
        checked = handed_over()
        if checked is not None and checked.manifest is not None and checked.manifest.uri == uri:
            return checked.manifest
        return read_manifest(uri)

    def write_config(self, **facts) -> str:
        """Publishes ``runs/RUN_ID/config.json`` before any item starts: the preset, its overrides and every
        resolved setting, the code version, and ``facts`` (model, model hash, device, pool, the flow's options;
        JSON values); returns its URI, which every record of the run carries as ``run_config``."""
        storage.write_json(self.config_uri, {
            "run_id": self.run_id, "kind": self.name, "software_version": __version__,
            "preset": self.preset, "overrides": self.overrides, "config": self.config.to_dict(),
            **redact_value(facts)})  # a URI with credentials in it is not recorded as such
        return self.config_uri

    @contextmanager
    def pool(self, spec: ModelSpec, *, device: str, workers_per_device: int, inline: bool,
             warm: bool = False) -> Iterator[DevicePool]:
        """A device pool holding ``spec``'s models for the block (the run's tasks find it; closed after it).
        ``warm``: a warm pool where this process keeps them or a warm-pool service is named (flows.warm)."""
        with pool_for(spec, device=device, workers_per_device=workers_per_device, inline=inline, warm=warm,
                      on_stage=(lambda *step: notify("stage", *step)) if PROGRESS_LISTENERS else None) as pool:
            _POOLS[self.run_id] = pool
            try:
                self.devices = pool.devices
                yield pool
            finally:
                _POOLS.pop(self.run_id, None)

    def mark(self, phase: str) -> None:
        """The time ``phase`` began (``started``: the pool's start) or ended (``pool_ready``, ``items_done``): the
        summary's seconds per phase (none when not marked)."""
        self._times.setdefault(phase, time.perf_counter())

    # -- Records ----------------------------------------------------------------

    def add(self, record: dict) -> None:
        """One record of the run (spooled to disk), marked with the run's configuration."""
        record["run_config"] = self.config_uri
        self.records.add(record)

    # -- Closing ----------------------------------------------------------------

    def finish(self, *, smoke: bool, done_index: bool = False) -> dict:
        """The end of every run, stopped ones included: the results (Parquet and CSV), the done-index update
        (``done_index``: the collection run), the report, ``summary.json`` (``interrupted`` when stopped)
        and the Prefect artifacts; returns the summary."""
        records, prefix = self.records, self.prefix
        write_results(records, RunLayout(prefix).results)
        if done_index:
            update_done_index(self.output, (
                (r["item_id"], r["plan_key"], "done" if r["status"] in ("done", "skipped_done") else r["status"],
                 r.get("version"))
                for r in records if r["status"] in ("done", "skipped_done", "not_grayscale") and r.get("plan_key")
            ), run_id=self.run_id)
        write_report(report_records(records), RunLayout(prefix).report, run_id=self.run_id,
                     all_records=records, smoke=smoke or None)
        summary = run_summary(records, self.run_id, prefix)
        summary["smoke"] = smoke
        if "items_done" in self._times:
            times = self._times
            summary["seconds"] = {"pool_start": times["pool_ready"] - times["started"],
                                  "items": times["items_done"] - times["pool_ready"],
                                  "finish": time.perf_counter() - times["items_done"]}
            summary["device_seconds_per_item"] = device_seconds_per_item(records.counts, summary["seconds"]["items"],
                                                                         self.devices)
        write_summary(interruption(summary))
        publish_summary(summary, records)
        get_run_logger().info("%s %s: %s", self.name, self.run_id,
                              describe_counts(summary["items"], summary["versions_written"]))
        return summary

    def outcome(self, summary: dict) -> State:
        """The flow's end: Cancelled when stopped, Failed when any item failed, else Completed; the summary its data."""
        if summary["interrupted"]:
            return Cancelled(message=f"{self.name} {self.run_id} stopped by {summary['signal']}", data=summary)
        if summary["counts"].get("failed"):
            return Failed(message=f"{summary['counts']['failed']} item(s) failed; see {summary['report']}",
                          data=summary)
        return Completed(message=f"{self.name} {self.run_id} done", data=summary)


def report_records(records: RecordSpool) -> list[dict]:
    """The records the contact sheet shows: the first ones, plus every kept failure."""
    seen = {(r["item_id"], r.get("version")) for r in records.head}
    return records.head + [r for r in records.failures if (r["item_id"], r.get("version")) not in seen]


def device_seconds_per_item(counts: dict[str, int], items_seconds: float, devices: int | None) -> float | None:
    """The run's throughput as device time: the devices held for the items' phase over the items that did
    work (skipped items cost nothing). None on Ray, whose cluster grows and shrinks during a run."""
    worked = sum(count for status, count in counts.items() if status != "skipped_done")
    if devices is None or worked == 0:
        return None
    return devices * items_seconds / worked
