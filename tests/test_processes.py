"""How `run`, `reprocess` and `review` live as processes: Prefect's start-up, refusals, signals, nothing left behind.

Real commands in real processes (subprocess, os.kill), with a marker in their
environment: every process they start inherits it, so the tests find any
survivor (psutil) whatever its parent became.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from test_flows import _collection

from diffcolor.cli import main

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "manifests" / "demo.parquet"
MARK = "DIFFCOLOR_TEST_PROCESS_MARK"


def _environment(mark: str, api_url: str | None = None, **extra: str) -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
    env.update({MARK: mark, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}, **extra)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _start(*args: str, cwd: Path, env: dict, stderr: Path) -> subprocess.Popen:
    """``diffcolor ARGS`` in its own session (a signal to the group is what a terminal's Ctrl-C sends)."""
    return subprocess.Popen([sys.executable, "-m", "diffcolor", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr.open("w"), start_new_session=True)


def _marked(mark: str) -> list[psutil.Process]:
    """The live processes carrying ``mark`` in their environment."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE \
                    and process.environ().get(MARK) == mark:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _no_survivor(mark: str, seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while (left := _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in left:  # never leave them to the next test
        process.kill()
    assert not left, [" ".join(process.cmdline())[:200] for process in left]


def _wait_for(path: Path, text: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while text not in path.read_text():
        assert process.poll() is None, path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} after {seconds} s: " + path.read_text()[-3000:]
        time.sleep(0.2)


def _interrupted_record(out: Path) -> dict:
    [run] = sorted((out / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["run_id"] == run.name
    assert (run / "results.parquet").exists() and (run / "report.html").exists()
    return summary


# ---------------------------------------------------------------------------
# Prefect's start-up.


def test_the_startup_limit_is_the_operators_else_generous(monkeypatch):
    from flows.local import DEFAULT_STARTUP_SECONDS, STARTUP_VARIABLE, startup_seconds

    monkeypatch.delenv(STARTUP_VARIABLE, raising=False)
    assert startup_seconds() == DEFAULT_STARTUP_SECONDS >= 60  # Prefect's 20 s is missed on a busy machine
    monkeypatch.setenv(STARTUP_VARIABLE, "300")
    assert startup_seconds() == 300
    monkeypatch.setenv(STARTUP_VARIABLE, "soon")
    with pytest.raises(ValueError, match=STARTUP_VARIABLE):
        startup_seconds()


def test_a_prefect_server_that_never_answers_is_one_line_and_leaves_no_process(tmp_path):
    # The operator's limit is respected: far too short for any server, so both tries fail.
    mark = uuid.uuid4().hex
    stderr = tmp_path / "stderr"
    env = _environment(mark, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    process = _start("run", str(DEMO), "--out", "out", "--model", "tiny", "--preset", "smoke", cwd=tmp_path, env=env,
                     stderr=stderr)
    assert process.wait(timeout=300) == 2
    text = stderr.read_text()
    errors = [line for line in text.splitlines() if line.startswith("diffcolor: error:")]
    assert len(errors) == 1 and "Prefect server did not start" in errors[0] and "tried twice" in errors[0], text
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in errors[0] and "Traceback" not in text
    _no_survivor(mark)


def test_telemetry_is_off_for_the_client_and_in_the_server_environment(monkeypatch):
    from flows.local import TELEMETRY_OFF, prepare_environment

    monkeypatch.setenv("DO_NOT_TRACK", "0")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    prepare_environment()
    assert os.environ["DO_NOT_TRACK"] == "1" and os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert TELEMETRY_OFF == {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    from prefect._internal.analytics.enabled import is_telemetry_enabled

    assert not is_telemetry_enabled()


@pytest.mark.slow
def test_the_started_server_reports_analytics_off_and_goes_with_its_command(tmp_path):
    # A real server, started as every command starts it, asked for its settings; then the command is killed
    # outright (SIGKILL: no clean-up runs) and the server goes by itself.
    mark = uuid.uuid4().hex
    code = ("import httpx, os, sys\nfrom flows.local import LocalPrefect\n"
            "prefect = LocalPrefect(always=True)\nprefect.start()\n"
            "settings = httpx.get(prefect.api_url + '/admin/settings').json()\n"
            "print(settings['server']['analytics_enabled'], prefect.process.pid, flush=True)\n"
            "os.kill(os.getpid(), 9)\n")
    env = _environment(mark, PREFECT_SERVER_ANALYTICS_ENABLED="true")  # even an operator's "true" is overridden
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    analytics, pid = done.stdout.split()
    assert analytics == "False", done.stderr[-2000:]
    assert int(pid) > 0
    _no_survivor(mark, seconds=5)  # the server watched its parent


# ---------------------------------------------------------------------------
# Refusals: one line, no traceback, before Prefect starts or a model loads.


@pytest.fixture
def no_prefect(monkeypatch):
    """Fails the test if a run gets as far as starting Prefect."""
    import flows.local

    def refuse(self):
        raise AssertionError("Prefect started for a refused run")

    monkeypatch.setattr(flows.local.LocalPrefect, "start", refuse)


def _refused(capsys, *arguments: str) -> str:
    code = main(["run", *arguments])
    captured = capsys.readouterr()
    assert code in (1, 2) and "Traceback" not in captured.out + captured.err, captured
    return captured.err.strip() or captured.out.strip()


def _immutable(folder: Path) -> bool:
    """Makes ``folder`` read-only, for root too (chattr +i); False where that cannot be done."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    return shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(folder)]).returncode == 0


def test_refusals_are_one_line_before_prefect_starts(tmp_path, capsys, no_prefect, cache_dir):
    manifest = _collection(tmp_path, count=1)
    run = [str(manifest), "--model", "tiny", "--preset", "smoke"]

    message = _refused(capsys, *run, "--out", str(tmp_path / "out"), "--items", "../../etc")
    assert "'../../etc'" in message and not (tmp_path / "out").exists()
    message = _refused(capsys, *run, "--out", str(tmp_path / "out"), "--items", "p0,nowhere")
    assert "requested item 'nowhere' is not in the manifest" in message

    message = _refused(capsys, *run, "--out", "s3://Not_A_Bucket!/colour")
    assert message.count("\n") == 0 and message.startswith("diffcolor: error: output 's3://Not_A_Bucket!/colour' "
                                                           "cannot be written")

    from diffcolor.method.model_names import resolve_model

    pickled = tmp_path / "pickled"
    shutil.copytree(resolve_model("tiny"), pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    message = _refused(capsys, str(manifest), "--out", str(tmp_path / "out"), "--model", str(pickled))
    assert message.count("\n") == 0 and "pickled" in message and not (tmp_path / "out").exists()


def test_an_unwritable_output_is_a_storage_error_before_any_model_loads(tmp_path, capsys, no_prefect, monkeypatch,
                                                                       cache_dir, s3_bucket):
    import diffcolor.method.model_names as model_names

    monkeypatch.setattr(model_names, "load_named_models", lambda *_, **__: pytest.fail("models loaded"))
    manifest = _collection(tmp_path, count=1)
    run = [str(manifest), "--model", "tiny", "--preset", "smoke"]

    # An S3 bucket that does not exist (a real S3 API).
    message = _refused(capsys, *run, "--out", f"{s3_bucket}-missing/colour")
    assert message.startswith(f"diffcolor: error: output '{s3_bucket}-missing/colour' cannot be written")

    # A read-only local folder, for `run` and `reprocess` alike.
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _immutable(locked):
        pytest.skip("no way to make a folder read-only for this user")
    try:
        message = _refused(capsys, *run, "--out", str(locked))
        assert message.startswith(f"diffcolor: error: output '{locked}' cannot be written") and "\n" not in message
        assert main(["reprocess", str(locked), "--items", "p0", "--target", "a red dog"]) == 2
        assert capsys.readouterr().err.startswith(f"diffcolor: error: output '{locked}' cannot be written")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []  # the write probe left nothing


# ---------------------------------------------------------------------------
# Signals.


def test_sigterm_stops_a_run_fast_with_a_record_and_no_process_left(prefect_server, tmp_path):
    # Against the session's Prefect server (its start-up is tested above): SIGTERM while the items run.
    from prefect.settings import PREFECT_API_URL

    mark, stderr = uuid.uuid4().hex, tmp_path / "stderr"
    manifest = _collection(tmp_path, count=4)
    process = _start("run", str(manifest), "--out", "out", "--model", "tiny", "--preset", "smoke", "--device", "cpu",
                     cwd=tmp_path, env=_environment(mark, PREFECT_API_URL.value()), stderr=stderr)
    try:
        _wait_for(stderr, "items to go through", process, 300)  # the pool is up; items are under way
        time.sleep(1.0)
        workers = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
        assert workers, "the local pool's worker process"
        signalled = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        code = process.wait(timeout=60)
        seconds = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    text = stderr.read_text()
    assert code == 143 and seconds < 30, (code, seconds, text[-3000:])
    assert "Traceback" not in text and "interrupted by SIGTERM" in text.splitlines()[-1]
    summary = _interrupted_record(tmp_path / "out")
    assert summary["signal"] == "SIGTERM" and sum(summary["items"].values()) < 4
    assert not list((tmp_path / "out").rglob("lease-*.json")), "a lease left behind"
    _no_survivor(mark)


@pytest.mark.slow
def test_ctrl_c_stops_a_run_with_its_own_prefect_server_and_leaves_nothing(tmp_path):
    # SIGINT to the whole process group, as a terminal sends it; the command's own temporary Prefect server.
    mark, stderr = uuid.uuid4().hex, tmp_path / "stderr"
    process = _start("run", str(DEMO), "--out", "out", "--model", "tiny", "--preset", "smoke", "--device", "cpu",
                     cwd=tmp_path, env=_environment(mark), stderr=stderr)
    try:
        _wait_for(stderr, "[1/6]", process, 600)  # one item finished, others under way
        signalled = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=60)
        seconds = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    text = stderr.read_text()
    assert code == 130 and seconds < 30, (code, seconds, text[-3000:])
    assert "Traceback" not in text and "Connect" not in text and "interrupted by SIGINT" in text.splitlines()[-1]
    summary = _interrupted_record(tmp_path / "out")
    assert 1 <= sum(summary["items"].values()) < 6
    results = tmp_path / "out" / "runs" / summary["run_id"] / "results.parquet"
    import pyarrow.parquet as pq

    assert pq.read_table(results).num_rows >= 1  # the items finished before the signal are recorded
    assert not list((tmp_path / "out").rglob("lease-*.json")), "a lease left behind"
    _no_survivor(mark)


@pytest.mark.slow
def test_two_runs_started_at_once_print_no_database_error(tmp_path):
    marks, runs = [], []
    manifest = _collection(tmp_path, count=1)
    for number in range(2):
        mark, stderr = uuid.uuid4().hex, tmp_path / f"stderr{number}"
        marks.append(mark)
        runs.append((_start("run", str(manifest), "--out", f"out{number}", "--model", "tiny", "--preset", "smoke",
                            "--device", "cpu", "--pool", "inline", cwd=tmp_path, env=_environment(mark),
                            stderr=stderr), stderr))
    for process, stderr in runs:
        assert process.wait(timeout=900) == 0, stderr.read_text()[-3000:]
        text = stderr.read_text().lower()
        assert not [word for word in ("database", "sqlite", "locked", "traceback") if word in text], text[-3000:]
    for mark in marks:
        _no_survivor(mark)


@pytest.mark.slow
def test_sigterm_to_review_after_a_recolour_leaves_no_process(tmp_path):
    # A colourised item, a recolour job through the JSON API (the job starts a Prefect server and a pool
    # worker), then SIGTERM: the review server, its Prefect server and its worker all go.
    import hashlib
    import hmac
    import socket

    import httpx

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
    try:
        _wait_for(stderr, "sign in to recolour", process, 300)
        deadline = time.monotonic() + 120
        while True:  # the line comes just before uvicorn listens
            try:
                api.get("/items")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and process.poll() is None, stderr.read_text()[-3000:]
                time.sleep(0.5)
        job = api.post("/recolour", json={"targets": [{"item_id": "p0", "color_map": {"dog": "red"}}]}).json()
        deadline = time.monotonic() + 600
        while (state := api.get(f"/jobs/{job['job_id']}").json())["state"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(1)
        assert state["state"] == "completed", (state["message"], stderr.read_text()[-3000:])
        assert len(_marked(mark)) >= 3  # review, its Prefect server, the pool's worker
        signalled = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        code = process.wait(timeout=60)
        assert code == 143 and time.monotonic() - signalled < 30
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in stderr.read_text()
    _no_survivor(mark)
