"""The collection run: manifest in, derivatives, results and report out.

The flow body reads as the script it is: validate, check the model (the
checks of ``diffcolor doctor``: a broken model fails the run, every problem
named, before any item), plan, start the device pool, submit the items in
bounded windows, collect, write the run's results and report. Item work happens in :func:`colorize_item_task`, a thin task
around :func:`diffcolor.pipeline.colorize_item` run on a pool worker that keeps
the models loaded. Transient faults (storage, lost worker, out of memory) are
retried with backoff and resume from the item's checkpoints; permanent ones
(bad image, bad prompt) fail the item at once. One failed item never fails
the others; the flow ends Failed, with the summary, when any item failed.
"""

from __future__ import annotations

import itertools
import time
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.states import Cancelled, Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from diffcolor.archive import storage
from diffcolor.archive.layout import OutputLayout, RunLayout
from diffcolor.archive.manifest import count_rows, read_items
from diffcolor.archive.planning import (
    missing_done_items,
    plan_items,
    read_done_index,
    update_done_index,
)
from diffcolor.archive.report import describe_counts, write_report
from diffcolor.archive.results import RecordSpool, write_results
from diffcolor.archive.storage import ReadLimits
from diffcolor.common.items import ItemRequest
from diffcolor.common.keys import config_hash
from diffcolor.common.redact import refuse_credentials
from diffcolor.method.presets import apply_overrides, get_preset
from diffcolor.tools.doctor import preflight_model
from flows import stopping, worker
from flows.checks import check_output_writable
from flows.pool import DevicePool, ModelSpec, RunInterrupted
from flows.runs import (
    ACTIVE_POOLS,
    PROGRESS_LISTENERS,
    current_run_id,
    interruption,
    is_transient,
    new_run_id,
    notify,
    publish_summary,
    record_of_failure,
    refusal,
    run_on_worker,
    run_summary,
    write_summary,
)


class RunOptions(BaseModel):
    """How a collection run is carried out (shown as a form in the Prefect UI)."""

    preset: str = Field("default", description="smoke, default or paper-scale")
    clip: str | None = Field(None, description="CLIP folder or hub id (default: the bundle's clip/ or ViT-L/14)")
    items: list[str] | None = Field(None, description="only these item ids")
    force: bool = Field(False, description="redo done items and colourise colour photographs too")
    device: str = Field("auto", description="auto (every visible GPU, else CPU), cuda or cpu")
    window: int | None = Field(None, description="items in flight at once (default: 2 per worker)")
    retries: int = Field(3, description="retries of an item after a transient fault")
    retry_delay_seconds: list[float] = Field([5, 30, 120], description="backoff before each retry")
    overrides: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description='preset fields to change, e.g. {"stage1.steps": 200}')
    allow_download: bool = Field(False, description="let models be fetched from the hub")
    weight_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="frozen weights' storage: auto (bf16 on CUDA), bf16 or fp32")
    pool: Literal["local", "inline", "ray"] = Field(
        "local", description="local (worker processes on this machine's GPUs), inline (items in the flow's own "
                             "process: for debugging) or ray")
    workers_per_device: int = Field(
        1, ge=1, description="local pool: worker processes per GPU (or on the CPU), each with its own models")
    gpus_per_item: float = Field(1.0, gt=0, le=1, description="Ray only: the GPU share each item task reserves "
                                                              "(0.5: two items per GPU)")
    max_source_mb: float = Field(ReadLimits.max_bytes / 2**20, gt=0,
                                 description="largest source read (MiB); a larger one fails its item as bad_image")
    source_timeout_seconds: float = Field(ReadLimits.seconds, gt=0,
                                          description="longest read of a source; a slower one fails its item")

    def read_limits(self) -> ReadLimits:
        return ReadLimits.from_mib(self.max_source_mb, self.source_timeout_seconds)


@task(name="colorize-item", cache_policy=NO_CACHE, retry_condition_fn=is_transient,
      task_run_name="colorize {request.item_id}")
def colorize_item_task(run_id: str, spec: ModelSpec, request: ItemRequest, prefix: str, config_dict: dict,
                       preset: str, limits: ReadLimits | None = None) -> list[dict] | None:
    """Runs one item on a worker that keeps the models; raises the item's error for Prefect's retry decision.
    None when the run was stopped before the item finished."""
    return run_on_worker(run_id, spec, worker.run_colorize, request, prefix, config_dict, preset, limits)


