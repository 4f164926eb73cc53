"""Stopping a command on SIGINT (Ctrl-C) or SIGTERM: quickly, cleanly, with a record of what was done.

The command line installs :func:`handling_signals` around ``run`` and
``reprocess``. On the first signal:

- :data:`STOP` is set. The flows stop submitting items, the pools' workers
  are told to stop (SIGTERM: the item under way unwinds, releasing its
  lease, and its work is not recorded), and the flow writes the run's
  record of the items finished so far, marked ``interrupted``.
- Before the flow has started (the Prefect server starting, the checks),
  :class:`Interrupted` is raised at once instead: nothing has run yet.
- A watchdog ends the process after :data:`GRACE_SECONDS` whatever happens:
  every process registered here (pool workers, the temporary Prefect
  server) is killed and the process exits with ``128 + signal``.

A second signal ends it the same way at once. Registered processes are the
ones this process started; nothing else is ever signalled. This module
imports no Prefect, so the command line can install it before Prefect loads.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

GRACE_SECONDS = 25.0  # a stopped run exits within this (then hard: everything killed), inside 30 s
STOP = threading.Event()  # set on the first signal: every loop of this process winds down
_received: list[int] = []
_registered: list = []  # objects with kill() and, optionally, stop(): what this process started
_state = {"installed": False, "graceful": False}


class Interrupted(KeyboardInterrupt):
    """Raised when a signal arrives before the run has started; ``exit_code`` is 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum, self.exit_code = signum, 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def received() -> int | None:
    """The first signal received, or None."""
    return _received[0] if _received else None


def exit_code() -> int:
    """The exit status of a process stopped by the signal received (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + (received() or signal.SIGINT)


def register(thing) -> None:
    """Registers what this process started (a pool, a server): ``stop()`` on the first signal, ``kill()`` when
    the grace period is over."""
    _registered.append(thing)


def unregister(thing) -> None:
    try:
        _registered.remove(thing)
    except ValueError:
        pass


def kill_registered() -> None:
    """Kills everything registered, now (each ``kill()``; a failing one does not stop the others)."""
    for thing in list(_registered):
        try:
            thing.kill()
        except Exception:
            pass


def stop_registered() -> None:
    """Tells everything registered to stop (each ``stop()``): pools' workers unwind their items."""
    for thing in list(_registered):
        stop = getattr(thing, "stop", None)
        if stop is not None:
            try:
                stop()
            except Exception:
                pass


def hard_exit(reason: str) -> None:
    """Kills everything registered, prints one line and ends the process with 128 + the signal."""
    kill_registered()
    try:
        print(f"diffcolor: interrupted by {signal_name(received() or signal.SIGINT)}: {reason}", file=sys.stderr,
              flush=True)
    finally:
        os._exit(exit_code())


def _watchdog(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _state["installed"]:
            return  # the command ended meanwhile
        time.sleep(0.2)
    if _state["installed"]:
        hard_exit(f"stopped hard after {seconds:.0f} s; a rerun resumes from the latest checkpoints")


def _on_signal(signum, frame) -> None:
    if _received:  # the second signal: no more waiting
        _received.append(signum)
        threading.Thread(target=hard_exit, args=("second signal, stopped at once",), daemon=True).start()
        return
    _received.append(signum)
    STOP.set()
    # The work is done in threads: this handler may have interrupted code holding a lock that it needs.
    threading.Thread(target=stop_registered, name="diffcolor-stop", daemon=True).start()
    threading.Thread(target=_watchdog, args=(GRACE_SECONDS,), name="diffcolor-watchdog", daemon=True).start()
    if not _state["graceful"]:
        raise Interrupted(signum)


@contextmanager
def handling_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop this process as the module docstring says, for the duration of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.clear()
    _received.clear()
    previous = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    _state["installed"] = True
    try:
        yield
    finally:
        _state["installed"] = _state["graceful"] = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def graceful() -> Iterator[None]:
    """Within the block, a signal does not raise: the flow under way notices :data:`STOP` and winds down."""
    before = _state["graceful"]
    _state["graceful"] = True
    try:
        yield
    finally:
        _state["graceful"] = before


def reclaim_signals() -> None:
    """Re-installs the handlers in the main thread where Prefect's flow engine replaced them (it installs its own
    SIGTERM handler for the flow run); a no-op unless :func:`handling_signals` is active."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not _on_signal:
                signal.signal(signum, _on_signal)


def stopping() -> bool:
    return STOP.is_set()
