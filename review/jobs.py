"""Recolour jobs started from the review pages: the reprocess flow, on a Prefect server or in this process.

With ``PREFECT_API_URL`` set, a job is a flow run of the ``reprocess``
deployment (deploy/prefect.yaml): the server's work pool runs it where the
GPUs are, one at a time. Without it, the flow runs here, in a background
thread, on this machine's devices (local Prefect, as ``diffcolor reprocess``).
Either way the flow adds a version per item and publishes a run's results,
which the collection table picks up.

Local jobs share one temporary Prefect server (:class:`flows.local.LocalPrefect`:
a private database, telemetry off), started by the first job, and warm pools
(:mod:`flows.warm`): the first job of a model starts its workers, which load
the model and stay up, so the next job of that model loads nothing. A pool
unused for :data:`WARM` ``idle_seconds`` (``diffcolor review --keep-warm``,
default 10 minutes) is closed, and at most ``max_pools`` (2) are kept, the
least recently used freed first; ``--keep-warm 0`` starts and closes a pool
per job. :func:`shutdown`, called when ``diffcolor review`` ends (normally, or
on SIGINT/SIGTERM), stops the jobs under way (their pools' workers release
their items' leases), then the warm pools' workers and that server: nothing
the review server started outlives it.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field

DEPLOYMENT = "reprocess/reprocess"  # flow name / deployment name in deploy/prefect.yaml
_LOCAL: dict = {"prefect": None, "threads": []}  # the local jobs' Prefect server and threads (see shutdown)
_LOCAL_LOCK = threading.Lock()
WARM = {"idle_seconds": 600.0, "max_pools": 2}  # the local jobs' warm pools (flows.warm); idle_seconds 0: none


def keep_warm(idle_seconds: float, max_pools: int = 2) -> None:
    """How the local jobs keep their pools: closed after ``idle_seconds`` unused (0: a pool per job), at most
    ``max_pools`` kept. Set before the first job."""
    from flows.warm import WarmPools

    WarmPools(idle_seconds or 1.0, max_pools).close()  # refuses bad values now (UserError), not at the first job
    WARM.update(idle_seconds=float(idle_seconds), max_pools=max_pools)


def _local_prefect() -> None:
    """Starts the local jobs' temporary Prefect server once (unless PREFECT_API_URL names one), and keeps their
    pools warm (unless ``WARM["idle_seconds"]`` is 0)."""
    from flows.local import LocalPrefect
    from flows.warm import keep_warm as keep_pools_warm

    with _LOCAL_LOCK:
        if WARM["idle_seconds"] > 0:
            keep_pools_warm(WARM["idle_seconds"], WARM["max_pools"])
        if _LOCAL["prefect"] is None:
            prefect = LocalPrefect()
            prefect.start()
            _LOCAL["prefect"] = prefect


def shutdown(timeout: float = 15.0) -> None:
    """Stops the local jobs under way and the Prefect server they share; waits at most ``timeout`` for the jobs."""
    from flows import stopping

    threads = [thread for thread in _LOCAL["threads"] if thread.is_alive()]
    if threads:
        stopping.STOP.set()
        stopping.stop_registered()  # the jobs' pools: each worker unwinds its item and releases its lease
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stopping.kill_registered()  # what did not stop in time
    from flows.warm import stop_keeping_warm

    stop_keeping_warm()  # the warm pools' workers exit (stopped above when a job was under way)
    with _LOCAL_LOCK:
        prefect, _LOCAL["prefect"] = _LOCAL["prefect"], None
    if prefect is not None:
        prefect.close()


@dataclass
class Job:
    job_id: str
    item_ids: list[str]
    mode: str  # "deployment" or "local"
    state: str = "scheduled"  # scheduled, running, completed, failed
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    flow_run_id: str | None = None
    message: str | None = None
    summary: dict | None = None

    def to_dict(self) -> dict:
        summary = self.summary or {}
        return {"job_id": self.job_id, "item_ids": self.item_ids, "mode": self.mode, "state": self.state,
                "seconds": round((self.finished_at or time.time()) - self.started_at, 1),
                "flow_run_id": self.flow_run_id, "message": self.message, "run_id": summary.get("run_id"),
                "counts": summary.get("counts"), "failed_items": summary.get("failed_items")}


def _failure_messages(summary: dict) -> str:
    """Why the run's failed items failed, one per item, from its results table."""
    from diffcolor.archive.results import read_results

    rows = read_results(summary["results"]).to_pylist()
    return "; ".join(f"{row['item_id']}: {row['error_message']}" for row in rows if row["status"] == "failed")


class Jobs:
    """The recolour jobs this server started, by id."""

    def __init__(self, output: str, options: dict | None = None, deployment: str = DEPLOYMENT):
        self.output = output
        self.options = dict(options or {})  # ReprocessOptions fields (pool, device, preset, ...)
        self.deployment = deployment
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, targets: list[dict]) -> Job:
        """Starts the reprocess flow for ``targets`` (``Retarget`` fields, checked by the caller)."""
        mode = "deployment" if os.environ.get("PREFECT_API_URL") else "local"
        job = Job(job_id=uuid.uuid4().hex[:12], item_ids=[target["item_id"] for target in targets], mode=mode)
        with self._lock:
            self._jobs[job.job_id] = job
        if mode == "deployment":
            self._start_deployment(job, targets)
        else:
            thread = threading.Thread(target=self._run_local, args=(job, targets), daemon=True,
                                      name=f"recolour-{job.job_id}")
            _LOCAL["threads"] = [old for old in _LOCAL["threads"] if old.is_alive()] + [thread]
            thread.start()
        return job

    def get(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is not None and job.mode == "deployment" and job.state in ("scheduled", "running"):
            self._poll_deployment(job)
        return job

    def _run_local(self, job: Job, targets: list[dict]) -> None:
        from flows.reprocess import ReprocessOptions, Retarget, reprocess

        job.state = "running"
        try:
            _local_prefect()
            state = reprocess(self.output, [Retarget(**target) for target in targets],
                              ReprocessOptions(**self.options), return_state=True)
            result = state.result(raise_on_failure=False)
            job.summary = result if isinstance(result, dict) else None
            job.state = "completed" if state.is_completed() else "failed"
            job.message = state.message
            if job.summary and job.summary.get("failed_items"):
                job.message = _failure_messages(job.summary)
        except Exception as error:  # shown on the page; the flow itself recorded what it could
            job.state, job.message = "failed", f"{type(error).__name__}: {error}"
        finally:
            job.finished_at = time.time()

    def _start_deployment(self, job: Job, targets: list[dict]) -> None:
        from prefect.deployments import run_deployment

        flow_run = run_deployment(self.deployment, parameters={"output": self.output, "targets": targets,
                                                               "options": self.options}, timeout=0)
        job.flow_run_id = str(flow_run.id)

    def _poll_deployment(self, job: Job) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(job.flow_run_id).state
        if state is None:
            return
        if state.is_final():
            job.state = "completed" if state.is_completed() else "failed"
            job.message, job.finished_at = state.message, time.time()
        else:
            job.state = "running" if state.is_running() else "scheduled"