def run_items(run_id: str, spec: ModelSpec, planned, output: str, config_dict: dict, preset: str, window: int,
              retries: int, retry_delays: list[float], on_record, ray_options: dict | None = None,
              limits: ReadLimits | None = None, smoke: bool = False, on_item=None) -> None:
    """Submits the planned items at most ``window`` at a time; calls ``on_record`` per record, then
    ``on_item(records)`` with all the records of the item (when given). Once the run is stopping
    (SIGINT, SIGTERM) no item is submitted, and items stopped under way get no record.

    A skipped item's record names the version the done-index lists and, with
    ``smoke``, says the run used random weights (as the item's records do).
    """
    item_task = colorize_item_task.with_options(retries=retries, retry_delay_seconds=list(retry_delays) or [0])
    in_flight: dict = {}

    def collect(future) -> None:
        request = in_flight.pop(future)
        try:
            records = future.result()
        except Exception as error:  # the item failed for good: its record says why
            records = [record_of_failure(request, error, preset)]
        if records is not None:  # None: stopped under way, not finished
            finish(records)

    def finish(records: list[dict]) -> None:
        for record in records:
            on_record(record)
        if on_item is not None:
            on_item(records)

    for item in planned:
        if stopping.STOP.is_set():
            break
        if item.skip:
            finish([{"item_id": item.request.item_id, "status": "skipped_done", "plan_key": item.plan_key,
                     "version": item.version, "source_uri": item.request.source_uri,
                     "caption": item.request.caption, "catalogue": dict(item.request.catalogue),
                     "smoke_run": smoke}])
            continue
        while len(in_flight) >= window:
            collect(next(as_completed(list(in_flight))))
        arguments = (run_id, spec, item.request, OutputLayout(output).item_prefix(item.request.item_id), config_dict, preset, limits)
        if ray_options:
            from prefect_ray.context import remote_options

            with remote_options(**ray_options):  # Ray places the task on a free GPU and pins it
                future = item_task.submit(*arguments)
        else:
            future = item_task.submit(*arguments)
        in_flight[future] = item.request
    for future in as_completed(list(in_flight)):
        collect(future)


@flow(name="colorize-collection", flow_run_name=new_run_id, task_runner=ThreadPoolTaskRunner(max_workers=8),
      log_prints=True)
def colorize_collection(manifest: str, output: str, model: str, options: RunOptions = RunOptions()) -> dict:
    """Colourises every pending item of ``manifest`` into ``output`` (fsspec URIs).

    Returns the run summary. The flow run ends Failed when any item failed, or with
    the one line of a refusal (bad manifest, model or output); Cancelled, with the
    record of the items finished, when the run was stopped (SIGINT, SIGTERM).
    """
    stopping.reclaim_signals()  # the command line's stop handling, in place of Prefect's SIGTERM handler
    try:
        return _colorize_collection(manifest, output, model, options)
    except Exception as error:
        line = refusal(error)
        if line is None:
            raise
        get_run_logger().error("run refused: %s", line)
        return Failed(message=line)


