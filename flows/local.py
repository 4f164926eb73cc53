"""The local Prefect of ``diffcolor run``, ``reprocess``, ``demo`` and ``review``: a private temporary server.

Without ``PREFECT_API_URL`` (in the environment or the active Prefect
profile) a command that runs a flow starts its own temporary Prefect server
(:class:`LocalPrefect`) instead of Prefect's ephemeral one:

- **Its own database.** Each command's server keeps its SQLite database in a
  private temporary folder, removed when the command ends, so two commands
  started at once never share (and lock) one database. An operator who sets
  ``PREFECT_HOME`` or ``PREFECT_SERVER_DATABASE_CONNECTION_URL`` keeps that
  database (and the run history in it); with ``PREFECT_API_URL`` set nothing
  is started and the flows report to that server.
- **A start-up limit that fits a busy machine.** The server has
  ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` to answer (120 s
  unless the operator set it), and one more try on another port; then
  :class:`PrefectStartError`, one line, no traceback.
- **Its own process group, and no orphan.** Ctrl-C in a terminal reaches the
  command, not the server, which ignores SIGINT and SIGTERM, so the flow
  can still record an interrupted run; the server is stopped when the
  command ends (normally, on an error or on SIGINT/SIGTERM), and it exits by
  itself within a second if the command is killed outright (it watches its
  parent).
- **No telemetry.** :func:`prepare_environment` turns Prefect's usage
  analytics off (``PREFECT_SERVER_ANALYTICS_ENABLED=false`` for the server,
  ``DO_NOT_TRACK=1`` for the client) before Prefect is imported: archives run
  air-gapped, and the README promises runs are offline.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack

from diffcolor.common.errors import DiffColorError, UserError
from flows import stopping

STARTUP_VARIABLE = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_SECONDS = 120  # Prefect's own default (20 s) is missed on a busy machine
TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}

# The server process: uvicorn serving Prefect's API. It ignores SIGINT and SIGTERM (a terminal's Ctrl-C, or a
# service manager signalling every process of the service, must not take the API from a run that is recording
# its interruption); the command kills it when done, and it exits by itself once the command is gone.
_SERVER = """\
import contextlib, os, signal, sys, threading, time
parent = int(sys.argv[1])
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
import uvicorn, uvicorn.server
uvicorn.server.Server.capture_signals = lambda self: contextlib.nullcontext()
uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[2]),
            log_level="error", lifespan="on")
"""


class PrefectStartError(DiffColorError):
    """The temporary Prefect server did not start (twice)."""

    error_class = "prefect_start"


def prepare_environment() -> None:
    """Prefect's usage analytics off, for this process and every process it starts; call before importing Prefect."""
    os.environ.update(TELEMETRY_OFF)


