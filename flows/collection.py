"""The collection run: manifest in, derivatives, results and report out.

The flow body reads as the script it is: validate, check the model (the
checks of ``diffcolor doctor``: a broken model fails the run, every problem
named, before any item), record the run's configuration, plan, start the device
pool, submit the items in bounded windows, collect, write the run's results and
report (the lifecycle the reprocess run shares: :class:`flows.runs.Run`). Item
work happens in :func:`colorize_item_task`, a thin task around
:func:`diffcolor.pipeline.colorize_item` run on a pool worker that keeps the
models loaded. Transient faults (storage, lost worker, out of memory) are
retried with backoff and resume from the item's checkpoints; permanent ones
(bad image, bad prompt) fail the item at once. One failed item never fails
the others; the flow ends Failed, with the summary, when any item failed.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from diffcolor.archive import storage
from diffcolor.archive.layout import OutputLayout
from diffcolor.archive.manifest import ManifestFile, count_rows, read_items
from diffcolor.archive.planning import missing_done_items, plan_items, read_done_index
from diffcolor.archive.storage import ReadLimits
from diffcolor.common.ids import normalize_item_id
from diffcolor.common.items import ItemRequest
from diffcolor.common.keys import config_hash
from diffcolor.common.redact import refuse_credentials
from diffcolor.method.doctor import preflight_model
from flows import stopping, worker
from flows.checks import check_output_writable
from flows.pool import ModelSpec, RunInterrupted
from flows.runs import (
    Run,
    is_transient,
    new_run_id,
    notify,
    record_of_failure,
    refusing,
    resolve_config,
    run_on_worker,
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
    overrides: dict[str, Any] = Field(  # JSON values, as --set parses them (lists for tuples, null)
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
    return refusing("run", _colorize_collection, manifest, output, model, options)


def _colorize_collection(manifest: str, output: str, model: str, options: RunOptions):
    logger = get_run_logger()
    config = resolve_config(options.preset, options.overrides)  # applied once a run (the command line's, if any)
    refuse_credentials(manifest, output, model, options.clip, what="flow parameter")  # a deployment's are stored
    manifest, output = storage.absolute(manifest), storage.absolute(output)  # records name absolute URIs
    run = Run(output, "run", preset=options.preset, overrides=options.overrides, config=config)
    config_dict = config.to_dict()

    # 1. The manifest (and the selected ids) is valid, before any GPU work: read once for the whole run
    #    (the command line's read when it started this flow); read_items validates the whole manifest
    #    unless that read was validated already, and raises ManifestError naming every bad row; unknown
    #    --items are refused too.
    source = run.read_manifest(manifest)
    requests = read_items(source, items=set(options.items) if options.items else None, force=options.force)
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
    _check_pool(options)
    run.mark("started")
    run.write_config(manifest=manifest, model=model, model_hash=model_hash, random_weights=smoke,
                     device=options.device, pool=options.pool, workers_per_device=options.workers_per_device,
                     options=options.model_dump(mode="json"))
    spec = ModelSpec(model=model, clip=options.clip, allow_download=options.allow_download,
                     weight_dtype=options.weight_dtype)
    redone: list[str] = []
    try:
        if stopping.STOP.is_set():
            raise RunInterrupted("stopped before the pool started")
        with _pool(run, spec, options) as pool:
            run.mark("pool_ready")

            # 3. Plan: skip what the done-index lists as done and the archive still holds (one listing), stream
            #    the rest.
            done = read_done_index(output)
            missing = missing_done_items(output, done)
            planned = _noting_missing(plan_items(requests, done, config_hash=config_hash(config_dict),
                                                 model_hash=model_hash, force=options.force, missing=missing), redone)

            # 4. Run the items, windowed, and follow progress; records are spooled to disk.
            window = options.window or 2 * (pool.size if pool else _ray_gpu_count(options.gpus_per_item))
            ray_options = {"num_gpus": options.gpus_per_item} if options.pool == "ray" else None
            on_record, on_item, keys = _progress_recorder(run, _count(source, options.items))
            run_items(run.run_id, spec, _with_keys(planned, keys), output, config_dict, options.preset, window,
                      options.retries, options.retry_delay_seconds, on_record, ray_options, options.read_limits(),
                      smoke=smoke, on_item=on_item)
            run.mark("items_done")
    except RunInterrupted:  # stopped while the pool started: the run's record has no item
        run.mark("pool_ready")
        run.mark("items_done")

    # 5. Results, done-index, report and summary.
    summary = run.finish(smoke=smoke, done_index=True)
    summary["redone_missing"] = len(redone)
    summary["redone_missing_items"] = redone[:1000]
    if redone:
        logger.warning("run %s: %d item(s) the done-index listed as done were missing from the archive and were "
                       "done again: %s", run.run_id, len(redone),
                       ", ".join(redone[:20]) + (" ..." if len(redone) > 20 else ""))
    return run.outcome(summary)


def _check_pool(options: RunOptions) -> None:
    """ValueError for a pool the run cannot have (refused before the run records anything)."""
    if options.pool == "ray":
        if "Ray" not in type(FlowRunContext.get().task_runner).__name__:
            raise ValueError("pool 'ray' needs the Ray task runner: run flows/ray_collection.py:colorize_collection_ray "
                             "(or diffcolor run --pool ray)")
    elif options.pool not in ("local", "inline"):
        raise ValueError(f"pool must be 'local', 'inline' or 'ray', got {options.pool!r}")


@contextmanager
def _pool(run: Run, spec: ModelSpec, options: RunOptions):
    """The run's pool (local worker processes, or inline) with its models loaded; None in Ray mode (Ray places items)."""
    if options.pool == "ray":
        yield None
        return
    with run.pool(spec, device=options.device, workers_per_device=options.workers_per_device,
                  inline=options.pool == "inline") as pool:
        pool.describe()  # every worker up, its models loaded
        yield pool


def _progress_recorder(run: Run, total: int):
    """``on_record(record)``, which adds each record to the run with its plan key; ``on_item(records)``, which
    moves the progress artifact and tells the progress listeners; and the dict of plan keys of the items in
    flight that ``on_record`` reads them from."""
    progress = create_progress_artifact(0.0, key="colorize-collection-progress", description=f"run {run.run_id}")
    keys: dict[str, str] = {}
    records = run.records
    notify("start", run.run_id, total)

    def on_record(record: dict) -> None:
        # Every version of an item carries its plan key (the done-index then names the item's last version).
        record["plan_key"] = keys.get(record["item_id"], record.get("plan_key"))
        run.add(record)

    def on_item(item_records: list[dict]) -> None:
        keys.pop(item_records[-1]["item_id"], None)
        items = sum(records.items.values())
        notify("item", items, total, item_records)
        if items % max(1, total // 100) == 0 or items == total:
            update_progress_artifact(progress, min(100.0, 100.0 * items / max(total, 1)))

    return on_record, on_item, keys


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


def _count(manifest: ManifestFile, items: list[str] | None) -> int:
    return len({normalize_item_id(item) for item in items}) if items else count_rows(manifest)