def _colorize_collection(manifest: str, output: str, model: str, options: RunOptions):
    logger = get_run_logger()
    run_id = current_run_id()  # the flow run's name
    config_dict = apply_overrides(get_preset(options.preset), options.overrides).to_dict()
    refuse_credentials(manifest, output, model, options.clip, what="flow parameter")  # a deployment's are stored
    manifest, output = storage.absolute(manifest), storage.absolute(output)  # records name absolute URIs

    # 1. The manifest (and the selected ids) is valid, before any GPU work:
    #    read_items validates the whole manifest on its first read and raises
    #    ManifestError naming every bad row; unknown --items are refused too.
    requests = read_items(manifest, items=set(options.items) if options.items else None, force=options.force)
    first = next(requests, None)
    requests = itertools.chain([first] if first is not None else [], requests)

    # 2. The models pass the doctor's checks (diffcolor doctor: ModelCheckError naming every problem before any
    #    item is touched; the model hash for planning comes with them), then the pool: long-lived workers on
    #    every GPU, models loaded once per worker (Ray: its task workers).
    #    (Ray places items on its own nodes' GPUs: the flow's host says nothing about theirs.)
    checked = preflight_model(model, clip=options.clip, allow_download=options.allow_download,
                              device="auto" if options.pool == "ray" else options.device,
                              weight_dtype=options.weight_dtype, probe_memory=False)
    check_output_writable(output)  # a small object written and removed, before any model loads
    for note in (f"{check.name}: {note}" for check in checked.checks for note in check.notes):
        logger.info("model %s: %s", model, note)
    model_hash = checked.model_hash
    smoke = checked.random_weights
    timings = {"started": time.perf_counter()}
    spec = ModelSpec(model=model, clip=options.clip, allow_download=options.allow_download,
                     weight_dtype=options.weight_dtype)
    records, pool = RecordSpool(), None
    try:
        if stopping.STOP.is_set():
            raise RunInterrupted("stopped before the pool started")
        pool = _start_pool(run_id, spec, options)
        timings["pool_ready"] = time.perf_counter()

        # 3. Plan: skip what the done-index lists as done and the archive still holds (one listing), stream the rest.
        done = read_done_index(output)
        missing = missing_done_items(output, done)
        redone: list[str] = []
        planned = _noting_missing(plan_items(requests, done, config_hash=config_hash(config_dict), model_hash=model_hash,
                                             force=options.force, missing=missing), redone)

        # 4. Run the items, windowed, and follow progress; records are spooled to disk.
        window = options.window or 2 * (pool.size if pool else _ray_gpu_count(options.gpus_per_item))
        ray_options = {"num_gpus": options.gpus_per_item} if options.pool == "ray" else None
        on_record, on_item, keys = _progress_recorder(records, _count(manifest, options.items), run_id)
        run_items(run_id, spec, _with_keys(planned, keys), output, config_dict, options.preset, window,
                  options.retries, options.retry_delay_seconds, on_record, ray_options, options.read_limits(),
                  smoke=smoke, on_item=on_item)
        timings["items_done"] = time.perf_counter()
    except RunInterrupted:  # stopped while the pool started: the run's record has no item
        timings.setdefault("pool_ready", time.perf_counter())
        timings["items_done"] = time.perf_counter()
    finally:
        if pool is not None:
            ACTIVE_POOLS.pop(run_id, None)
            pool.close()

    # 5. Results, done-index, report and summary.
    summary = _write_run(output, run_id, records, timings, None if pool is None else pool.devices, smoke)
    summary["redone_missing"] = len(redone)
    summary["redone_missing_items"] = redone[:1000]
    logger.info("run %s: %s", run_id, describe_counts(summary["items"], summary["versions_written"]))
    if redone:
        logger.warning("run %s: %d item(s) the done-index listed as done were missing from the archive and were "
                       "done again: %s", run_id, len(redone), ", ".join(redone[:20]) + (" ..." if len(redone) > 20 else ""))
    if summary["interrupted"]:
        return Cancelled(message=f"run {run_id} stopped by {summary['signal']}", data=summary)
    if summary["counts"].get("failed"):
        return Failed(message=f"{summary['counts']['failed']} item(s) failed; see {summary['report']}", data=summary)
    return Completed(message=f"run {run_id} done", data=summary)


def _start_pool(run_id: str, spec: ModelSpec, options: RunOptions) -> DevicePool | None:
    """The run's pool (local worker processes, or inline) with its models loaded; None in Ray mode (Ray places items)."""
    if options.pool == "ray":
        if "Ray" not in type(FlowRunContext.get().task_runner).__name__:
            raise ValueError("pool 'ray' needs the Ray task runner: run flows/ray_collection.py:colorize_collection_ray "
                             "(or diffcolor run --pool ray)")
        return None
    if options.pool not in ("local", "inline"):
        raise ValueError(f"pool must be 'local', 'inline' or 'ray', got {options.pool!r}")
    pool = DevicePool(spec, device=options.device, workers_per_device=options.workers_per_device,
                      inline=options.pool == "inline",
                      on_stage=(lambda *step: notify("stage", *step)) if PROGRESS_LISTENERS else None)
    ACTIVE_POOLS[run_id] = pool
    try:
        pool.describe()  # every worker up, its models loaded
    except BaseException:
        ACTIVE_POOLS.pop(run_id, None)
        pool.close()
        raise
    return pool


