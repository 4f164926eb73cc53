"""One item, from source image and caption to derivatives, colour state and result records.

The item layout under an item's output prefix (any storage URI) is stable:

    PREFIX/result.json                   the latest version's record (written last: marks the item done)
    PREFIX/versions/v0001.json           every version's record, never overwritten
    PREFIX/versions/v0001/master.tif     archival master (16-bit when the source was 16-bit)
    PREFIX/versions/v0001/access.jpg     access copy
    PREFIX/state/color-state.safetensors the colour state (and state.json, a readable copy)
    PREFIX/checkpoints/...               loop checkpoints while a fit is under way

:func:`colorize_item` fits the colour state (stage 1, alignment, stage 2) unless
a matching one is stored, then renders every target (or keeps the primary
colourisation when there is none). :func:`recolor_item` renders a new target
from the stored state only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from diffcolor import __version__
from diffcolor.archive import storage
from diffcolor.method.align import Alignment, align_chroma
from diffcolor.method.color import rgb_to_lab
from diffcolor.method.diffusion import clip_score
from diffcolor.common.errors import DiffColorError, NotGrayscaleError, StateError
from diffcolor.archive.images import SourceImage, encode_access, encode_master, read_image, resize_for_model
from diffcolor.method.merge import merge_full_resolution
from diffcolor.archive.metadata import xmp_for_format
from diffcolor.method.metrics import colorfulness
from diffcolor.method.models import Models
from diffcolor.method.performance import apply_memory_format
from diffcolor.method.presets import PipelineConfig
from diffcolor.method.render import RenderConfig, render_target, resolve_target
from diffcolor.method.stage1 import fit_color_prior
from diffcolor.method.stage2 import fit_in_context, rewrite_caption
from diffcolor.method.state import ColorState, load_state, safetensors_metadata, save_state
from diffcolor.method.training import clear_checkpoints

SOFTWARE = "diffcolor-archive"
Progress = Callable[[str, int, int], None]  # (phase, step, total)


@dataclass(frozen=True)
class ItemRequest:
    """What to do with one item (a manifest row, or the single-image CLI's arguments)."""

    item_id: str
    source_uri: str
    caption: str
    targets: tuple[str, ...] = ()  # free target prompts; none: the primary colourisation is the derivative
    color_map: dict[str, str] = field(default_factory=dict)  # {"dog": "brown"}: one more target, token-aligned
    seed: int = 0
    catalogue: dict = field(default_factory=dict)  # catalogue fields carried into records and metadata
    force: bool = False  # process colour inputs too


@dataclass(frozen=True)
class ItemLayout:
    """The URIs of one item's objects under its output prefix."""

    prefix: str

    @property
    def result(self) -> str:
        return storage.join(self.prefix, "result.json")

    @property
    def versions(self) -> str:
        return storage.join(self.prefix, "versions")

    def record(self, version: int) -> str:
        return storage.join(self.versions, f"v{version:04d}.json")

    def output(self, version: int, name: str) -> str:
        return storage.join(self.versions, f"v{version:04d}", name)

    @property
    def state(self) -> str:
        return storage.join(self.prefix, "state")

    @property
    def checkpoints(self) -> str:
        return storage.join(self.prefix, "checkpoints")

    def next_version(self) -> int:
        """One more than the highest version recorded so far."""
        numbers = [int(uri.rsplit("/v", 1)[1][:4]) for uri in storage.list_files(self.versions) if uri.endswith(".json")]
        return max(numbers, default=0) + 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_json(value) -> str:
    return _sha256(json.dumps(value, sort_keys=True, default=str).encode())


def state_key(source_sha256: str, caption: str, seed: int, config: PipelineConfig, models: Models) -> str:
    """Identifies a colour state: what the fit depends on (not the targets, not the render)."""
    parts = config.to_dict()
    fit = {key: parts[key] for key in ("model_pixels", "stage1", "align", "stage2")}
    return _hash_json([source_sha256, caption, int(seed), fit, models.model_hash])


def cache_key(source_sha256: str, request: ItemRequest, config: PipelineConfig, models: Models) -> str:
    """The item's cache key (spec section 4): image bytes, caption, targets, seed, configuration, models."""
    return _hash_json(
        [source_sha256, request.caption, list(request.targets), dict(sorted(request.color_map.items())),
         int(request.seed), config.to_dict(), models.model_hash, bool(request.force)]
    )


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _base_record(request: ItemRequest, models: Models | None, preset: str, source_sha256: str | None, key: str | None) -> dict:
    return {
        "item_id": request.item_id,
        "version": None,
        "status": None,
        "error_class": None,
        "error_message": None,
        "cache_key": key,
        "source_uri": request.source_uri,
        "source_sha256": source_sha256,
        "caption": request.caption,
        "seed": int(request.seed),
        "preset": preset,
        "model_id": None if models is None else models.model_id,
        "clip_model_id": None if models is None else models.clip_id,
        "model_hash": None if models is None else models.model_hash,
        "weight_sha256": {} if models is None else dict(models.weight_sha256),
        "smoke_run": None if models is None else models.random_weights,
        "weight_dtype": None if models is None else models.provenance["weight_dtype"],  # frozen weights' storage
        "software": SOFTWARE,
        "software_version": __version__,
        "catalogue": dict(request.catalogue),
        "outputs": {},
        "output_sha256": {},
        "seconds": {},
        "finetune_steps_run": 0,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def failure_record(request: ItemRequest, error: Exception, *, status: str = "failed", models: Models | None = None,
                   preset: str = "", source_sha256: str | None = None) -> dict:
    """A record for an item that could not be processed (no version, no outputs)."""
    record = _base_record(request, models, preset, source_sha256, None)
    record.update(status=status, error_class=getattr(error, "error_class", type(error).__name__), error_message=str(error))
    return record


def publish_record(layout: ItemLayout, record: dict) -> None:
    """Writes a version's record, then ``result.json``: the last write marks the item done."""
    if record.get("version") is not None:
        storage.write_json(layout.record(record["version"]), record)
    storage.write_json(layout.result, record)


# ---------------------------------------------------------------------------
# Fitting the colour state.


def _fit_state(models: Models, gray: torch.Tensor, request: ItemRequest, config: PipelineConfig, layout: ItemLayout,
               key: str, seconds: dict, progress: Progress | None, stop_after: dict | None) -> tuple[ColorState, int]:
    """Stage 1, alignment and stage 2, resuming from checkpoints; returns the state and steps run."""
    stop_after = stop_after or {}
    steps_run = 0
    primary_uri = storage.join(layout.checkpoints, "primary.safetensors")

    # Stage 1 and alignment; their result is kept as a checkpoint of its own.
    started = time.perf_counter()
    primary: Alignment | None = None
    if storage.exists(primary_uri):
        stored = storage.read_bytes(primary_uri)
        tensors = load_safetensors(stored)
        if json.loads(safetensors_metadata(stored).get("key", "null")) == key:
            primary = Alignment(chroma=tensors["chroma"], confidence=tensors["confidence"], rgb=tensors["rgb"])
    if primary is None:
        stage1 = fit_color_prior(
            models, gray, request.caption, config.stage1, seed=request.seed,
            checkpoint_prefix=storage.join(layout.checkpoints, "stage1"),
            progress=None if progress is None else (lambda step, _: progress("stage1", step, config.stage1.steps)),
            stop_after=stop_after.get("stage1"),
        )
        steps_run += stage1.loop.steps_run
        seconds["stage1"] = time.perf_counter() - started
        started = time.perf_counter()
        primary = align_chroma(models, stage1.primary, gray, config.align)
        seconds["align"] = time.perf_counter() - started
        storage.write_bytes(
            primary_uri,
            save_safetensors({"chroma": primary.chroma.contiguous(), "confidence": primary.confidence.contiguous(),
                              "rgb": primary.rgb.contiguous()}, metadata={"key": json.dumps(key)}),
        )

    # Stage 2: identifier rewrite, embedding optimisation, fine-tune.
    started = time.perf_counter()
    rewritten = rewrite_caption(request.caption, config.stage2.identifier)
    totals = {"embedding": config.stage2.embed_steps, "finetune": config.stage2.finetune_steps}
    stage2 = fit_in_context(
        models, primary.rgb, rewritten, config.stage2, seed=request.seed,
        checkpoint_prefix=layout.checkpoints,
        progress=None if progress is None else (lambda phase, step, _: progress(phase, step, totals[phase])),
        stop_after=stop_after,
    )
    steps_run += stage2.embed_loop.steps_run + stage2.finetune_loop.steps_run
    seconds["stage2"] = time.perf_counter() - started

    state = ColorState(
        embedding=stage2.embedding, adapter=stage2.adapter, adapter_config=config.stage2.adapter,
        gray=gray.cpu(), primary=primary.rgb, confidence=primary.confidence, rewritten=rewritten,
        seed=int(request.seed), model_hash=models.model_hash,
        config={"state_key": key, **config.to_dict()},
    )
    save_state(state, layout.state)
    for loop in ("stage1", "embedding", "finetune"):
        clear_checkpoints(storage.join(layout.checkpoints, loop))
    storage.remove(primary_uri)
    return state, steps_run


def _load_matching_state(layout: ItemLayout, key: str) -> ColorState | None:
    if not storage.exists(storage.join(layout.state, "color-state.safetensors")):
        return None
    try:
        state = load_state(layout.state)
    except StateError:
        return None
    return state if state.config.get("state_key") == key else None


# ---------------------------------------------------------------------------
# Writing a version.


def _write_version(models: Models, source: SourceImage, layout: ItemLayout, version: int, record: dict,
                   chroma: torch.Tensor, confidence: float, prompt: str, config: PipelineConfig) -> dict:
    """Merges at full resolution, writes master and access copy, and fills the record's metrics."""
    started = time.perf_counter()
    merged = merge_full_resolution(source.gray, chroma[0], source.bit_depth, config.merge)
    record["seconds"]["merge"] = time.perf_counter() - started

    started = time.perf_counter()
    # Provenance embedded in both files (spec section 4); a JPEG gets shortened free texts if they do not fit.
    access_format = config.access_format.upper()
    master = encode_master(merged.rgb, xmp=xmp_for_format(record, "TIFF"))
    access = encode_access(merged.rgb, format=access_format, max_side=config.access_max_side,
                           xmp=xmp_for_format(record, access_format))
    access_ext = {"JPEG": "jpg", "JPG": "jpg", "PNG": "png", "WEBP": "webp"}[access_format]
    outputs = {"master": layout.output(version, "master.tif"), "access": layout.output(version, f"access.{access_ext}")}
    storage.write_bytes(outputs["master"], master)
    storage.write_bytes(outputs["access"], access)
    record["seconds"]["write"] = time.perf_counter() - started
    record["outputs"].update(outputs)
    record["output_sha256"].update(master=_sha256(master), access=_sha256(access))

    small = torch.from_numpy(merged.rgb.astype(np.float32) / (65535.0 if merged.rgb.dtype == np.uint16 else 255.0))
    record.update(
        clip_score=clip_score(models, small.permute(2, 0, 1)[None], prompt),
        colorfulness=colorfulness(merged.rgb),
        max_delta_l=merged.max_delta_l,
        mean_delta_l=merged.mean_delta_l,
        ssim_l=merged.ssim_l,
        gamut_clipped_fraction=merged.gamut_clipped_fraction,
        alignment_confidence=confidence,
        output_width=int(merged.rgb.shape[1]),
        output_height=int(merged.rgb.shape[0]),
        output_bit_depth=source.bit_depth,
    )
    return record


def _read_source(request: ItemRequest) -> tuple[bytes, SourceImage]:
    data = storage.read_bytes(request.source_uri)
    return data, read_image(data, request.source_uri)


def colorize_item(
    models: Models,
    request: ItemRequest,
    output_prefix: str,
    config: PipelineConfig,
    *,
    preset: str = "",
    reuse: bool = True,
    progress: Progress | None = None,
    stop_after: dict | None = None,
) -> list[dict]:
    """Colourises one item; returns the records written (one per version, in order).

    Raises the item's error (BadImageError, InputUnavailableError,
    PromptError, ...) after publishing a ``failed`` record, except for a colour
    input, which gets a ``not_grayscale`` record and no error.
    """
    layout = ItemLayout(output_prefix)
    source_sha256 = None
    try:
        # 1. Read the source (never written) and class it.
        started = time.perf_counter()
        data, source = _read_source(request)
        source_sha256 = _sha256(data)
        read_seconds = time.perf_counter() - started
        if source.tone == "color" and not request.force:
            raise NotGrayscaleError(f"'{request.source_uri}' is a colour photograph; use --force to colourise it anyway")

        # 2. Skip when this exact work is already done.
        key = cache_key(source_sha256, request, config, models)
        if reuse and storage.exists(layout.result):
            previous = storage.read_json(layout.result)
            if previous.get("cache_key") == key and previous.get("status") == "done":
                # The record of this run: nothing was computed, nothing written.
                return [dict(previous, status="skipped_done", finetune_steps_run=0, seconds={})]

        # 3. Check prompts before any GPU work.
        rewritten = rewrite_caption(request.caption, config.stage2.identifier)
        if request.color_map:
            from diffcolor.method.stage2 import build_target_prompt, check_token_alignment

            check_token_alignment(models, rewritten, build_target_prompt(rewritten, request.color_map))

        # 4. The gray image at model resolution, and the convolutions in stage 1's memory layout before any
        #    model runs: a resumed item (stage 1 restored) then aligns in the same layout as an uninterrupted one.
        gray = torch.from_numpy(resize_for_model(source.gray, config.model_pixels, models.vae_scale_factor))[None, None].float()
        apply_memory_format([models.unet, models.vae], config.stage1.performance, models.device)

        # 5. The colour state: reuse a matching stored one, else fit it.
        if device_is_cuda := models.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(models.device)
        seconds: dict[str, float] = {"read": read_seconds}
        fit_key = state_key(source_sha256, request.caption, request.seed, config, models)
        state = _load_matching_state(layout, fit_key)
        steps_run = 0
        if state is None:
            state, steps_run = _fit_state(models, gray, request, config, layout, fit_key, seconds, progress, stop_after)
        state_uri = storage.join(layout.state, "color-state.safetensors")
        state_sha = _sha256(storage.read_bytes(state_uri))

        # 6. One version per target; the primary colourisation when there is none.
        targets: list[tuple[str | None, dict]] = [(t, {}) for t in request.targets]
        if request.color_map:
            targets.append((None, request.color_map))
        records = []
        version = layout.next_version()
        for target, color_map in targets or [(None, None)]:
            record = _base_record(request, models, preset, source_sha256, key)
            record["seconds"] = dict(seconds)
            record["finetune_steps_run"] = steps_run if not records else 0
            record.update(version=version, status="done", rewritten_caption=state.rewritten.text,
                          source={"width": source.width, "height": source.height, "bit_depth": source.bit_depth,
                                  "format": source.format, "tone": source.tone})
            record["outputs"]["state"] = state_uri
            record["output_sha256"]["state"] = state_sha
            if color_map is None:
                record.update(kind="primary", target_prompt=None, color_map=None, eta=None)
                chroma, confidence, prompt = rgb_to_lab(state.primary)[:, 1:], float(state.confidence.mean()), request.caption
            else:
                started = time.perf_counter()
                prompt = resolve_target(models, state, target, color_map)
                render = render_target(models, state, prompt, config.render, config.align, seed=request.seed)
                record["seconds"]["render"] = time.perf_counter() - started
                record.update(kind="render", target_prompt=prompt, color_map=color_map or None, eta=config.render.eta)
                chroma, confidence = render.alignment.chroma, render.alignment.mean_confidence
            _write_version(models, source, layout, version, record, chroma, confidence, prompt, config)
            record["peak_memory_bytes"] = _peak_memory_bytes(models.device)
            record["peak_memory_kind"] = "device" if device_is_cuda else "host_rss"
            publish_record(layout, record)
            records.append(record)
            version += 1
        return records
    except NotGrayscaleError as error:
        record = failure_record(request, error, status="not_grayscale", models=models, preset=preset, source_sha256=source_sha256)
        publish_record(layout, record)
        return [record]
    except DiffColorError as error:
        publish_record(layout, failure_record(request, error, models=models, preset=preset, source_sha256=source_sha256))
        raise


def recolor_item(
    models: Models,
    output_prefix: str,
    *,
    target: str | None = None,
    color_map: dict[str, str] | None = None,
    render: RenderConfig | None = None,
    seed: int | None = None,
    config: PipelineConfig | None = None,
) -> dict:
    """Renders a new target from the item's stored colour state and adds it as a new version.

    No fine-tuning happens (``finetune_steps_run`` is 0). The previous versions
    stay. Raises StateError when the item has no usable state, PromptError for
    a bad target, InputUnavailableError when the source is gone.
    """
    layout = ItemLayout(output_prefix)
    # 1. What the item is: its latest record and its colour state.
    if not storage.exists(layout.result):
        raise StateError(f"'{output_prefix}' holds no result.json: colourise the item first")
    previous = storage.read_json(layout.result)
    state = load_state(layout.state)
    stored_config = PipelineConfig.from_dict({k: v for k, v in state.config.items() if k != "state_key"})
    config = config or stored_config
    render = render or config.render
    request = ItemRequest(
        item_id=previous["item_id"], source_uri=previous["source_uri"], caption=state.rewritten.caption,
        seed=state.seed if seed is None else int(seed), catalogue=previous.get("catalogue") or {},
    )

    # 2. The source, unchanged since the state was made.
    started = time.perf_counter()
    data, source = _read_source(request)
    source_sha256 = _sha256(data)
    if previous.get("source_sha256") and previous["source_sha256"] != source_sha256:
        raise StateError(f"source '{request.source_uri}' changed since the colour state was made; colourise it again")
    seconds = {"read": time.perf_counter() - started}

    # 3. Render from the state alone.
    started = time.perf_counter()
    prompt = resolve_target(models, state, target, color_map)
    rendered = render_target(models, state, prompt, render, config.align, seed=request.seed)
    seconds["render"] = time.perf_counter() - started

    # 4. A new version, the previous ones kept.
    version = layout.next_version()
    key = _hash_json([source_sha256, state.config.get("state_key"), prompt, dataclasses.asdict(render), request.seed])
    record = _base_record(request, models, previous.get("preset", ""), source_sha256, key)
    state_uri = storage.join(layout.state, "color-state.safetensors")
    record.update(version=version, status="done", kind="render", target_prompt=prompt, color_map=color_map or None,
                  eta=render.eta, rewritten_caption=state.rewritten.text, previous_version=previous.get("version"),
                  source=previous.get("source"), seconds=seconds)
    record["outputs"]["state"] = state_uri
    record["output_sha256"]["state"] = _sha256(storage.read_bytes(state_uri))
    _write_version(models, source, layout, version, record, rendered.alignment.chroma, rendered.alignment.mean_confidence, prompt, config)
    record["peak_memory_bytes"] = _peak_memory_bytes(models.device)
    record["peak_memory_kind"] = "device" if models.device.type == "cuda" else "host_rss"
    publish_record(layout, record)
    return record
