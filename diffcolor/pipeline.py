"""One item, from source image and caption to derivatives, colour state and result records.

This is the one module that joins the two rooms of the package: the method
(:mod:`diffcolor.method`, tensors in, tensors out) and the archive
(:mod:`diffcolor.archive`, every file, object and record). The item layout under
an item's output prefix is :class:`diffcolor.archive.layout.ItemLayout`'s.

:func:`colorize_item` fits the colour state (stage 1, alignment, stage 2) unless
a matching one is stored, then renders every target (or keeps the primary
colourisation when there is none). :func:`recolor_item` renders a new target
from the stored state only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from diffcolor.archive import storage
from diffcolor.archive.credentials import UNSIGNED, Signing, sign, sign_file
from diffcolor.archive.images import (
    AccessCopy,
    Reduction,
    SourceImage,
    read_image,
    write_master_strips,
)
from diffcolor.archive.items import (
    CheckpointFolder,
    base_record,
    committed_versions,
    failure_record,
    outputs_whole,
    publish_failure,
    publish_record,
)
from diffcolor.archive.layout import ItemLayout
from diffcolor.archive.metadata import xmp_for_format
from diffcolor.archive.states import (
    has_state,
    publish_state,
    read_state,
    read_state_lora,
    restore_state_lora,
)
from diffcolor.archive.storage import ReadLimits
from diffcolor.common.captions import build_target_prompt, prompt_length_problems, rewrite_caption
from diffcolor.common.errors import DiffColorError, MissingObjectError, NotGrayscaleError, PromptError, StateError
from diffcolor.common.items import ItemRequest
from diffcolor.common.keys import (
    cache_key,
    render_key,
    sha256_hex,
    state_key,
    version_key,
)
from diffcolor.common.record import VersionRecord
from diffcolor.common.redact import redact
from diffcolor.common.tensorfiles import read_metadata
from diffcolor.method.align import Alignment, align_chroma
from diffcolor.method.color import rgb_to_lab
from diffcolor.method.diffusion import check_prompt_fits, clip_score, resize_for_model
from diffcolor.method.merge import StripMerge
from diffcolor.method.metrics import ColorfulnessAccumulator
from diffcolor.method.models import Models, prompt_limit
from diffcolor.method.performance import apply_memory_format
from diffcolor.method.presets import PipelineConfig, apply_overrides
from diffcolor.method.render import RenderConfig, Target, render_target, resolve_target
from diffcolor.method.stage1 import fit_color_prior
from diffcolor.method.stage2 import check_token_alignment, fit_in_context
from diffcolor.method.state import (
    ColorState,
    diffusers_lora_bytes,
    export_state,
    state_from_bytes,
)
from diffcolor.method.training import clear_checkpoints

Progress = Callable[[str, int, int], None]  # (phase, step, total)
FIT_LOOPS = ("stage1", "embedding", "finetune")  # the checkpoint folders of the fit, one per loop
PRIMARY_CHECKPOINT = "primary.safetensors"  # stage 1 and alignment's result, kept until the state is stored


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory of the item so far and what it measures: device memory on CUDA, else the process's RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "device"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host_rss"  # Linux reports KiB


# ---------------------------------------------------------------------------
# Fitting the colour state.


def _load_primary(checkpoints: CheckpointFolder, key: str) -> Alignment | None:
    """Stage 1 and alignment's stored result for this state key, if a fit was interrupted after them."""
    if PRIMARY_CHECKPOINT not in checkpoints.names():
        return None
    stored = checkpoints.read(PRIMARY_CHECKPOINT)
    if json.loads(read_metadata(stored).get("key", "null")) != key:
        return None
    tensors = load_safetensors(stored)
    return Alignment(chroma=tensors["chroma"], confidence=tensors["confidence"], rgb=tensors["rgb"])


def _save_primary(checkpoints: CheckpointFolder, primary: Alignment, key: str) -> None:
    tensors = {"chroma": primary.chroma.contiguous(), "confidence": primary.confidence.contiguous(),
               "rgb": primary.rgb.contiguous()}
    checkpoints.write(PRIMARY_CHECKPOINT, save_safetensors(tensors, metadata={"key": json.dumps(key)}))


