"""Warm pools: a recolour on a warm worker loads no model; idle pools are freed; nothing outlives its owner.

Real reprocess flow runs on the session's Prefect server, real worker
processes (spawned, loading the tiny bundle), real signals. The pools count
their workers' model loads (one per worker started) and give their workers'
pids, which the tests follow with psutil.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import gray_scene
from PIL import Image

from diffcolor.archive.layout import OutputLayout
from diffcolor.common.errors import UserError
from diffcolor.common.items import ItemRequest
from diffcolor.pipeline import colorize_item

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def colourised(models, smoke, tmp_path):
    """A collection output holding one colourised item (version 1, with its colour state)."""
    source = tmp_path / "images" / "p0.png"
    source.parent.mkdir()
    Image.fromarray(np.round(gray_scene(48, 64) * 255).astype(np.uint8)).save(source)
    output = tmp_path / "out"
    request = ItemRequest(item_id="p0", source_uri=str(source), caption="a dog on a bench", seed=7)
    [record] = colorize_item(models, request, OutputLayout(str(output)).item_prefix("p0"), smoke, preset="smoke")
    assert record["status"] == "done"
    return output


@pytest.fixture
def warm_pools():
    """This process keeps its reprocess runs' pools warm for the test (10 minutes idle); closed after it."""
    from flows.warm import keep_warm, stop_keeping_warm

    pools = keep_warm(600, 2)
    try:
        yield pools
    finally:
        stop_keeping_warm()


def _recolour(output: Path, colour: str, **options) -> dict:
    from flows.reprocess import ReprocessOptions, Retarget, reprocess

    state = reprocess(str(output), [Retarget(item_id="p0", color_map={"dog": colour})],
                      ReprocessOptions(device="cpu", retries=0, **options), return_state=True)
    summary = state.result(raise_on_failure=False)
    assert state.is_completed(), (state.message, summary)
    return summary


