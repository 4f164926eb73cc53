"""Warm pools: device pools kept between runs, so that a recolour on a warm worker loads no model.

A reprocess run asks for its pool through :func:`pool_for`. Three cases:

- In a process that keeps pools warm (:func:`keep_warm`: the review server's
  local jobs), the run borrows the pool of its key from the process's
  :class:`WarmPools`, started by the first run that needed it, and gives it
  back at its end with its workers and their models still loaded. The next
  run of the same key finds them loaded.
- With ``DIFFCOLOR_WARM_POOL`` naming the socket of a warm-pool service
  (``python -m flows.warm serve``, started beside the Prefect worker that
  serves the ``reprocess`` deployment, deploy/README.md), the run's items run
  on that service's warm pools: a flow run is a fresh process each time, the
  service is not.
- Otherwise a pool of the run's own, closed at the run's end (as ``diffcolor
  reprocess`` does: a command's models live as long as the command).

A pool's key is what its workers load and where: the :class:`ModelSpec`
(model, CLIP, download permission, weight storage), the device setting and
the workers per device. Memory bound: one set of models per worker, that is
``workers_per_device`` sets on each device per key, and at most ``max_pools``
keys kept (default :data:`DEFAULT_MAX_POOLS`): a run that needs another key
frees the least recently used idle pool first. Pools that runs are using are
never freed, so runs of more distinct keys than that at once hold one pool
each while they run, as they would without warm pools. A pool nobody used for
``idle_seconds`` (default :data:`DEFAULT_IDLE_SECONDS`) is closed, its
workers gone and their memory back. A worker that died while its pool was
idle (killed, crashed) is replaced by a fresh one, which loads the models,
before the next run starts on it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.managers import BaseManager
from typing import Iterator

from diffcolor.common.cache import cache_root
from diffcolor.common.errors import UserError
from flows.pool import DevicePool, ModelSpec

DEFAULT_IDLE_SECONDS = 600.0  # a pool unused for 10 minutes is closed
DEFAULT_MAX_POOLS = 2  # keys (model, device setting, workers per device) kept warm at once
SERVICE_ENV = "DIFFCOLOR_WARM_POOL"  # the socket of a warm-pool service the reprocess flow runs its items on

_ACTIVE: dict = {"pools": None}  # this process's WarmPools, while it keeps pools warm (keep_warm)
_ACTIVE_LOCK = threading.Lock()


@dataclass
class _Entry:
    pool: DevicePool
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


class WarmPools:
    """Device pools by key, kept between runs; idle ones closed after ``idle_seconds``, at most ``max_pools`` kept."""

    def __init__(self, idle_seconds: float = DEFAULT_IDLE_SECONDS, max_pools: int = DEFAULT_MAX_POOLS):
        if isinstance(idle_seconds, bool) or not isinstance(idle_seconds, (int, float)) or not idle_seconds > 0:
            raise UserError(f"the idle time of warm pools must be a number of seconds above 0, got {idle_seconds!r}")
        if isinstance(max_pools, bool) or not isinstance(max_pools, int) or max_pools < 1:
            raise UserError(f"the warm pools kept must be a whole number of at least 1, got {max_pools!r}")
        self.idle_seconds, self.max_pools = float(idle_seconds), max_pools
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.pools_started = 0  # pools this registry started (a run that found its pool warm started none)
        self._reaper = threading.Thread(target=self._reap, name="warm-pools-idle", daemon=True)
        self._reaper.start()

    @staticmethod
    def key(spec: ModelSpec, device: str, workers_per_device: int) -> tuple:
        return (spec, device, workers_per_device)

    @contextmanager
    def borrow(self, spec: ModelSpec, *, device: str = "auto", workers_per_device: int = 1) -> Iterator[DevicePool]:
        """The warm pool of this key (started when there is none), for the block; kept warm after it."""
        key = self.key(spec, device, workers_per_device)
        entry, stale = self._take(key, spec, device, workers_per_device)
        _close_all(stale)
        try:
            yield entry.pool
        finally:
            with self._lock:
                entry.users -= 1
                entry.last_used = time.monotonic()

    def _take(self, key: tuple, spec: ModelSpec, device: str, workers_per_device: int) -> tuple[_Entry, list]:
        stale = []
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the warm pools are closed (the server is stopping)")
            entry = self._entries.get(key)
            if entry is not None and entry.pool.stopped:
                stale.append(self._entries.pop(key).pool)
                entry = None
            if entry is None:
                while len(self._entries) >= self.max_pools:  # free the least recently used idle pools first
                    idle = next((k for k, e in self._entries.items() if e.users == 0), None)
                    if idle is None:
                        break  # every kept pool is in use: this run's pool is one more while they run
                    stale.append(self._entries.pop(idle).pool)
                entry = _Entry(DevicePool(spec, device=device, workers_per_device=workers_per_device))
                self._entries[key] = entry
                self.pools_started += 1
            elif entry.users == 0:
                entry.pool.heal()  # workers that died while the pool was idle: fresh ones
            self._entries.move_to_end(key)
            entry.users += 1
            entry.last_used = time.monotonic()
        return entry, stale

    def _reap(self) -> None:
        interval = min(max(self.idle_seconds / 10, 0.05), 5.0)
        while not self._closed.wait(interval):
            now, idle = time.monotonic(), []
            with self._lock:
                for key, entry in list(self._entries.items()):
                    if entry.users == 0 and now - entry.last_used >= self.idle_seconds:
                        idle.append(self._entries.pop(key).pool)
            _close_all(idle)

    def pools(self) -> list[DevicePool]:
        """The pools kept now, least recently used first."""
        with self._lock:
            return [entry.pool for entry in self._entries.values()]

    def describe(self) -> list[dict]:
        """Each pool kept: its model, device setting, workers, model loads so far, whether a run is using it."""
        with self._lock:
            return [{"model": key[0].model, "device": key[1], "workers_per_device": key[2], "users": entry.users,
                     "model_loads": entry.pool.model_loads, "worker_pids": entry.pool.worker_pids(),
                     "idle_seconds": round(time.monotonic() - entry.last_used, 1)}
                    for key, entry in self._entries.items()]

    def close(self, stop: bool = False) -> None:
        """Closes every pool (their workers exit) and stops keeping any: later borrows are refused. ``stop``: the
        items under way are stopped first (each unwinds, releasing its lease), else they finish first."""
        self._closed.set()
        with self._lock:
            pools = [entry.pool for entry in self._entries.values()]
            self._entries.clear()
        if stop:
            for pool in pools:
                pool.stop()
        _close_all(pools)
        if self._reaper is not threading.current_thread():
            self._reaper.join(timeout=5)


def _close_all(pools: list[DevicePool]) -> None:
    for pool in pools:
        pool.close()


def keep_warm(idle_seconds: float = DEFAULT_IDLE_SECONDS, max_pools: int = DEFAULT_MAX_POOLS) -> WarmPools:
    """Makes this process keep its reprocess runs' pools warm (the review server's local jobs); returns them."""
    with _ACTIVE_LOCK:
        if _ACTIVE["pools"] is None:
            _ACTIVE["pools"] = WarmPools(idle_seconds, max_pools)
        return _ACTIVE["pools"]


def warm_pools() -> WarmPools | None:
    """This process's warm pools, or None when it keeps none."""
    return _ACTIVE["pools"]