def _fit_state(models: Models, gray: torch.Tensor, request: ItemRequest, config: PipelineConfig, layout: ItemLayout,
               key: str, seconds: dict, progress: Progress | None) -> tuple[ColorState, int]:
    """Stage 1, alignment and stage 2, resuming from checkpoints; publishes the state; returns it and the steps run."""
    checkpoints = CheckpointFolder(layout.checkpoints)
    steps_run = 0

    # 1. Stage 1 and alignment; their result is kept as a checkpoint of its own.
    started = time.perf_counter()
    primary = _load_primary(checkpoints, key)
    if primary is None:
        stage1 = fit_color_prior(
            models, gray, request.caption, config.stage1, seed=request.seed, checkpoints=checkpoints.child("stage1"),
            progress=None if progress is None else (lambda step, _: progress("stage1", step, config.stage1.steps)),
        )
        steps_run += stage1.loop.steps_run
        seconds["stage1"] = time.perf_counter() - started
        started = time.perf_counter()
        primary = align_chroma(models, stage1.primary, gray, config.align)
        seconds["align"] = time.perf_counter() - started
        _save_primary(checkpoints, primary, key)

    # 2. Stage 2: identifier rewrite, embedding optimisation, fine-tune.
    started = time.perf_counter()
    rewritten = rewrite_caption(request.caption, config.stage2.identifier, config.stage2.identifier_rule)
    totals = {"embedding": config.stage2.embed_steps, "finetune": config.stage2.finetune_steps}
    stage2 = fit_in_context(
        models, primary.rgb, rewritten, config.stage2, seed=request.seed, checkpoints=checkpoints,
        progress=None if progress is None else (lambda phase, step, _: progress(phase, step, totals[phase])),
    )
    steps_run += stage2.embed_loop.steps_run + stage2.finetune_loop.steps_run
    seconds["stage2"] = time.perf_counter() - started

    # 3. The colour state, published with its diffusers LoRA (written first: the state is the commit point);
    #    then the checkpoints it makes useless go.
    state = ColorState(
        embedding=stage2.embedding, adapter=stage2.adapter, adapter_config=config.stage2.adapter,
        gray=gray.cpu(), primary=primary.rgb, confidence=primary.confidence, rewritten=rewritten,
        seed=int(request.seed), model_hash=models.model_hash,
        config={"state_key": key, **config.to_dict()}, base_model_id=models.model_id,
    )
    state_bytes, lora = export_state(state)
    publish_state(layout.state, state_bytes, lora=lora)
    for loop in FIT_LOOPS:
        clear_checkpoints(checkpoints.child(loop))
    checkpoints.remove(PRIMARY_CHECKPOINT)
    storage.remove_empty_folders(layout.checkpoints)  # no empty folders left behind on a local disk
    return state, steps_run


def _load_matching_state(layout: ItemLayout, key: str) -> ColorState | None:
    """The stored colour state when it was made for ``key``; None when there is none or it cannot be used.

    A matching state whose diffusers LoRA is missing or not its own (a re-fit
    stopped between writing the LoRA and the state) gets its LoRA written again
    from its adapter, which gives the same bytes.
    """
    if not has_state(layout.state):
        return None
    try:
        data = read_state(layout.state)
        state = state_from_bytes(data, layout.state_object)
    except StateError:
        return None
    if state.config.get("state_key") != key:
        return None
    try:
        read_state_lora(layout.state, data)
    except StateError:
        lora = diffusers_lora_bytes(state)
        try:
            restore_state_lora(layout.state, data, lora)
        except StateError:  # the adapter no longer gives the LoRA its manifest names: fit again
            return None
    return state


# ---------------------------------------------------------------------------
# Writing a version.


@dataclass(frozen=True)
class _Source:
    """The source as read: its bytes (the C2PA parent ingredient; None when nothing is signed) and decoded image,
    and the signing material."""

    data: bytes | None
    image: SourceImage
    signing: Signing | None