def _gone(pids: list[int], seconds: float = 30.0) -> bool:
    """Whether every pid has exited (or is a zombie) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_a_second_recolour_on_a_warm_pool_loads_no_model(prefect_server, colourised, warm_pools):
    _recolour(colourised, "red")
    [pool] = warm_pools.pools()  # kept after the run
    pids = pool.worker_pids()
    assert pool.model_loads == 1 and len(pids) == 1 and psutil.pid_exists(pids[0])

    _recolour(colourised, "blue")
    assert warm_pools.pools() == [pool] and warm_pools.pools_started == 1
    assert pool.model_loads == 1 and pool.worker_pids() == pids  # the same worker, nothing loaded again
    assert (colourised / "items" / "p0" / "versions" / "v0003.json").exists()

    from flows.warm import stop_keeping_warm

    stop_keeping_warm()  # what the review server's shutdown does
    assert _gone(pids), "a warm pool's worker outlived its pools"


@pytest.mark.slow
def test_a_worker_killed_between_jobs_is_replaced_and_idle_pools_are_freed(prefect_server, colourised):
    from flows.warm import keep_warm, stop_keeping_warm

    pools = keep_warm(20, 1)
    try:
        _recolour(colourised, "red")
        [pool] = pools.pools()
        [first] = pool.worker_pids()
        os.kill(first, signal.SIGKILL)  # crashed while idle
        assert _gone([first])
        summary = _recolour(colourised, "blue")  # no WorkerLostError, no retry: a fresh worker before the run
        assert summary["counts"] == {"done": 1}
        [second] = pool.worker_pids()
        assert second != first and pool.model_loads == 2 and pools.pools() == [pool]

        # Another key (the weights stored in fp32) with at most one pool kept: the least recently used goes.
        _recolour(colourised, "green", weight_dtype="fp32")
        [other] = pools.pools()
        assert other is not pool and _gone([second])
        [third] = other.worker_pids()

        # Unused for its idle time (20 s): closed, its worker gone.
        time.sleep(15)
        assert pools.pools() == [other]  # not yet
        deadline = time.monotonic() + 30
        while pools.pools() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pools.pools() == [] and _gone([third])
    finally:
        stop_keeping_warm()


@pytest.mark.slow
def test_warm_pool_service_keeps_models_between_flow_runs_and_stops_with_its_workers(prefect_server, colourised,
                                                                                       tmp_path, monkeypatch):
    # The deployment's case: every flow run is a fresh process, the service is not.
    from flows.warm import SERVICE_ENV, RemotePool

    socket_path = Path(f"/tmp/dcw-{os.getpid()}-{time.monotonic_ns()}.sock")  # a Unix socket's path is short
    service = subprocess.Popen([sys.executable, "-m", "flows.warm", "serve", "--socket", str(socket_path)],
                               env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not socket_path.with_suffix(".sock.key").exists():
            assert service.poll() is None and time.monotonic() < deadline, service.stderr.read()
            time.sleep(0.2)
        monkeypatch.setenv(SERVICE_ENV, str(socket_path))
        twice = subprocess.run([sys.executable, "-m", "flows.warm", "serve", "--socket", str(socket_path)],
                               env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
        assert twice.returncode == 2 and "already answers" in twice.stderr  # the live service keeps its socket
        _recolour(colourised, "red")
        described = RemotePool(str(socket_path), _spec(), device="cpu", workers_per_device=1).describe()
        [entry] = described
        assert entry["model_loads"] == 1 and entry["users"] == 0
        _recolour(colourised, "blue")
        [again] = RemotePool(str(socket_path), _spec(), device="cpu", workers_per_device=1).describe()
        assert again["model_loads"] == 1 and again["worker_pids"] == entry["worker_pids"]
        assert (colourised / "items" / "p0" / "versions" / "v0003.json").exists()
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) == 0
        assert _gone(entry["worker_pids"]) and not socket_path.exists()
    finally:
        if service.poll() is None:
            service.kill()


def _spec():
    from flows.pool import ModelSpec

    return ModelSpec(model="tiny")


def test_a_named_service_that_does_not_answer_is_one_line(tmp_path):
    from flows.pool import ModelSpec
    from flows.warm import RemotePool

    with pytest.raises(UserError, match="warm-pool service") as caught:
        RemotePool(str(tmp_path / "none.sock"), ModelSpec(model="tiny"), device="cpu", workers_per_device=1)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("idle, kept, named", [(-1, 2, "-1"), (float("nan"), 2, "nan"), (600, 0, "0"),
                                               (600, True, "True")])
def test_bad_warm_settings_are_refused_naming_the_value(idle, kept, named):
    from flows.warm import WarmPools

    with pytest.raises(UserError, match=named):
        WarmPools(idle, kept)


def test_review_refuses_a_bad_keep_warm_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffcolor", "review", str(tmp_path), "--keep-warm", "-5"],
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "-5" in result.stderr and "Traceback" not in result.stderr


def test_a_run_whose_service_is_down_starts_a_pool_of_its_own(tmp_path, monkeypatch):
    from flows.pool import DevicePool, ModelSpec
    from flows.warm import SERVICE_ENV, pool_for

    monkeypatch.setenv(SERVICE_ENV, str(tmp_path / "gone.sock"))
    with pool_for(ModelSpec(model="tiny"), device="cpu", workers_per_device=1, warm=True) as pool:
        assert isinstance(pool, DevicePool)  # its workers start with its first item (none here)
    assert pool.stopped is False and not pool.worker_pids()


def test_with_service_refuses_a_missing_command_in_one_line():
    result = subprocess.run([sys.executable, "-m", "flows.warm", "with", "--"],
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "name the command" in result.stderr and "Traceback" not in result.stderr


def test_with_service_runs_the_command_beside_the_service_and_stops_it_after(tmp_path):
    # The containers' entry: the service first, the command with DIFFCOLOR_WARM_POOL naming it, SIGTERM to the
    # command, the service gone after the command. No --socket: the socket is made in this user's cache folder,
    # owner-only (never a name in a shared folder that another user could create first).
    cache = tmp_path / "cache"
    socket_path = str(cache / "warm.sock")
    script = ("import os, signal, sys, time; from pathlib import Path; address = os.environ['DIFFCOLOR_WARM_POOL']; "
              "assert Path(address + '.key').stat().st_mode & 0o077 == 0; "
              "Path(sys.argv[1]).write_text(address); time.sleep(120)")
    seen = tmp_path / "seen"
    process = subprocess.Popen([sys.executable, "-m", "flows.warm", "with", "--",
                                sys.executable, "-c", script, str(seen)],
                               env=dict(os.environ, PYTHONPATH=str(REPO), DIFFCOLOR_CACHE=str(cache)),
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not seen.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.2)
        assert seen.read_text() == socket_path and cache.stat().st_mode & 0o077 == 0
        service = [child for child in psutil.Process(process.pid).children() if "serve" in child.cmdline()]
        assert len(service) == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 128 + signal.SIGTERM
        assert _gone([service[0].pid]) and not os.path.exists(socket_path)
        assert not os.path.exists(socket_path + ".key")
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_review_server_recolours_twice_on_one_warm_worker_and_leaves_none_behind(tmp_path):
    # The real command: `diffcolor review`, two recolours of one item through the JSON API, then SIGTERM.
    import hashlib
    import hmac
    import socket
    import uuid

    import httpx
    from test_flows import _collection
    from test_processes import _environment, _no_survivor, _start, _wait_for

    from flows.collection import RunOptions, colorize_collection
    from flows.local import LocalPrefect

    manifest, out = _collection(tmp_path, count=1), tmp_path / "out"
    with LocalPrefect():
        assert colorize_collection(str(manifest), str(out), "tiny", RunOptions(preset="smoke", pool="inline"),
                                   return_state=True).is_completed()
    token = "t" * 32
    (tmp_path / "token").write_text(token)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mark, stderr = uuid.uuid4().hex, tmp_path / "stderr"
    process = _start("review", str(out), "--port", str(port), "--token-file", str(tmp_path / "token"),
                     "--device", "cpu", cwd=tmp_path, env=_environment(mark), stderr=stderr)
    csrf = hmac.new(token.encode(), b"diffcolor-review-csrf", hashlib.sha256).hexdigest()
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api", timeout=300,
                       headers={"Authorization": f"Bearer {token}", "X-CSRF-Token": csrf})

    def workers() -> set[int]:  # the review server's pool workers (spawned children)
        children = psutil.Process(process.pid).children()
        return {child.pid for child in children if "multiprocessing" in " ".join(child.cmdline())
                and "resource_tracker" not in " ".join(child.cmdline())}

    def recolour(colour: str) -> None:
        job = api.post("/recolour", json={"targets": [{"item_id": "p0", "color_map": {"dog": colour}}]}).json()
        deadline = time.monotonic() + 600
        while (state := api.get(f"/jobs/{job['job_id']}").json())["state"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert state["state"] == "completed", (state["message"], stderr.read_text()[-3000:])

    try:
        _wait_for(stderr, "sign in to recolour", process, 300)
        deadline = time.monotonic() + 120
        while True:
            try:
                api.get("/items")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and process.poll() is None, stderr.read_text()[-3000:]
                time.sleep(0.5)
        recolour("red")
        first = workers()
        assert len(first) == 1, first  # kept after the job, its model loaded
        recolour("blue")
        assert workers() == first  # the second job ran there: no new worker, no model loaded
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in stderr.read_text()
    _no_survivor(mark)


def test_with_service_and_no_idle_time_runs_the_command_alone():
    check = "import os, sys; sys.exit(3 if 'DIFFCOLOR_WARM_POOL' in os.environ else 0)"
    env = {name: value for name, value in os.environ.items() if name != "DIFFCOLOR_WARM_POOL"}
    result = subprocess.run([sys.executable, "-m", "flows.warm", "with", "--idle-seconds", "0", "--",
                             sys.executable, "-c", check], env=dict(env, PYTHONPATH=str(REPO)), timeout=120)
    assert result.returncode == 0  # no service started, none named