def stop_keeping_warm() -> None:
    """Closes this process's warm pools (their workers exit); later runs start pools of their own."""
    with _ACTIVE_LOCK:
        pools, _ACTIVE["pools"] = _ACTIVE["pools"], None
    if pools is not None:
        pools.close()


@contextmanager
def pool_for(spec: ModelSpec, *, device: str, workers_per_device: int, inline: bool = False, warm: bool = False,
             on_stage=None) -> Iterator:
    """The pool a run's items run on (module docstring): warm when ``warm`` and this process keeps pools warm or
    a warm-pool service is named, else one of the run's own, closed after the block. Inline pools are never warm."""
    if warm and not inline:
        pools = warm_pools()
        if pools is not None:
            with pools.borrow(spec, device=device, workers_per_device=workers_per_device) as pool:
                yield pool
            return
        address = os.environ.get(SERVICE_ENV)
        remote = None
        if address:
            try:
                remote = RemotePool(address, spec, device=device, workers_per_device=workers_per_device)
            except UserError as error:  # the service is down: this run loads its models, as without one
                _logger().warning("%s; this run starts a pool of its own", error)
        if remote is not None:
            yield remote
            return
    pool = DevicePool(spec, device=device, workers_per_device=workers_per_device, inline=inline, on_stage=on_stage)
    try:
        yield pool
    finally:
        pool.close()


