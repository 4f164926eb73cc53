"""Reprocessing: new target prompts for selected items, rendered from stored colour states.

A curator names items and new targets (one target or colour map for all of
them, or a Parquet file of ``item_id`` plus ``target_prompt`` and/or
``color_map`` rows). Every item id goes through the item-id rule first (an
unsafe id is refused, nothing is written). Items with a colour state render in
seconds, with no fine-tuning; an item without a state falls back to a full fit
from its last record (source, caption, seed). Each item is rendered with the
model its record names (``options.model`` overrides it for all); items of
several models are run model by model, each on a pool of its own, after every
one of them has passed the checks of ``diffcolor doctor`` (a broken model fails
the run, every problem named, before any render). Each render adds a version;
nothing is overwritten.
"""

from __future__ import annotations

import io
import json
from typing import Literal

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Cancelled, Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field, field_validator

from diffcolor.archive import storage
from diffcolor.archive.items import failure_record
from diffcolor.archive.layout import ItemLayout, OutputLayout, RunLayout
from diffcolor.archive.report import describe_counts, write_report
from diffcolor.archive.results import RecordSpool, write_results
from diffcolor.archive.storage import ReadLimits
from diffcolor.common.errors import PromptError, StateError
from diffcolor.common.ids import UnsafeItemIdError, normalize_item_id
from diffcolor.common.items import ItemRequest
from diffcolor.common.redact import redact, refuse_credentials
from diffcolor.method.presets import get_preset
from diffcolor.tools.doctor import preflight_model
from flows import stopping, worker
from flows.checks import check_output_writable
from flows.pool import DevicePool, ModelSpec
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


class Retarget(BaseModel):
    """One new target for one item (the id normalised by the item-id rule; an unsafe one is refused)."""

    item_id: str
    target_prompt: str | None = None
    color_map: dict[str, str] | None = None

    @field_validator("item_id")
    @classmethod
    def _safe_item_id(cls, value: str) -> str:
        return normalize_item_id(value)


class ReprocessOptions(BaseModel):
    """Shown as a form in the Prefect UI."""

    model: str | None = Field(None, description="default: the model each item's record names")
    clip: str | None = None
    device: str = "auto"
    retries: int = 3
    retry_delay_seconds: list[float] = Field([5, 30, 120], description="backoff before each retry")
    seed: int | None = Field(None, description="default: each item's seed")
    preset: str = Field("default", description="preset of the full fit for items without a colour state")
    allow_download: bool = False
    weight_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="frozen weights' storage: auto (bf16 on CUDA), bf16 or fp32")
    workers_per_device: int = Field(1, ge=1, description="worker processes per GPU (or on the CPU)")
    pool: Literal["local", "inline"] = Field(
        "local", description="local (worker processes on this machine's GPUs) or inline (in the flow's own process)")
    max_source_mb: float = Field(ReadLimits.max_bytes / 2**20, gt=0, description="largest source read (MiB)")
    source_timeout_seconds: float = Field(ReadLimits.seconds, gt=0, description="longest read of a source")


def read_targets(uri: str) -> list[Retarget]:
    """Targets from a Parquet file with ``item_id`` and ``target_prompt`` and/or ``color_map`` columns.

    Raises PromptError naming the file (and the row) for a file without those columns, a colour map that
    is not a JSON object, or an unsafe item id.
    """
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    shown = redact(uri)
    if "item_id" not in table.column_names or not {"target_prompt", "color_map"} & set(table.column_names):
        raise PromptError(f"targets file '{shown}' needs item_id and target_prompt or color_map columns")
    targets = []
    for number, row in enumerate(table.to_pylist(), start=1):
        color_map = row.get("color_map")
        try:
            if isinstance(color_map, list):  # pyarrow map columns come back as key/value pairs
                color_map = dict(color_map)
            elif isinstance(color_map, str):
                color_map = json.loads(color_map)
            targets.append(Retarget(item_id=normalize_item_id(row["item_id"]), target_prompt=row.get("target_prompt"),
                                    color_map=color_map or None))
        except (UnsafeItemIdError, ValueError, TypeError) as error:
            message = str(error).splitlines()[0]
            raise PromptError(f"targets file '{shown}', row {number}: {message}") from None
    return targets


@task(name="recolor-item", cache_policy=NO_CACHE, retry_condition_fn=is_transient,
      task_run_name="recolor {item_id}")
def recolor_item_task(run_id: str, spec: ModelSpec, item_id: str, prefix: str, target: str | None,
                      color_map: dict | None, seed: int | None, limits: ReadLimits) -> list[dict] | None:
    record = run_on_worker(run_id, spec, worker.run_recolor, prefix, target, color_map, seed, limits)
    return None if record is None else [record]  # None: the run was stopped before the item finished


@task(name="refit-item", cache_policy=NO_CACHE, retry_condition_fn=is_transient, task_run_name="refit {request.item_id}")
def refit_item_task(run_id: str, spec: ModelSpec, request: ItemRequest, prefix: str, config_dict: dict,
                    preset: str, limits: ReadLimits) -> list[dict]:
    return run_on_worker(run_id, spec, worker.run_colorize, request, prefix, config_dict, preset, limits)


def _never_colourised(target: Retarget) -> dict:
    request = ItemRequest(item_id=target.item_id, source_uri="", caption="")
    return failure_record(request, StateError(f"item '{target.item_id}' has never been colourised in this output"))


