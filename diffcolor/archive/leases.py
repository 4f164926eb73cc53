"""Item leases: one worker at a time works on an item, across processes, runs and machines.

Two runs on one output (a nightly run and a curator's rerun, say) may reach the
same item at once. Before an item's work a worker takes the item's lease, and
keeps it alive while it works. The protocol needs one primitive of the store,
*create an object only if it does not exist* (local disk: ``open(O_CREAT |
O_EXCL)``; S3: ``PutObject`` with ``If-None-Match: *``; ``memory://``: a
check-and-set under a process lock), and works like this:

- **Generations.** A lease is an object ``PREFIX/lock/lease-GGGGGGGG.json``;
  the highest generation present is the current lease. It holds the owner (a
  random id), host, pid and an expiry (wall clock, seconds).
- **Acquire.** With no lease object, create generation 1. With a current lease
  that is expired, whose holder ran on this host and has exited (its pid is
  gone: a killed worker's item is retried at once, not after a lease), or that
  has been unreadable or empty for longer than a lease (a file a full disk left
  empty, judged by the store's modification time), create the next generation. Creation is exclusive, so of two workers racing
  for the same generation exactly one wins; the loser waits. Older generations
  are then removed (they belong to workers that are gone).
- **Heartbeat.** Every third of the lease the holder checks that its own
  object is still there and no higher generation exists, then rewrites its
  own object with a new expiry. A heartbeat that cannot do so, or a holder
  that has not renewed for two thirds of a lease (a stalled or suspended
  process), has **lost** the lease: :meth:`Lease.check`, which the work calls
  at every step and before every write, raises :class:`LeaseLostError`
  (transient: the flow retries the item, which then finds it done or waits).
  A holder stops a third of a lease before anyone may take over; that third
  is the margin for clock skew between hosts.
- **Release.** The holder removes its own object only; it never removes or
  rewrites another worker's.

Failure cases: a killed worker's lease expires and is taken over after at most
one lease; an empty or corrupt lease object blocks for at most one lease; a
store that fails during a heartbeat makes the holder stop, never two holders;
two workers racing for an expired lease create the same generation, and only
one succeeds.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from diffcolor.archive import storage
from diffcolor.common.errors import (
    DiffColorError,
    MissingObjectError,
    StorageError,
    TransientError,
)
from diffcolor.common.redact import redact

LEASE_SECONDS = 120.0  # ours: a lease not renewed for this long belongs to a dead worker
LOST_FRACTION = 2 / 3  # a holder that has not renewed for this share of a lease stops working
_NAME = re.compile(r"^lease-(\d{8})\.json$")
_MEMORY_LOCK = threading.Lock()


class LeaseLostError(TransientError):
    """The worker no longer holds the item's lease (taken over, or not renewed in time); its work stops."""

    error_class = "lease_lost"


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Creates the object at ``uri`` only if it does not exist; True when this call created it."""
    fs, path = storage.filesystem(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        for attempt in range(3):  # the folder may be removed under us by a holder releasing the last lease
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                return False
            except FileNotFoundError:
                if attempt == 2:
                    raise
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        return True
    if "memory" in protocols:
        with _MEMORY_LOCK:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
            return True
    if "s3" in protocols or "s3a" in protocols:
        bucket, key = path.split("/", 1)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*",
                       ContentType="application/json")
        except FileExistsError:  # s3fs's translation of 412 Precondition Failed on If-None-Match
            return False
        except Exception as error:  # botocore's own classes, or an OSError s3fs made of a 409 conflict
            text = f"{type(error).__name__} {error}"
            if "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text:
                return False
            raise storage.backend_error(uri, "writing", error, fs) from error
        finally:
            fs.invalidate_cache(path)
        return True
    raise StorageError(f"leases are not supported on '{redact(uri)}' (protocols {protocols}); "
                       "use local disk, S3 or memory")


class Lease:
    """A held item lease (see the module docstring); :meth:`check` raises once it is lost."""

    def __init__(self, folder: str, generation: int, owner: str, lease_seconds: float):
        self.folder, self.generation, self.owner, self.lease_seconds = folder, generation, owner, lease_seconds
        self.uri = storage.join(folder, _name(generation))
        self.renewed = time.monotonic()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="diffcolor-lease", daemon=True)

    def check(self, *_) -> None:
        """Raises LeaseLostError when the lease is lost; cheap, called at every step (also as a progress callback)."""
        if self._lost is None and time.monotonic() - self.renewed > LOST_FRACTION * self.lease_seconds:
            self._lost = f"not renewed for {time.monotonic() - self.renewed:.0f} s"
        if self._lost is not None:
            raise LeaseLostError(f"lease '{redact(self.uri)}' lost: {self._lost}; the item's work stops")

    def renew(self) -> None:
        """Rewrites the lease with a new expiry; marks it lost when it was taken over or its object is gone."""
        names = _generations(self.folder)
        if self.generation not in names:
            self._lost = "its lease object is gone (taken over and cleaned up)"
        elif max(names) > self.generation:
            self._lost = f"generation {max(names)} took over"
        else:
            storage.write_bytes(self.uri, _content(self.owner, self.generation, self.lease_seconds))
            self.renewed = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.renew()
            except DiffColorError:
                pass  # check() declares the lease lost once the last renewal is too old
            if self._lost is not None:
                return

    def stop_heartbeat(self) -> None:
        """Stops renewing; the lease object stays and expires after a lease (what a killed worker leaves)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def release(self) -> None:
        """Stops the heartbeat and removes this worker's own lease object (never another's), and the lock
        folder when that leaves it empty (local disks)."""
        self.stop_heartbeat()
        storage.remove(self.uri)
        storage.remove_empty_folders(self.folder)