def _logger():
    """The flow run's logger (its lines in the Prefect UI), else this module's."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        import logging

        return logging.getLogger(__name__)


# -- The warm-pool service: warm pools for the flow runs of a Prefect worker -------------------------------------


class _Service:
    """What the service answers: runs a function on the warm pool of a key."""

    def __init__(self, pools: WarmPools):
        self._pools = pools

    def run(self, spec: ModelSpec, device: str, workers_per_device: int, function, args: tuple):
        with self._pools.borrow(spec, device=device, workers_per_device=workers_per_device) as pool:
            return pool.run(function, *args)

    def devices(self, spec: ModelSpec, device: str, workers_per_device: int) -> int:
        with self._pools.borrow(spec, device=device, workers_per_device=workers_per_device) as pool:
            return pool.devices

    def describe(self) -> list[dict]:
        return self._pools.describe()


class _Manager(BaseManager):
    pass


_Manager.register("service")  # the client's side; the server registers its own object (serve)


def _key_file(address: str) -> str:
    return address + ".key"


def _connect(address: str) -> _Manager:
    try:
        with open(_key_file(address), "rb") as file:
            authkey = file.read()
    except OSError as error:
        raise UserError(f"{SERVICE_ENV} names '{address}', whose key file cannot be read "
                        f"({error.strerror or type(error).__name__}): is the warm-pool service running?") from None
    manager = _Manager(address=address, authkey=authkey)
    try:
        manager.connect()
    except OSError as error:
        raise UserError(f"the warm-pool service at '{address}' does not answer "
                        f"({error.strerror or type(error).__name__}); start it with: python -m flows.warm serve "
                        f"--socket {address}") from None
    return manager


class RemotePool:
    """A pool of the warm-pool service, as a run sees it: ``run(function, *args)`` runs there."""

    def __init__(self, address: str, spec: ModelSpec, *, device: str, workers_per_device: int):
        self.address, self.spec, self.device, self.workers_per_device = address, spec, device, workers_per_device
        self._local = threading.local()  # one connection per thread: the run's tasks run in threads
        self.devices = self._service().devices(spec, device, workers_per_device)  # starts it now, if it is cold

    def _service(self):
        service = getattr(self._local, "service", None)
        if service is None:
            service = self._local.service = _connect(self.address).service()
        return service

    def run(self, function, *args):
        return self._service().run(self.spec, self.device, self.workers_per_device, function, args)

    def describe(self) -> list[dict]:
        return self._service().describe()


def default_socket() -> str:
    """The service's socket when none is named: in this user's cache folder (made owner-only when served), never a
    shared folder where another user could create the name first."""
    return os.path.join(cache_root(), "warm.sock")


def serve(address: str, idle_seconds: float = DEFAULT_IDLE_SECONDS, max_pools: int = DEFAULT_MAX_POOLS,
          ready=None) -> None:
    """Serves warm pools on the Unix socket ``address`` until SIGTERM or SIGINT; its key is written beside it
    (``ADDRESS.key``, readable by this user only). The pools' workers exit with the service."""
    if len(os.fsencode(address)) > 100:  # a Unix socket's path has room for about 104 bytes
        raise UserError(f"the warm-pool socket path '{address}' is too long for a Unix socket (at most 100 bytes)")
    os.makedirs(os.path.dirname(os.path.abspath(address)), mode=0o700, exist_ok=True)
    pools = WarmPools(idle_seconds, max_pools)
    service = _Service(pools)

    class Server(BaseManager):
        pass

    Server.register("service", callable=lambda: service)
    if os.path.exists(address):
        try:
            _connect(address)
        except UserError:
            pass  # a socket left by a service that is gone: replaced below
        else:
            raise UserError(f"a warm-pool service already answers at '{address}'")
    authkey = secrets.token_bytes(32)
    for stale in (address, _key_file(address)):
        if os.path.exists(stale):
            os.unlink(stale)
    descriptor = os.open(_key_file(address), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(authkey)
    server = Server(address=address, authkey=authkey).get_server()
    os.chmod(address, 0o600)

    def stop(signum, frame):
        server.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"warm pools at {address} (idle pools closed after {idle_seconds:g} s, at most {max_pools} kept)",
          file=sys.stderr, flush=True)
    if ready is not None:
        ready()
    try:
        server.serve_forever()  # ends with SystemExit once stopped
    finally:
        pools.close(stop=True)
        for path in (address, _key_file(address)):
            try:
                os.unlink(path)
            except OSError:
                pass