@flow(name="reprocess", flow_run_name=new_run_id, task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def reprocess(output: str, targets: list[Retarget], options: ReprocessOptions = ReprocessOptions()) -> dict:
    """Renders ``targets`` for their items under the collection ``output``; returns the run summary.

    Ends as the collection run does: Failed when any item failed or the run was refused (one line),
    Cancelled with the record of the items finished when it was stopped (SIGINT, SIGTERM).
    """
    stopping.reclaim_signals()  # the command line's stop handling, in place of Prefect's SIGTERM handler
    try:
        return _reprocess(output, targets, options)
    except Exception as error:
        line = refusal(error)
        if line is None:
            raise
        get_run_logger().error("reprocess refused: %s", line)
        return Failed(message=line)


def _reprocess(output: str, targets: list[Retarget], options: ReprocessOptions):
    logger = get_run_logger()
    run_id = current_run_id()  # the flow run's name
    refuse_credentials(output, what="flow parameter")  # a deployment's parameters are stored
    output = storage.absolute(output)  # records name absolute URIs
    check_output_writable(output)  # before any model loads
    records = RecordSpool()

    # 1. What each item is: its latest record (source, caption, seed, model); ids through the item-id rule.
    targets = [Retarget.model_validate(target) for target in targets]
    previous: dict[str, dict | None] = {}
    for target in targets:
        if target.item_id not in previous:
            layout = OutputLayout(output).item(target.item_id)
            previous[target.item_id] = storage.read_json(layout.result) if storage.exists(layout.result) else None

    # 2. Group by model: each item's own recorded model unless the options name one.
    by_model: dict[str, list[Retarget]] = {}
    for target in targets:
        record = previous[target.item_id]
        model = options.model or (record or {}).get("model_id")
        if record is None or not record.get("source_uri") or not model:
            records.add(_never_colourised(target))
        else:
            by_model.setdefault(model, []).append(target)

    # 3. Every model passes the doctor's checks before any item is rendered (ModelCheckError naming every
    #    problem); no hashes: reprocessing plans nothing, and each worker hashes what it loads.
    smoke = False
    for model in by_model:
        checked = preflight_model(model, clip=options.clip, allow_download=options.allow_download,
                                  device=options.device, weight_dtype=options.weight_dtype, hashes=False,
                                  probe_memory=False)
        smoke = smoke or checked.random_weights

    # 4. Model by model: a pool with the models loaded once, then every item of that model.
    notify("start", run_id, len(targets))
    for record in records.head:  # targets refused above count as done with
        notify("item", sum(records.items.values()), len(targets), [record])
    for model, group in by_model.items():
        if stopping.STOP.is_set():
            break
        for record in _run_group(run_id, output, model, group, previous, options):
            records.add(record)
            notify("item", len(records), len(targets), [record])

    # 5. The run's results and report.
    prefix = OutputLayout(output).run_prefix(run_id)
    write_results(records, RunLayout(prefix).results)
    write_report(records.head + records.failures, RunLayout(prefix).report, run_id=run_id,
                 all_records=records, smoke=smoke or None)
    summary = run_summary(records, run_id, prefix)
    summary["smoke"] = smoke
    write_summary(interruption(summary))
    publish_summary(summary, records)
    logger.info("reprocess %s: %s", run_id, describe_counts(summary["items"], summary["versions_written"]))
    if summary["interrupted"]:
        return Cancelled(message=f"reprocess {run_id} stopped by {summary['signal']}", data=summary)
    if summary["counts"].get("failed"):
        return Failed(message=f"{summary['counts']['failed']} item(s) failed; see {summary['report']}", data=summary)
    return Completed(message=f"reprocess {run_id} done", data=summary)


def _run_group(run_id: str, output: str, model: str, group: list[Retarget], previous: dict,
               options: ReprocessOptions) -> list[dict]:
    """Renders (or, without a colour state, refits) every target of ``group`` on a pool holding ``model``."""
    spec = ModelSpec(model=model, clip=options.clip, allow_download=options.allow_download,
                     weight_dtype=options.weight_dtype)
    limits = ReadLimits.from_mib(options.max_source_mb, options.source_timeout_seconds)
    retry = {"retries": options.retries, "retry_delay_seconds": options.retry_delay_seconds}
    pool = DevicePool(spec, device=options.device, workers_per_device=options.workers_per_device,
                      inline=options.pool == "inline",
                      on_stage=(lambda *step: notify("stage", *step)) if PROGRESS_LISTENERS else None)
    ACTIVE_POOLS[run_id] = pool
    records, futures = [], {}
    try:
        config_dict = get_preset(options.preset).to_dict()
        for target in group:
            if stopping.STOP.is_set():
                break
            prefix = OutputLayout(output).item_prefix(target.item_id)
            record = previous[target.item_id]
            if storage.exists(ItemLayout(prefix).state_object):
                future = recolor_item_task.with_options(**retry).submit(
                    run_id, spec, target.item_id, prefix, target.target_prompt, target.color_map, options.seed, limits)
            else:
                request = ItemRequest(
                    item_id=target.item_id, source_uri=record["source_uri"], caption=record["caption"],
                    targets=(target.target_prompt,) if target.target_prompt else (), color_map=target.color_map or {},
                    seed=record.get("seed", 0) if options.seed is None else options.seed,
                    catalogue=record.get("catalogue") or {},
                )
                future = refit_item_task.with_options(**retry).submit(
                    run_id, spec, request, prefix, config_dict, options.preset, limits)
            futures[future] = target
        for future in as_completed(list(futures)):
            try:
                records += future.result() or []  # None: stopped under way, not finished
            except Exception as error:
                target = futures[future]
                records.append(record_of_failure(ItemRequest(item_id=target.item_id, source_uri="", caption=""), error, ""))
    finally:
        ACTIVE_POOLS.pop(run_id, None)
        pool.close()
    return records
