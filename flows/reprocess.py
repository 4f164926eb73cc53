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
from typing import Any, Literal

import pyarrow.parquet as pq
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field, field_validator

from diffcolor.archive import storage
from diffcolor.archive.items import failure_record
from diffcolor.archive.layout import ItemLayout, OutputLayout
from diffcolor.archive.manifest import column_spellings
from diffcolor.archive.storage import ReadLimits
from diffcolor.common.errors import PromptError, StateError
from diffcolor.common.ids import UnsafeItemIdError, normalize_item_id
from diffcolor.common.items import ItemRequest
from diffcolor.common.redact import redact, refuse_credentials
from diffcolor.method.doctor import preflight_model
from flows import stopping, worker
from flows.checks import check_output_writable
from flows.pool import ModelSpec
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
    overrides: dict[str, Any] = Field(default_factory=dict, description='configuration fields to change (JSON values), '
                                      'e.g. {"render.steps": 40}: of the preset for a full fit, of the item\'s stored '
                                      'configuration for a render')
    allow_download: bool = False
    weight_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="frozen weights' storage: auto (bf16 on CUDA), bf16 or fp32")
    workers_per_device: int = Field(1, ge=1, description="worker processes per GPU (or on the CPU)")
    pool: Literal["local", "inline"] = Field(
        "local", description="local (worker processes on this machine's GPUs) or inline (in the flow's own process)")
    max_source_mb: float = Field(ReadLimits.max_bytes / 2**20, gt=0, description="largest source read (MiB)")
    source_timeout_seconds: float = Field(ReadLimits.seconds, gt=0, description="longest read of a source")


def read_targets(uri: str) -> list[Retarget]:
    """Targets from a Parquet file with ``item_id`` and ``target_prompt`` and/or ``color_map`` columns (or the
    manifest's other spellings of them: ``colour_map``, ``target_prompts``).

    Raises PromptError naming the file (and the row) for a file without those columns, a colour map that
    is not a JSON object, or an unsafe item id.
    """
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    shown = redact(uri)
    # The manifest's spellings of these columns are read as them (colour_map, target_prompts, Item-ID); a column
    # spelt twice is refused naming both.
    spellings, problems = column_spellings(table.column_names)
    if problems:
        raise PromptError(f"targets file '{shown}': {problems[0].message}")
    names = {name: "target_prompt" if canonical == "target_prompts" else canonical for name, canonical in spellings.items()}
    table = table.rename_columns([names.get(name, name) for name in table.column_names])
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
                      color_map: dict | None, seed: int | None, limits: ReadLimits,
                      overrides: dict | None = None) -> list[dict] | None:
    record = run_on_worker(run_id, spec, worker.run_recolor, prefix, target, color_map, seed, limits, overrides)
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
    return refusing("reprocess", _reprocess, output, targets, options)


def _reprocess(output: str, targets: list[Retarget], options: ReprocessOptions):
    refuse_credentials(output, what="flow parameter")  # a deployment's parameters are stored
    output = storage.absolute(output)  # records name absolute URIs
    check_output_writable(output)  # before any model loads
    # The preset of the full fit, for items without a colour state.
    run = Run(output, "reprocess", preset=options.preset, overrides=options.overrides,
              config=resolve_config(options.preset, options.overrides))

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
            run.add(_never_colourised(target))
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
    run.write_config(models=sorted(by_model), random_weights=smoke, device=options.device, pool=options.pool,
                     workers_per_device=options.workers_per_device, options=options.model_dump(mode="json"))

    # 4. Model by model: a pool with the models loaded once, then every item of that model.
    records = run.records
    notify("start", run.run_id, len(targets))
    for record in records.head:  # targets refused above count as done with
        notify("item", sum(records.items.values()), len(targets), [record])
    for model, group in by_model.items():
        if stopping.STOP.is_set():
            break
        for record in _run_group(run, model, group, previous, options):
            run.add(record)
            notify("item", len(records), len(targets), [record])

    # 5. The run's results, report and summary.
    return run.outcome(run.finish(smoke=smoke))


def _run_group(run: Run, model: str, group: list[Retarget], previous: dict, options: ReprocessOptions) -> list[dict]:
    """Renders (or, without a colour state, refits) every target of ``group`` on a pool holding ``model``."""
    spec = ModelSpec(model=model, clip=options.clip, allow_download=options.allow_download,
                     weight_dtype=options.weight_dtype)
    limits = ReadLimits.from_mib(options.max_source_mb, options.source_timeout_seconds)
    retry = {"retries": options.retries, "retry_delay_seconds": options.retry_delay_seconds}
    run_id, output, config_dict = run.run_id, run.output, run.config.to_dict()
    records, futures = [], {}
    with run.pool(spec, device=options.device, workers_per_device=options.workers_per_device,
                  inline=options.pool == "inline", warm=True):
        for target in group:
            if stopping.STOP.is_set():
                break
            prefix = OutputLayout(output).item_prefix(target.item_id)
            record = previous[target.item_id]
            if storage.exists(ItemLayout(prefix).state_object):
                future = recolor_item_task.with_options(**retry).submit(
                    run_id, spec, target.item_id, prefix, target.target_prompt, target.color_map, options.seed, limits,
                    options.overrides)
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
    return records