def with_service(command: list[str], address: str, idle_seconds: float = DEFAULT_IDLE_SECONDS,
                 max_pools: int = DEFAULT_MAX_POOLS, start_timeout: float = 120.0) -> int:
    """Runs ``command`` (a Prefect worker) beside a warm-pool service on ``address``, with ``DIFFCOLOR_WARM_POOL``
    naming it: the service starts first, SIGTERM and SIGINT go to the command, and the service stops after the
    command has ended (its flow runs first). Returns the command's exit status (containers: compose, Kubernetes)."""
    import subprocess

    if idle_seconds == 0:  # no warm pools: the command alone, as if started without this
        os.execvp(command[0], command)
    service = subprocess.Popen([sys.executable, "-m", "flows.warm", "serve", "--socket", address, "--idle-seconds",
                                repr(float(idle_seconds)), "--max-pools", str(max_pools)])
    child = None
    try:
        deadline = time.monotonic() + start_timeout
        while not os.path.exists(_key_file(address)):
            if service.poll() is not None:
                return service.returncode or 1
            if time.monotonic() > deadline:
                print(f"error: the warm-pool service did not start in {start_timeout:g} s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        child = subprocess.Popen(command, env=dict(os.environ, **{SERVICE_ENV: address}))
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda number, frame: child.send_signal(number))
        code = child.wait()
        return 128 - code if code < 0 else code  # killed by a signal: 128 + its number, as a shell says
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        if service.poll() is None:
            service.terminate()
            try:
                service.wait(timeout=60)
            except subprocess.TimeoutExpired:
                service.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.warm", description="The warm-pool service: device pools "
                                     "kept between the reprocess deployment's flow runs (deploy/README.md).")
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve", help="serve warm pools on a Unix socket until SIGTERM")
    beside = commands.add_parser("with", help="run a command (the Prefect worker) beside a warm-pool service, "
                                              f"{SERVICE_ENV} naming it: python -m flows.warm with -- prefect worker ...")
    for sub in (serving, beside):
        sub.add_argument("--socket", required=sub is serving, default=default_socket(), metavar="PATH",
                         help=f"the socket to serve on (default: warm.sock in this user's DiffColor cache folder); "
                              f"the flow runs find it in {SERVICE_ENV}")
        sub.add_argument("--idle-seconds", type=float, default=DEFAULT_IDLE_SECONDS,
                         help="close a pool unused for this long (default %(default)g)")
        sub.add_argument("--max-pools", type=int, default=DEFAULT_MAX_POOLS,
                         help="keys (model, device, workers per device) kept at most (default %(default)s)")
    beside.add_argument("run", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the command to run")
    args = parser.parse_args(argv)
    try:
        if args.command == "with":
            command = args.run[1:] if args.run[:1] == ["--"] else args.run
            if not command:
                raise UserError("name the command to run after --, e.g. -- prefect worker start --pool diffcolor")
            WarmPools(args.idle_seconds or 1.0, args.max_pools).close()  # bad values refused before anything starts
            return with_service(command, args.socket, args.idle_seconds, args.max_pools)
        serve(args.socket, args.idle_seconds, args.max_pools)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