def _write_version(models: Models, read: _Source, layout: ItemLayout, version: int, record: VersionRecord,
                   chroma: torch.Tensor, confidence: float, prompt: str, config: PipelineConfig,
                   progress: Progress | None = None) -> VersionRecord:
    """Merges at full resolution, writes master and access copy (signed with content credentials when a key
    is configured), fills the record's metrics and publishes it. ``progress`` follows the merge strip by strip
    (phase ``merge``: the master's strips are encoded as they come) and the start of each later phase
    (``access``, ``write``).

    The merge's strips go straight into the master's staging file (encoded as
    they come), the access copy's and CLIP's reductions and the colourfulness
    sums: the output is never held whole, encoded or not (docs/PERFORMANCE.md).
    """
    source = read.image
    size = source.codes.shape
    started = time.perf_counter()
    access_format = config.access_format.upper()
    access_format = "JPEG" if access_format == "JPG" else access_format
    access_ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[access_format]
    outputs = {"master": layout.master(version), "access": layout.access(version, access_ext)}

    # 1. What the output's strips feed besides the master: the access copy (provenance embedded; a JPEG gets
    #    shortened free texts if they do not fit), CLIP's input (reduced by whole factors while its short side
    #    stays twice CLIP's: it resizes to that anyway) and colourfulness.
    access = AccessCopy(size, access_format, max_side=config.access_max_side,
                        xmp=xmp_for_format(record, access_format), resolution=source.resolution)
    clip_input = Reduction(size, max(1, min(size) // (2 * models.clip_image_size)))
    colour = ColorfulnessAccumulator()
    merge_device = models.device if models.device.type == "cuda" else None
    merge = StripMerge(source.codes, chroma[0], source.bit_depth, config.merge, device=merge_device,
                       progress=_phase(progress, "merge"))
    merge_seconds = 0.0

    def merged_strips() -> Iterator[np.ndarray]:
        nonlocal merge_seconds
        begun = time.perf_counter()
        for strip in merge:
            merge_seconds += time.perf_counter() - begun
            access.add(strip)
            clip_input.add(strip)
            colour.add(strip)
            yield strip
            begun = time.perf_counter()
        merge_seconds += time.perf_counter() - begun

    # 2. Full-resolution merge (the source's L*, the model's chroma; on the item's GPU when it has one) into
    #    the master's staging file, published from there with its sha256 read as it is sent; the access copy
    #    and the signatures (docs/DESIGN.md §4.4) before it.
    with storage.staged(outputs["master"]) as master:
        master.write(lambda stream: write_master_strips(
            stream, merged_strips(), size, np.uint8 if source.bit_depth == 8 else np.uint16,
            xmp_for_format(record, "TIFF"), resolution=source.resolution, compression=config.master_compression))
        _begin(progress, "access")
        access_bytes = access.encode()
        sidecar = None
        _begin(progress, "write")
        if read.signing is not None:
            record["content_credentials"] = {"signed": True, "signer": read.signing.signer_name,
                                             "algorithm": read.signing.algorithm,
                                             "master": "embedded" if read.signing.embed_in_tiff else "sidecar"}
            sidecar = sign_file(master.path, "TIFF", record, read.data, source.format, read.signing)
            access_bytes, _ = sign(access_bytes, access_format, record, read.data, source.format, read.signing)
        else:
            record["content_credentials"] = dict(UNSIGNED)
        if sidecar is not None:
            outputs["master_credentials"] = layout.master_credentials(version)
            storage.write_bytes(outputs["master_credentials"], sidecar)
        master_sha256 = master.publish()
    storage.write_bytes(outputs["access"], access_bytes)
    record["seconds"]["merge"] = merge_seconds
    record["seconds"]["write"] = time.perf_counter() - started - merge_seconds
    record["outputs"].update(outputs)
    record["output_sha256"].update(master=master_sha256, access=sha256_hex(access_bytes))
    if sidecar is not None:
        record["output_sha256"]["master_credentials"] = sha256_hex(sidecar)

    # 3. Metrics (docs/DESIGN.md §7), then the record: the version's, then result.json.
    small = torch.from_numpy(np.asarray(clip_input.image(), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    numbers = merge.numbers
    record.update(
        clip_score=clip_score(models, small, prompt),
        colorfulness=colour.result(),
        max_delta_l=numbers.max_delta_l,
        mean_delta_l=numbers.mean_delta_l,
        ssim_l=numbers.ssim_l,
        gamut_clipped_fraction=numbers.gamut_clipped_fraction,
        alignment_confidence=confidence,
        output_width=int(size[1]),
        output_height=int(size[0]),
        output_bit_depth=source.bit_depth,
    )
    record["peak_memory_bytes"], record["peak_memory_kind"] = _peak_memory(models.device)
    return publish_record(layout, record)


def _phase(progress: Progress | None, phase: str) -> Callable[[int, int], None] | None:
    """``progress`` as a ``(step, total)`` callback of one phase (None stays None)."""
    return None if progress is None else (lambda step, total: progress(phase, step, total))


def _report_pixels(progress: Progress | None, source: SourceImage) -> None:
    """Reports the source's size once it is read (phase ``read``, its pixels as step and total): a display
    weighs the item's merge and encodes by it."""
    if progress is not None:
        progress("read", source.width * source.height, source.width * source.height)


def _begin(progress: Progress | None, phase: str) -> None:
    """Reports that ``phase`` (one that has no steps of its own) starts: step 0 of 1."""
    if progress is not None:
        progress(phase, 0, 1)


def _readable_result(layout: ItemLayout) -> VersionRecord | None:
    """The item's ``result.json``; None when there is none or it is not a JSON object (then the work is redone)."""
    try:
        previous = storage.read_json(layout.result) if storage.exists(layout.result) else None
    except (MissingObjectError, ValueError):
        return None
    return previous if isinstance(previous, dict) else None


def _resolution(source: SourceImage) -> dict | None:
    """The source's stated resolution as its record names it (kept in both derivatives)."""
    found = source.resolution
    return None if found is None else {"x": found.x, "y": found.y, "unit": found.unit}


def _read_source(request: ItemRequest, limits: ReadLimits, *,
                 keep_bytes: bool = False) -> tuple[bytes | None, str, SourceImage]:
    """The source's bytes (a bounded read) when ``keep_bytes`` (content credentials sign them), else None, so that
    a large scan's file is not held beside its pixels; their sha256; the decoded image (its gray plane as codes, no
    RGB copy: the method needs neither). Errors name the item and the (redacted) file."""
    data = storage.read_bytes(request.source_uri, limits)
    source = read_image(data, f"item '{request.item_id}': {redact(request.source_uri)}", keep_rgb=False)
    return (data if keep_bytes else None), sha256_hex(data), source


def _model_gray(source: SourceImage, pixels: int, multiple: int) -> np.ndarray:
    """The gray image at model resolution: a large scan is first reduced by block means to at least three times the
    model's size along each side (Pillow's ``reducing_gap``: the same result within a fraction of a code), then
    resampled with Lanczos; never a full-size float copy of a scan that needs reducing."""
    factor = max(1, int(math.sqrt(source.width * source.height / pixels) / 3))
    return resize_for_model(source.reduced(factor), pixels, multiple)


def _state_output(layout: ItemLayout) -> tuple[str, str]:
    """The stored colour state's URI and sha256, as every version's record names them."""
    return layout.state_object, sha256_hex(storage.read_bytes(layout.state_object))


def _prompt_fields(target: Target) -> dict:
    """A render's prompts in its record: ``target_prompt`` for people, ``model_prompt`` and how it lines up."""
    return {"target_prompt": target.prompt, "model_prompt": target.model_prompt,
            "prompt_alignment": target.alignment, "prompt_warning": target.warning}


def _targets(request: ItemRequest) -> list[tuple[str | None, dict | None]]:
    """What each version renders, in order: ``(prompt, {})`` per target, ``(None, map)`` for the colour map,
    or ``(None, None)``, the primary colourisation, when there is neither."""
    targets: list[tuple[str | None, dict | None]] = [(target, {}) for target in request.targets]
    if request.color_map:
        targets.append((None, request.color_map))
    return targets or [(None, None)]


def _render_versions(models: Models, request: ItemRequest, source: _Source, layout: ItemLayout, state: ColorState,
                     config: PipelineConfig, new_record: Callable[[], VersionRecord], steps_run: int,
                     progress: Progress | None) -> list[VersionRecord]:
    """One version per target prompt and one for the colour map; the primary colourisation when there is neither.

    ``new_record()`` gives each version its base record; the fit's steps are
    counted on the first version only. A version this exact work committed
    before (an earlier attempt that failed after it) is reused, not rendered
    again, so a retry never adds a duplicate; ``result.json`` then names the last.
    """
    targets = _targets(request)
    committed = committed_versions(layout)
    state_uri, state_sha = _state_output(layout)
    records = []
    version = layout.next_version()
    for index, (target, color_map) in enumerate(targets):
        record = new_record()
        key = version_key(record["cache_key"], index, target, color_map)
        if key in committed:
            records.append(committed[key])
            continue
        if progress is not None:
            progress("versions", index + 1, len(targets))
        record.update(version=version, version_key=key, status="done", rewritten_caption=state.rewritten.text,
                      finetune_steps_run=steps_run if not records else 0)
        record["outputs"]["state"] = state_uri
        record["output_sha256"]["state"] = state_sha
        if color_map is None:
            record.update(kind="primary", target_prompt=None, color_map=None, alpha=None, model_prompt=request.caption,
                          prompt_alignment="caption", prompt_warning=None)
            chroma, confidence, prompt = rgb_to_lab(state.primary)[:, 1:], float(state.confidence.mean()), request.caption
        else:
            started = time.perf_counter()
            wanted = resolve_target(models, state, target, color_map)
            render = render_target(models, state, wanted.model_prompt, config.render, config.align, seed=request.seed)
            record["seconds"]["render"] = time.perf_counter() - started
            record.update(kind="render", color_map=color_map or None, alpha=config.render.alpha, **_prompt_fields(wanted))
            chroma, confidence, prompt = render.alignment.chroma, render.alignment.mean_confidence, wanted.prompt
        records.append(_write_version(models, source, layout, version, record, chroma, confidence, prompt, config,
                                      progress))
        version += 1
    if records[-1] is committed.get(records[-1].get("version_key")):
        publish_record(layout, records[-1])  # every version was committed before: result.json names the last again
    return records


def colorize_item(
    models: Models,
    request: ItemRequest,
    output_prefix: str,
    config: PipelineConfig,
    *,
    preset: str = "",
    progress: Progress | None = None,
    limits: ReadLimits = ReadLimits(),
    signing: Signing | None = None,
) -> list[VersionRecord]:
    """Colourises one item; returns its records (one per version, in order), as written (redacted).

    ``signing`` signs every derivative with content credentials
    (:mod:`diffcolor.archive.credentials`); None writes them unsigned.

    ``progress(phase, step, total)`` follows the source's size once read (phase
    ``read``), the fit's loops, the versions (phase ``versions``) and each one's
    merge and writes (see :func:`_write_version`); whatever it raises interrupts the work there (the
    checkpoints and committed versions stay, so a rerun resumes). ``limits``
    bound the read of the source. Raises the item's error (BadImageError,
    InputUnavailableError, PromptError, ...) after recording a ``failed``
    attempt, except for a colour input, which gets a ``not_grayscale`` record
    and no error. A failure never replaces a done version's ``result.json``.
    """
    layout = ItemLayout(output_prefix)
    source_sha256 = None
    try:
        # 1. Read the source (never written) and class it.
        started = time.perf_counter()
        data, source_sha256, source = _read_source(request, limits, keep_bytes=signing is not None)
        read_seconds = time.perf_counter() - started
        _report_pixels(progress, source)
        if source.tone == "color" and not request.force:
            raise NotGrayscaleError(f"item '{request.item_id}': '{redact(request.source_uri)}' is a colour photograph; "
                                    "use --force to colourise it anyway")

        # 2. Skip when this exact work is already done: result.json names this request's last version
        #    (versions are committed in order, so every earlier one is committed too).
        config_dict = config.to_dict()
        key = cache_key(source_sha256, request, config_dict, models.model_hash)
        targets = _targets(request)
        last_version_key = version_key(key, len(targets) - 1, *targets[-1])
        previous = _readable_result(layout)
        if previous is not None:
            legacy = previous.get("version_key") is None and previous.get("cache_key") == key  # written before keys
            if (previous.get("status") == "done" and (previous.get("version_key") == last_version_key or legacy)
                    and outputs_whole(previous)):  # a lost or altered output is made again
                # The record of this run: nothing was computed, nothing written.
                return [dict(previous, status="skipped_done", finetune_steps_run=0, seconds={})]

        # 3. Check prompts before any GPU work.
        rewritten = rewrite_caption(request.caption, config.stage2.identifier, config.stage2.identifier_rule)
        check_prompt_fits(models, request.caption, "the caption", clip=True)
        too_long = prompt_length_problems(prompt_limit(models.tokenizer), rewritten, request.color_map,
                                          request.targets)
        if too_long:
            raise PromptError("; ".join(problem for _, problem in too_long))
        if request.color_map:
            check_token_alignment(models, rewritten, build_target_prompt(rewritten, request.color_map))

        # 4. The gray image at model resolution, and the convolutions in stage 1's memory layout before any
        #    model runs: a resumed item (stage 1 restored) then aligns in the same layout as an uninterrupted one.
        gray = torch.from_numpy(_model_gray(source, models.working_pixels(config.model_pixels), models.vae_scale_factor))[None, None].float()
        apply_memory_format([models.unet, models.vae], config.stage1.performance, models.device)

        # 5. The colour state: reuse a matching stored one, else fit it.
        if models.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(models.device)
        seconds: dict[str, float] = {"read": read_seconds}
        fit_key = state_key(source_sha256, request.caption, request.seed, config_dict, models.model_hash)
        state = _load_matching_state(layout, fit_key)
        steps_run = 0
        if state is None:
            state, steps_run = _fit_state(models, gray, request, config, layout, fit_key, seconds, progress)

        # 6. One version per target; the primary colourisation when there is none.
        def new_record() -> VersionRecord:
            record = base_record(request, models.provenance, preset, source_sha256, key)
            record.update(seconds=dict(seconds), source={"width": source.width, "height": source.height,
                                                         "bit_depth": source.bit_depth, "format": source.format,
                                                         "tone": source.tone, "resolution": _resolution(source)})
            return record

        return _render_versions(models, request, _Source(data, source, signing), layout, state, config, new_record,
                                steps_run, progress)
    except NotGrayscaleError as error:
        return [publish_failure(layout, failure_record(request, error, status="not_grayscale", preset=preset,
                                                       provenance=models.provenance, source_sha256=source_sha256))]
    except DiffColorError as error:
        publish_failure(layout, failure_record(request, error, provenance=models.provenance, preset=preset,
                                               source_sha256=source_sha256))
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
    limits: ReadLimits = ReadLimits(),
    progress: Progress | None = None,
    signing: Signing | None = None,
    overrides: dict | None = None,
) -> VersionRecord:
    """Renders a new target from the item's stored colour state and adds it as a new version.

    ``config`` defaults to the configuration the state was made with; ``overrides`` (``--set``) change its
    fields, as :func:`diffcolor.method.presets.apply_overrides` does.

    No fine-tuning happens (``finetune_steps_run`` is 0). The previous versions
    stay; the same render asked again (same state, prompt, settings and seed)
    returns the version that has it instead of adding a duplicate.
    ``progress(phase, step, total)`` is called after the read, before the version
    is written and during its merge and writes;
    whatever it raises stops the render there. Raises
    StateError when the item has no usable state, PromptError for a bad
    target, InputUnavailableError when the source is gone.
    """
    layout = ItemLayout(output_prefix)
    # 1. What the item is: its latest record and its colour state.
    if not storage.exists(layout.result):
        raise StateError(f"'{output_prefix}' holds no result.json: colourise the item first")
    previous = storage.read_json(layout.result)
    state = state_from_bytes(read_state(layout.state), layout.state_object)
    config = apply_overrides(config or stored_config(state), overrides or {})
    render = render or config.render
    request = ItemRequest(
        item_id=previous["item_id"], source_uri=previous["source_uri"], caption=state.rewritten.caption,
        seed=state.seed if seed is None else int(seed), catalogue=previous.get("catalogue") or {},
    )

    # 2. The source, unchanged since the state was made.
    started = time.perf_counter()
    data, source_sha256, source = _read_source(request, limits, keep_bytes=signing is not None)
    if previous.get("source_sha256") and previous["source_sha256"] != source_sha256:
        raise StateError(f"item '{request.item_id}': source '{redact(request.source_uri)}' changed since the colour "
                         "state was made; colourise it again")
    seconds = {"read": time.perf_counter() - started}
    _report_pixels(progress, source)

    # 3. The same render committed before (a retry after a failure that followed it) is the answer.
    wanted = resolve_target(models, state, target, color_map)
    key = render_key(source_sha256, state.config.get("state_key"), wanted.model_prompt, dataclasses.asdict(render),
                     request.seed)
    committed = committed_versions(layout)
    if key in committed:
        return publish_record(layout, committed[key])

    # 4. Render from the state alone.
    started = time.perf_counter()
    rendered = render_target(models, state, wanted.model_prompt, render, config.align, seed=request.seed)
    seconds["render"] = time.perf_counter() - started

    # 5. A new version, the previous ones kept.
    if progress is not None:
        progress("versions", 1, 1)
    version = layout.next_version()
    record = base_record(request, models.provenance, previous.get("preset", ""), source_sha256, key)
    record.update(version=version, version_key=key, status="done", kind="render", color_map=color_map or None,
                  alpha=render.alpha, rewritten_caption=state.rewritten.text, previous_version=previous.get("version"),
                  source=previous.get("source"), seconds=seconds, **_prompt_fields(wanted))
    record["outputs"]["state"], record["output_sha256"]["state"] = _state_output(layout)
    return _write_version(models, _Source(data, source, signing), layout, version, record, rendered.alignment.chroma,
                          rendered.alignment.mean_confidence, wanted.prompt, config, progress)


def stored_config(state: ColorState) -> PipelineConfig:
    """The pipeline configuration a colour state was made with (its renders default to it)."""
    return PipelineConfig.from_dict({key: value for key, value in state.config.items() if key != "state_key"})