def _name(generation: int) -> str:
    return f"lease-{generation:08d}.json"


def _generations(folder: str) -> list[int]:
    names = (uri.rsplit("/", 1)[-1] for uri in storage.list_files(folder))
    return sorted(int(match.group(1)) for match in map(_NAME.match, names) if match)


def _content(owner: str, generation: int, lease_seconds: float) -> bytes:
    return json.dumps({"owner": owner, "generation": generation, "host": socket.gethostname(), "pid": os.getpid(),
                       "expires": time.time() + lease_seconds}).encode()


def _is_dead(uri: str, lease_seconds: float) -> bool | None:
    """Whether the lease at ``uri`` may be taken over: expired, or unreadable for longer than a lease.

    None when the object is gone (released meanwhile).
    """
    try:
        held = json.loads(storage.read_bytes(uri))
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
            return True  # its holder ran on this host and has exited: no need to wait out its lease
        return float(held["expires"]) < time.time()
    except MissingObjectError:
        return None
    except (ValueError, KeyError, TypeError):  # empty, truncated or foreign content: judge by its age
        modified = storage.modified_time(uri)
        return modified is None or time.time() - modified > lease_seconds


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def acquire(prefix: str, *, lease_seconds: float = LEASE_SECONDS, poll_seconds: float = 0.5,
            timeout_seconds: float | None = None) -> Lease:
    """Takes the lease of the item under ``prefix`` and starts its heartbeat.

    Waits while another live worker holds it. Raises TimeoutError after
    ``timeout_seconds`` (None: wait as long as it takes).
    """
    folder = storage.join(prefix, "lock")
    owner = uuid.uuid4().hex
    started = time.monotonic()
    while True:
        generations = _generations(folder)
        current = max(generations, default=0)
        dead = True if not current else _is_dead(storage.join(folder, _name(current)), lease_seconds)
        if dead is None:
            continue  # released between the listing and the read: look again
        if dead and _create_exclusive(storage.join(folder, _name(current + 1)),
                                      _content(owner, current + 1, lease_seconds)):
            for old in generations:  # the previous holders are gone: their objects go too
                storage.remove(storage.join(folder, _name(old)))
            lease = Lease(folder, current + 1, owner, lease_seconds)
            lease._thread.start()
            return lease
        if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
            raise TimeoutError(f"item lease '{redact(folder)}' still held after {timeout_seconds} s")
        time.sleep(poll_seconds)


@contextmanager
def item_lease(prefix: str, *, lease_seconds: float = LEASE_SECONDS, poll_seconds: float = 0.5,
               timeout_seconds: float | None = None) -> Iterator[Lease]:
    """Holds the lease of the item under ``prefix`` for the duration of the block (see :func:`acquire`)."""
    lease = acquire(prefix, lease_seconds=lease_seconds, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds)
    try:
        yield lease
    finally:
        lease.release()
