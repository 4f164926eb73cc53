"""The device pool: long-lived worker processes, one per GPU by default (one CPU worker without GPUs).

Each worker is a single-process ``ProcessPoolExecutor`` started with the
``spawn`` method, its GPU pinned through ``CUDA_VISIBLE_DEVICES``, and its models
loaded once by the initializer (:mod:`flows.worker`). ``workers_per_device``
puts several workers on each device, each with its own models: one item's fit
at batch 1 can leave a GPU idle while its host thread launches kernels, and
another process fills those gaps (measure it first: ``python -m diffcolor.tools.bench
--concurrent N``, docs/PERFORMANCE.md). On the CPU the workers split the
cores between them. Tasks borrow a free
worker, run one item on it and give it back, so a worker never holds two items
and models stay loaded between items. A worker that dies (killed, crashed,
node lost) surfaces as :class:`WorkerLostError`, a transient error the flow
retries; the slot is restarted with a fresh process first, and the retried
item resumes from its latest checkpoint.

An ``inline`` pool runs items in the calling process instead, one at a time on
its device: for debugging (a debugger or profiler sees the item's work) and for
small hosts; a crash in an item then takes the flow with it.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from diffcolor.common.errors import UserError, WorkerLostError
from flows import stopping, worker


class RunInterrupted(Exception):
    """The run was stopped (SIGINT, SIGTERM) while this item waited or ran: its work is not recorded."""


@dataclass(frozen=True)
class ModelSpec:
    """What every worker loads."""

    model: str
    clip: str | None = None
    allow_download: bool = False
    weight_dtype: str = "auto"  # frozen weights' storage (diffcolor.method.models.load_models): "auto", "bf16" or "fp32"


class _Slot:
    def __init__(self, index: int, device: str, visible: str | None, spec: ModelSpec, threads: int | None,
                 sharing: int = 1, progress=None):
        self.index, self.device, self.visible, self.spec, self.threads = index, device, visible, spec, threads
        self.sharing = sharing  # workers on this slot's device, this one included
        self.progress = progress  # the pool's progress queue (None: steps are not reported)
        self.executor: ProcessPoolExecutor | None = None
        self.starts = 0  # worker processes started on this slot, each loading the models once
        self.start()

    def start(self) -> None:
        env = {} if self.visible is None else {"CUDA_VISIBLE_DEVICES": self.visible}
        self.starts += 1
        self.executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init_worker,
            initargs=(self.spec, self.device, self.threads, env, self.sharing, self.progress, True),
        )

    def restart(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.start()

    def lost(self) -> bool:
        """Whether this slot's worker died (killed, crashed) since it started: its executor cannot run items."""
        executor = self.executor
        if executor is None or getattr(executor, "_broken", False):
            return True
        return any(process.exitcode is not None for process in list((executor._processes or {}).values()))


