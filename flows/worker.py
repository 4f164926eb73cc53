"""What runs inside a long-lived pool worker process: models loaded once, items one by one.

This module is imported in fresh worker processes; it holds the loaded models
in a module global, so every item a worker runs reuses them (no per-item
model load). It imports no Prefect: the worker is plain DiffColor.

Stopping: a pool worker ignores SIGINT (Ctrl-C in a terminal reaches the
whole process group; the command decides) and takes SIGTERM as "stop now": an
item under way unwinds at once with :class:`WorkerStopped`, releasing its
lease, and is not recorded; an idle worker just exits. A worker whose parent
is gone (killed outright) stops itself the same way within a second. In an
inline pool, the item stops at its next step once the run is stopping
(:data:`flows.stopping.STOP`).
"""

from __future__ import annotations

import os
import signal
import threading
import time

from flows import stopping

_MODELS = None
_DESCRIPTION: dict = {}
_PROGRESS = None  # where the items' stage progress goes: the pool's queue, a callable (inline pool), or nowhere
_SIGNING = None  # the operator's content-credentials key (diffcolor.archive.credentials), read once per worker
_BUSY = [0]  # items under way in this process (a stop signal unwinds them; an idle worker just exits)


class WorkerStopped(BaseException):
    """The run is stopping: the item under way stops here, its lease released, its work not recorded.

    A BaseException, so that no ``except Exception`` of the pipeline turns it into a failed item.
    """


def _on_stop_signal(signum, frame) -> None:
    stopping.STOP.set()
    if not _BUSY[0]:
        os._exit(0)  # nothing held: no lease, no half-written object (writes are atomic)
    timer = threading.Timer(10.0, os._exit, args=(0,))  # the item has 10 s to unwind, then the worker goes
    timer.daemon = True
    timer.start()
    raise WorkerStopped("the run was stopped")


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)  # the command is gone: stop as if it had said so


def _handle_stop_signals() -> None:
    """In a pool worker process: SIGINT ignored, SIGTERM stops (see the module docstring), the parent watched."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="diffcolor-parent", daemon=True).start()


def init_worker(spec, device: str, threads: int | None, env: dict[str, str], sharing: int = 1,
                progress=None, own_process: bool = False) -> None:
    """Process initializer: pins the device (CUDA_VISIBLE_DEVICES is in ``env``) and loads the models of
    ``spec`` (a :class:`flows.pool.ModelSpec`); ``sharing`` workers run on this device, this one included.
    ``progress`` receives ``(item_id, phase, step, total)`` of every step (a queue's ``put_nowait`` or a callable).
    ``own_process``: this is a pool's worker process, which handles the stop signals itself."""
    global _MODELS, _DESCRIPTION, _PROGRESS, _SIGNING
    if own_process:
        _handle_stop_signals()
    _PROGRESS = progress
    os.environ.update(env)
    from diffcolor.archive.credentials import signing_from_environment

    _SIGNING = signing_from_environment()
    import torch

    from diffcolor.method.model_names import load_named_models

    if threads:
        torch.set_num_threads(threads)
    _MODELS = load_named_models(spec.model, clip=spec.clip, device=device, allow_download=spec.allow_download,
                          weight_dtype=spec.weight_dtype)
    _DESCRIPTION = {"pid": os.getpid(), "device": device, "visible": env.get("CUDA_VISIBLE_DEVICES"),
                    "threads": torch.get_num_threads(), "workers_on_device": sharing, "model_hash": _MODELS.model_hash}


def describe() -> dict:
    """Which process and device this worker is, and the models it holds."""
    return dict(_DESCRIPTION)


def placement() -> dict:
    """Where the current item runs: process, device, how many workers share that device and, on Ray, the GPU
    ids Ray assigned."""
    where = {"pid": os.getpid(), "device": _DESCRIPTION.get("device"),
             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
             "workers_on_device": _DESCRIPTION.get("workers_on_device", 1)}
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            where["ray_gpu_ids"] = [int(i) for i in ray.get_gpu_ids()]
            where["ray_node"] = context.get_node_id()
            share = context.get_assigned_resources().get("GPU")
            if share and share < 1:  # a fractional GPU (options.gpus_per_item): that many tasks share it
                where["workers_on_device"] = max(1, round(1 / share))
    except ImportError:
        pass
    return where


def placed(record: dict) -> dict:
    """``record`` with where it ran and its share of device time.

    ``device_seconds`` is the seconds of the item's stages on its worker over
    the workers sharing that device: the device time the item cost when every
    worker of the device is busy (docs/DESIGN.md §7's GPU-seconds per item; on
    the CPU, CPU-pool seconds). A record that did no work (skipped) costs 0.
    """
    where = placement()
    seconds = sum((record.get("seconds") or {}).values())
    return dict(record, placement=where, device_seconds=seconds / where["workers_on_device"])


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


def _following(item_id: str, lease):
    """The item's progress callback: the lease checked at every step, and the step reported to the pool."""
    def progress(phase: str, step: int, total: int) -> None:
        if stopping.STOP.is_set():
            raise WorkerStopped("the run was stopped")
        lease.check()
        sink = _PROGRESS
        if sink is not None:
            try:
                (sink.put_nowait if hasattr(sink, "put_nowait") else sink)((item_id, phase, step, total))
            except Exception:  # a full queue or a closed display never stops the item
                pass

    return progress


def _out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_colorize(request, prefix: str, config_dict: dict, preset: str, limits=None) -> list[dict]:
    """Colourises one item with the worker's models (see diffcolor.pipeline.colorize_item), holding its lease.

    The lease is checked at every step of the fit and before every version is
    written: a worker that lost it stops there (LeaseLostError, transient).
    """
    from diffcolor.archive.leases import item_lease
    from diffcolor.archive.storage import ReadLimits
    from diffcolor.common.errors import DeviceOutOfMemoryError
    from diffcolor.method.presets import PipelineConfig
    from diffcolor.pipeline import colorize_item

    _BUSY[0] += 1
    try:
        with item_lease(prefix) as lease:  # another run working on this item: wait, then find it done
            records = colorize_item(_MODELS, request, prefix, PipelineConfig.from_dict(config_dict), preset=preset,
                                    progress=_following(request.item_id, lease), limits=limits or ReadLimits(),
                                    signing=_SIGNING)
        return [placed(record) for record in records]
    except RuntimeError as error:
        if _out_of_memory(error):
            raise DeviceOutOfMemoryError(f"item '{request.item_id}': device out of memory") from None
        raise
    finally:
        _BUSY[0] -= 1


def run_recolor(prefix: str, target: str | None, color_map: dict | None, seed: int | None, limits=None,
                overrides: dict | None = None) -> dict:
    """Renders a new target from an item's stored colour state (no fine-tuning), holding its lease; ``overrides``
    change fields of the item's stored configuration."""
    from diffcolor.archive.layout import item_id_from
    from diffcolor.archive.leases import item_lease
    from diffcolor.archive.storage import ReadLimits
    from diffcolor.common.errors import DeviceOutOfMemoryError
    from diffcolor.pipeline import recolor_item

    _BUSY[0] += 1
    try:
        with item_lease(prefix) as lease:
            record = recolor_item(_MODELS, prefix, target=target, color_map=color_map, seed=seed, overrides=overrides,
                                  limits=limits or ReadLimits(), progress=_following(item_id_from(prefix), lease),
                                  signing=_SIGNING)
            return placed(record)
    except RuntimeError as error:
        if _out_of_memory(error):
            raise DeviceOutOfMemoryError(f"'{prefix}': device out of memory") from None
        raise
    finally:
        _BUSY[0] -= 1