def _progress_recorder(records: RecordSpool, total: int, run_id: str):
    """``on_record(record)``, which spools each record with its plan key; ``on_item(records)``, which moves
    the progress artifact and tells the progress listeners; and the dict of plan keys of the items in
    flight that ``on_record`` reads them from."""
    progress = create_progress_artifact(0.0, key="colorize-collection-progress", description=f"run {run_id}")
    keys: dict[str, str] = {}
    notify("start", run_id, total)

    def on_record(record: dict) -> None:
        # Every version of an item carries its plan key (the done-index then names the item's last version).
        record["plan_key"] = keys.get(record["item_id"], record.get("plan_key"))
        records.add(record)

    def on_item(item_records: list[dict]) -> None:
        keys.pop(item_records[-1]["item_id"], None)
        items = sum(records.items.values())
        notify("item", items, total, item_records)
        if items % max(1, total // 100) == 0 or items == total:
            update_progress_artifact(progress, min(100.0, 100.0 * items / max(total, 1)))

    return on_record, on_item, keys


def _write_run(output: str, run_id: str, records: RecordSpool, timings: dict, devices: int | None,
               smoke: bool) -> dict:
    """The run's results Parquet, the done-index update, the report and the summary (also as artifacts)."""
    prefix = OutputLayout(output).run_prefix(run_id)
    write_results(records, RunLayout(prefix).results)
    update_done_index(output, (
        (r["item_id"], r["plan_key"], "done" if r["status"] in ("done", "skipped_done") else r["status"], r.get("version"))
        for r in records if r["status"] in ("done", "skipped_done", "not_grayscale") and r.get("plan_key")
    ), run_id=run_id)
    write_report(_report_records(records), RunLayout(prefix).report, run_id=run_id, all_records=records,
                 smoke=smoke)
    summary = run_summary(records, run_id, prefix)
    summary["smoke"] = smoke
    summary["seconds"] = {
        "pool_start": timings["pool_ready"] - timings["started"],
        "items": timings["items_done"] - timings["pool_ready"],
        "finish": time.perf_counter() - timings["items_done"],
    }
    summary["device_seconds_per_item"] = _device_seconds_per_item(records.counts, summary["seconds"]["items"], devices)
    write_summary(interruption(summary))
    publish_summary(summary, records)
    return summary


def _device_seconds_per_item(counts: dict[str, int], items_seconds: float, devices: int | None) -> float | None:
    """The run's throughput as device time: the devices held for the items' phase over the items that did
    work (skipped items cost nothing). None on Ray, whose cluster grows and shrinks during a run."""
    worked = sum(count for status, count in counts.items() if status != "skipped_done")
    if devices is None or worked == 0:
        return None
    return devices * items_seconds / worked


def _ray_gpu_count(gpus_per_item: float) -> int:
    """How many items the connected Ray cluster can run at once (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("GPU", 0) // max(gpus_per_item, 1e-9)))


def ray_runner(address: str | None = None, init_kwargs: dict | None = None):
    """The task runner of Ray mode: ``colorize_collection.with_options(task_runner=ray_runner(...))``.

    ``address`` is the Ray cluster (``ray://head:10001``; None starts a local
    one). Ray's workers must reach the same Prefect API as the flow.
    """
    from prefect_ray import RayTaskRunner

    return RayTaskRunner(address=address, init_kwargs=init_kwargs)


def _noting_missing(planned, redone: list[str]):
    """The planned items, unchanged; the ids of those done again because the archive lacked them go to ``redone``."""
    for item in planned:
        if item.missing:
            redone.append(item.request.item_id)
        yield item


def _with_keys(planned, keys: dict[str, str]):
    for item in planned:
        keys[item.request.item_id] = item.plan_key
        yield item


def _report_records(records: RecordSpool) -> list[dict]:
    """The records the contact sheet shows: the first ones, plus every kept failure."""
    seen = {(r["item_id"], r.get("version")) for r in records.head}
    return records.head + [r for r in records.failures if (r["item_id"], r.get("version")) not in seen]


def _count(manifest: str, items: list[str] | None) -> int:
    return len(items) if items else count_rows(manifest)