def visible_gpus() -> list[int]:
    """Indices of the GPUs this process may use."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


class _InlineSlot:
    """Runs items in the calling process: the one slot of an ``inline`` pool."""

    index = 0

    starts = 1  # the models, loaded in the calling process

    def __init__(self, spec: ModelSpec, device: str, on_stage=None):
        self.device = device
        worker.init_worker(spec, device, None, {}, progress=None if on_stage is None else (lambda step: on_stage(*step)))
        self.executor = self

    def submit(self, function, *args):
        from concurrent.futures import Future

        future: Future = Future()
        try:
            future.set_result(function(*args))
        except BaseException as error:  # handed to the caller through the future, as a process pool would
            future.set_exception(error)
        return future

    def shutdown(self, **_):
        pass


class DevicePool:
    """A fixed set of worker slots: ``workers_per_device`` on each visible GPU, or on the CPU.

    ``inline=True``: one slot that runs items in this process, on ``device`` (``auto``: the first GPU, else the CPU).
    ``on_stage(item_id, phase, step, total)`` is called in this process for every step of every item (from
    a thread that reads the workers' progress queue); a display follows the items with it.
    """

    def __init__(self, spec: ModelSpec, *, device: str = "auto", cpu_threads: int | None = None,
                 workers_per_device: int = 1, inline: bool = False, on_stage=None):
        if isinstance(workers_per_device, bool) or not isinstance(workers_per_device, int) or workers_per_device < 1:
            raise UserError(f"workers_per_device must be a whole number of at least 1, got {workers_per_device!r}")
        self.workers_per_device = workers_per_device
        self._progress, self._progress_thread = None, None
        self._stopping = False
        if inline:
            if workers_per_device != 1:
                raise UserError("an inline pool runs items in the calling process: workers_per_device must be 1")
            self._setup([_InlineSlot(spec, ("cuda" if visible_gpus() else "cpu") if device == "auto" else device,
                                     on_stage)])
            return
        if on_stage is not None:
            self._progress = multiprocessing.get_context("spawn").Queue(maxsize=10_000)
            self._progress_thread = threading.Thread(target=self._forward, args=(on_stage,), daemon=True,
                                                     name="pool-progress")
            self._progress_thread.start()
        gpus = visible_gpus() if device in ("auto", "cuda") else []
        if device == "cuda" and not gpus:
            raise WorkerLostError("device 'cuda' requested but no GPU is visible")
        if gpus:
            # Children see one GPU each; name it as the operator's CUDA_VISIBLE_DEVICES does, if set.
            inherited = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            visible = [inherited[gpu] if gpu < len(inherited) else str(gpu) for gpu in gpus]
            # Round-robin over the GPUs, so that a pool whose slots are taken in order spreads over them.
            slots = [_Slot(i, "cuda", visible[i % len(gpus)], spec, None, workers_per_device, self._progress)
                     for i in range(len(gpus) * workers_per_device)]
        else:
            cores = cpu_threads or max(1, (os.cpu_count() or 1))
            threads = max(1, cores // workers_per_device)
            slots = [_Slot(i, "cpu", None, spec, threads, workers_per_device, self._progress)
                     for i in range(workers_per_device)]
        self._setup(slots)

    def _forward(self, on_stage) -> None:
        """Hands every step the workers report to ``on_stage`` until the pool closes (None on the queue)."""
        while True:
            step = self._progress.get()
            if step is None:
                return
            try:
                on_stage(*step)
            except Exception:  # a display that fails must not stop the steps behind it
                pass

    def _setup(self, slots) -> None:
        self.slots = slots
        stopping.register(self)  # a stopped command stops this pool's workers (stop(), then kill())
        self._free: queue.Queue[_Slot] = queue.Queue()
        for slot in slots:
            self._free.put(slot)
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def devices(self) -> int:
        """How many devices the workers run on."""
        return self.size // self.workers_per_device

    def run(self, function, *args):
        """Runs ``function(*args)`` on a free worker and returns its result.

        Raises WorkerLostError (transient) when the worker died meanwhile, after
        restarting that slot; the function's own exceptions pass through.
        RunInterrupted once the run is stopping (no item starts then).
        """
        slot = self._free.get()
        try:
            if self._stopping or stopping.STOP.is_set():
                raise RunInterrupted("the run was stopped before this item started")
            try:
                return slot.executor.submit(function, *args).result()
            except (worker.WorkerStopped, BrokenProcessPool):  # a worker told to stop by someone else: as if lost
                if self._stopping or stopping.STOP.is_set():
                    raise RunInterrupted("the run was stopped while this item ran") from None
                with self._lock:
                    slot.restart()
                raise WorkerLostError(f"the worker on slot {slot.index} ({slot.device}) died while running the item") from None
        finally:
            self._free.put(slot)

    @property
    def model_loads(self) -> int:
        """How many times this pool's workers loaded the models: once per worker started, restarts included."""
        return sum(slot.starts for slot in self.slots)

    @property
    def stopped(self) -> bool:
        """Whether the pool was stopped or killed (it runs no more items)."""
        return self._stopping

    def heal(self) -> int:
        """Restarts the slots whose worker died while no item ran on them; returns how many. For a pool kept
        between runs (flows.warm), before a run starts on it: call it only while no item runs."""
        healed = 0
        with self._lock:
            for slot in self.slots:
                if isinstance(slot, _Slot) and slot.lost():
                    slot.restart()
                    healed += 1
        return healed

    def describe(self) -> list[dict]:
        """Each worker's pid and device (starts the workers if they are not yet up)."""
        return [self.run(worker.describe) for _ in self.slots]

    def worker_pids(self) -> list[int]:
        """The pids of the worker processes (none for an inline pool)."""
        return [pid for slot in self.slots if isinstance(slot, _Slot) for pid in (slot.executor._processes or {}).keys()]

    def stop(self) -> None:
        """Stops the pool at once: no item starts, and each worker unwinds its item (releasing its lease) and exits."""
        self._stopping = True
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """The workers killed outright (a stopped command's last resort)."""
        self._stopping = True
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        for pid in self.worker_pids():
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        stopping.unregister(self)
        for slot in self.slots:
            if slot.executor is not None:
                slot.executor.shutdown(wait=True, cancel_futures=True)
        if self._progress is not None:
            self._progress.put(None)
            self._progress_thread.join(timeout=5)
            self._progress.close()
