"""What runs inside a long-lived pool worker process: models loaded once, items one by one.

This module is imported in fresh worker processes; it holds the loaded models
in a module global, so every item a worker runs reuses them (no per-item
model load). It imports no Prefect: the worker is plain DiffColor.
"""

from __future__ import annotations

import os

_MODELS = None
_DESCRIPTION: dict = {}


def init_worker(spec, device: str, threads: int | None, env: dict[str, str]) -> None:
    """Process initializer: pins the device (CUDA_VISIBLE_DEVICES is in ``env``) and loads the models of
    ``spec`` (a :class:`flows.pool.ModelSpec`)."""
    global _MODELS, _DESCRIPTION
    os.environ.update(env)
    import torch

    from diffcolor.models import load_models

    if threads:
        torch.set_num_threads(threads)
    _MODELS = load_models(spec.model, clip=spec.clip, device=device, allow_download=spec.allow_download,
                          weight_dtype=spec.weight_dtype)
    _DESCRIPTION = {"pid": os.getpid(), "device": device, "visible": env.get("CUDA_VISIBLE_DEVICES"),
                    "model_hash": _MODELS.model_hash}


def describe() -> dict:
    """Which process and device this worker is, and the models it holds."""
    return dict(_DESCRIPTION)


def placement() -> dict:
    """Where the current item runs: process, device and, on Ray, the GPU ids Ray assigned."""
    where = {"pid": os.getpid(), "device": _DESCRIPTION.get("device"),
             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import ray

        if ray.is_initialized():
            where["ray_gpu_ids"] = [int(i) for i in ray.get_gpu_ids()]
            where["ray_node"] = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return where


def run_here(spec, function, *args):
    """Runs ``function(*args)`` in this process with models cached per process (Ray task workers).

    Ray pins each task's GPU through CUDA_VISIBLE_DEVICES; the cache is keyed
    by it, so a worker process reused for another GPU loads its models again.
    """
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    key = (spec, visible)
    if _DESCRIPTION.get("key") != key:
        init_worker(spec, "cuda" if torch.cuda.is_available() else "cpu", None, {})
        _DESCRIPTION["key"] = key
    return function(*args)


def _out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_colorize(request, prefix: str, config_dict: dict, preset: str) -> list[dict]:
    """Colourises one item with the worker's models (see diffcolor.pipeline.colorize_item)."""
    from diffcolor.errors import DeviceOutOfMemoryError
    from diffcolor.pipeline import colorize_item
    from diffcolor.presets import PipelineConfig

    from diffcolor.locks import item_lease

    try:
        with item_lease(prefix):  # another run working on this item: wait, then find it done
            records = colorize_item(_MODELS, request, prefix, PipelineConfig.from_dict(config_dict), preset=preset)
        return [dict(record, placement=placement()) for record in records]
    except RuntimeError as error:
        if _out_of_memory(error):
            raise DeviceOutOfMemoryError(f"item '{request.item_id}': device out of memory") from None
        raise


def run_recolor(prefix: str, target: str | None, color_map: dict | None, seed: int | None) -> dict:
    """Renders a new target from an item's stored colour state (no fine-tuning)."""
    from diffcolor.errors import DeviceOutOfMemoryError
    from diffcolor.pipeline import recolor_item

    from diffcolor.locks import item_lease

    try:
        with item_lease(prefix):
            return dict(recolor_item(_MODELS, prefix, target=target, color_map=color_map, seed=seed), placement=placement())
    except RuntimeError as error:
        if _out_of_memory(error):
            raise DeviceOutOfMemoryError(f"'{prefix}': device out of memory") from None
        raise