def startup_seconds() -> float:
    """The server's start-up limit: the operator's ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, else 120 s."""
    text = os.environ.get(STARTUP_VARIABLE, "").strip()
    if not text:
        return float(DEFAULT_STARTUP_SECONDS)
    try:
        value = int(text)  # as Prefect reads it
    except ValueError:
        raise UserError(f"{STARTUP_VARIABLE} must be a whole number of seconds, got {text!r}") from None
    if value <= 0:
        raise UserError(f"{STARTUP_VARIABLE} must be above 0, got {text!r}")
    return value


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPrefect:
    """A context manager: within it, flows of this process report to a Prefect API (see the module docstring).

    ``api_url`` is the temporary server's API (None when the operator's
    ``PREFECT_API_URL`` is used). ``always=True`` starts a server even then (tests).
    """

    def __init__(self, *, always: bool = False):
        self.always = always
        self.api_url: str | None = None
        self.folder: str | None = None  # private folder: the database and the server's log
        self.process: subprocess.Popen | None = None
        self._settings = None
        self._lock = threading.Lock()

    # -- the context manager
    def __enter__(self) -> "LocalPrefect":
        self.start()
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def start(self) -> None:
        prepare_environment()
        from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

        settings = get_current_settings()
        if settings.api.url and not self.always:
            return  # the operator's server (or a test harness): nothing to start
        limit = startup_seconds()
        private = ("PREFECT_HOME" not in os.environ and settings.server.database.connection_url is None) or self.always
        self.folder = tempfile.mkdtemp(prefix="diffcolor-prefect-")
        env = dict(os.environ, **settings.to_environment_variables(exclude_unset=True))
        env.pop("PREFECT_API_URL", None)
        env.update(TELEMETRY_OFF, PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
        if private:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{self.folder}/prefect.db"
        stopping.register(self)
        failure = None
        try:
            for _ in range(2):  # one more try on another port
                failure = self._try_start(env, limit)
                if failure is None:
                    break
        except BaseException:  # interrupted while starting (flows/stopping.py)
            self.close()
            raise
        if failure is not None:
            self.close()
            raise PrefectStartError(
                f"the temporary Prefect server did not start: {failure} (tried twice); set {STARTUP_VARIABLE} to "
                f"allow it longer (now {limit:g} s), or PREFECT_API_URL to a running Prefect server")
        # This context's settings and the process-wide ones, which threads started later (review's jobs) read.
        self._settings = ExitStack()
        self._settings.enter_context(temporary_settings(updates={PREFECT_API_URL: self.api_url}))
        import prefect.context

        swap = getattr(prefect.context, "_temporary_global_settings_context", None)
        if swap is not None:
            self._settings.enter_context(swap(prefect.context.get_settings_context()))

    def _try_start(self, env: dict, limit: float) -> str | None:
        """Starts the server and waits for its health check; None when it answers, else why not."""
        import httpx

        port = _free_port()
        log = open(os.path.join(self.folder, "server.log"), "ab")
        try:
            with self._lock:
                self.process = subprocess.Popen([sys.executable, "-c", _SERVER, str(os.getpid()), str(port)],
                                                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                start_new_session=True)  # terminal signals reach the command only
        finally:
            log.close()
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + limit
        with httpx.Client(timeout=5, trust_env=False) as client:  # loopback: never through a proxy
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    why = f"it exited with status {self.process.returncode}{self._last_log_line()}"
                    self._stop_process()
                    return why
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        self.api_url = url
                        return None
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        self._stop_process()
        return f"no answer within {limit:g} s{self._last_log_line()}"

    def _last_log_line(self) -> str:
        try:
            with open(os.path.join(self.folder, "server.log"), encoding="utf-8", errors="replace") as log:
                lines = [line.strip() for line in log if line.strip()]
        except OSError:
            return ""
        return f" ({lines[-1][:200]})" if lines else ""

    # -- stopping
    def _stop_process(self) -> None:
        with self._lock:
            process, self.process = self.process, None
        if process is None:
            return
        # The server ignores SIGTERM (see _SERVER); its database is a temporary one, or an operator's SQLite or
        # Postgres database, which a killed client leaves consistent. Its process group is its own.
        self._kill_group(process)
        process.wait()

    @staticmethod
    def _kill_group(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """At once (a stopped command's last resort): the server's process group is killed."""
        process = self.process
        if process is not None:
            self._kill_group(process)

    def close(self) -> None:
        """Stops the server and removes its private folder (the database with it)."""
        if self._settings is not None:
            _drain_prefect()  # the logs and events of the runs reach the server before it stops
            settings, self._settings = self._settings, None
            try:
                settings.close()
            except ValueError:  # entered in another thread's context, which ends with that thread
                pass
        self._stop_process()
        stopping.unregister(self)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self.api_url = None


def _drain_prefect(timeout: float = 10.0) -> None:
    """Sends Prefect's pending logs and events (as Prefect's own test harness does before it stops its server)."""
    def drain() -> None:
        try:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            for result in (APILogWorker.drain_all(timeout=timeout), EventsWorker.drain_all(timeout=timeout)):
                if hasattr(result, "close"):
                    result.close()  # an awaitable nobody awaits (in an event loop): left to the loop
        except Exception:
            pass

    thread = threading.Thread(target=drain, name="diffcolor-prefect-drain", daemon=True)
    thread.start()
    thread.join(timeout)
