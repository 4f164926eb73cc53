"""Item leases: one worker at a time works on an item, across processes, runs and machines.

Two runs on one output (a nightly run and a curator's rerun, say) may reach the
same item at once. Before an item's work a worker takes the item's lease, and
keeps it alive while it works. The protocol needs one primitive of the store,
*create an object only if it does not exist* (local disk: ``open(O_CREAT |
O_EXCL)``; S3: ``PutObject`` with ``If-None-Match: *``; ``memory://``: a
check-and-set under a process lock), and *replace or remove an object only
while it is the one last read* (the owner check below), and works like this:

- **Generations.** A lease is an object ``PREFIX/lock/lease-GGGGGGGG.json``;
  the highest generation present is the current lease. It holds the owner (a
  random id), host, pid and an expiry (wall clock, seconds).
- **Acquire.** With no lease object, create generation 1. With a current lease
  that is expired, whose holder ran on this host and has exited (its pid is
  gone: a killed worker's item is retried at once, not after a lease), or that
  has been unreadable or empty for longer than a lease (a file a full disk left
  empty, judged by the store's modification time), create the next generation. Creation is exclusive, so of two workers racing
  for the same generation exactly one wins; the loser waits. The winner lists
  again: a higher generation means its view was stale, and it removes its own
  object and waits. Otherwise the generations it superseded are removed, each
  only while it is still the object the winner read before creating its own.
- **Heartbeat.** Every third of the lease the holder checks that its own
  object is still there and no higher generation exists, then rewrites its
  own object with a new expiry. A heartbeat that cannot do so, or a holder
  that has not renewed for two thirds of a lease (a stalled or suspended
  process), has **lost** the lease: :meth:`Lease.check`, which the work calls
  at every step and before every write, raises :class:`LeaseLostError`
  (transient: the flow retries the item, which then finds it done or waits).
  A holder stops a third of a lease before anyone may take over; that third
  is the margin for clock skew between hosts.
- **Owner-only writes.** Generation numbers are reused once an item's lock
  folder empties (every lease released), so a name alone does not say whose
  object it is: a holder that stalled past its lease may find its generation's
  name held by a later worker. Each object therefore names its owner (a random
  id per acquisition), and the holder's rewrite and removal compare that owner
  and write in one atomic step, the **owner check**: S3, a GET, then a PUT or
  DELETE with ``If-Match`` on the ETag of the very bytes compared; local disk,
  both under an exclusive ``flock`` of the lock folder (so local disk means
  one host, or a network filesystem whose ``flock`` is shared between hosts);
  ``memory://``, under a process lock. A holder whose object is another's
  has lost the lease and writes nothing.
- **Release.** The holder removes its own object only (by the owner check);
  it never removes or rewrites another worker's.

Failure cases: a killed worker's lease expires and is taken over after at most
one lease; an empty or corrupt lease object blocks for at most one lease; a
store that fails during a heartbeat makes the holder stop, never two holders;
two workers racing for an expired lease create the same generation, and only
one succeeds; a stalled holder whose generation's name was reused renews and
releases nothing of the new holder's.
"""

from __future__ import annotations

import fcntl
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
from diffcolor.archive.layout import lock_folder
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


def _protocol_of(fs) -> str:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    for kind, names in (("local", ("file", "local")), ("memory", ("memory",)), ("s3", ("s3", "s3a"))):
        if any(name in protocols for name in names):
            return kind
    raise StorageError(f"leases are not supported on protocols {protocols}; use local disk, S3 or memory")


def _owner_of(data: bytes) -> str | None:
    """The owner a lease object names; None when it names none (empty, truncated, foreign content)."""
    try:
        held = json.loads(data)
    except ValueError:
        return None
    return str(held["owner"]) if isinstance(held, dict) and held.get("owner") is not None else None


def _refused(error: BaseException) -> bool:
    """Whether an S3 error is a failed precondition (If-None-Match / If-Match): the object is not as expected."""
    if isinstance(error, FileExistsError):  # s3fs's translation of 412 Precondition Failed on If-None-Match
        return True
    text = f"{type(error).__name__} {error}"
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text


@contextmanager
def _local_guard(folder: str, *, create: bool, wait_seconds: float = 30.0) -> Iterator[bool]:
    """Excludes every other lease mutation of ``folder`` (a local lock folder), across processes.

    An exclusive ``flock`` on the folder itself, checked to still be the folder at that path (a
    holder releasing the last lease removes the folder under the same guard). Held for one
    read-compare-write, never while waiting for a lease. Yields False (holding nothing) when the
    folder does not exist and ``create`` is False.
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        if create:
            os.makedirs(folder, exist_ok=True)
        try:
            handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            if not create:
                yield False
                return
            continue  # removed between the two calls
        try:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StorageError(f"lease folder '{redact(folder)}' stayed locked for {wait_seconds:g} s")
                    time.sleep(0.005)
            try:
                current = os.stat(folder)
            except FileNotFoundError:
                current = None
            opened = os.fstat(handle)
            if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                yield True
                return
        finally:
            os.close(handle)  # releases the flock


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def _s3_get(fs, path: str) -> tuple[bytes, str] | None:
    """The object's bytes and the ETag of exactly those bytes (one GET); None when it does not exist."""
    from fsspec.asyn import sync

    bucket, key = path.split("/", 1)

    async def get():
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    try:
        return sync(fs.loop, get)
    except FileNotFoundError:
        return None
    finally:
        fs.invalidate_cache(path)


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Creates the object at ``uri`` only if it does not exist; True when this call created it."""
    fs, path = storage.filesystem(uri)
    try:
        kind = _protocol_of(fs)
        if kind == "local":
            with _local_guard(os.path.dirname(path), create=True):
                try:
                    handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(handle, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())
            return True
        if kind == "memory":
            with _MEMORY_LOCK:
                if fs.exists(path):
                    return False
                fs.pipe_file(path, data)
                return True
        bucket, key = path.split("/", 1)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*",
                       ContentType="application/json")
        except Exception as error:
            if _refused(error):
                return False
            raise
        finally:
            fs.invalidate_cache(path)
        return True
    except Exception as error:
        if isinstance(error, DiffColorError) or not storage._is_backend_error(error):
            raise
        raise storage.backend_error(uri, "writing", error, fs) from error


def _replace_if_owner(uri: str, owner: str, data: bytes) -> bool:
    """Rewrites the lease object at ``uri`` with ``data`` only while it is ``owner``'s; False when it is
    gone or another worker's (then nothing is written).

    The comparison and the write are one atomic step: local disk, both under :func:`_local_guard`;
    S3, a PUT with ``If-Match`` on the ETag of the very bytes compared; memory, under a process lock.
    """
    fs, path = storage.filesystem(uri)
    try:
        kind = _protocol_of(fs)
        if kind == "local":
            with _local_guard(os.path.dirname(path), create=False) as present:
                held = _read_local(path) if present else None
                if held is None or _owner_of(held) != owner:
                    return False
                staging = f"{path}.{owner}.partial"
                with open(staging, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())
                os.replace(staging, path)
            return True
        if kind == "memory":
            with _MEMORY_LOCK:
                if not fs.exists(path) or _owner_of(fs.cat_file(path)) != owner:
                    return False
                fs.pipe_file(path, data)
                return True
        found = _s3_get(fs, path)
        if found is None or _owner_of(found[0]) != owner:
            return False
        bucket, key = path.split("/", 1)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=found[1],
                       ContentType="application/json")
        except FileNotFoundError:
            return False  # removed since the GET
        except Exception as error:
            if _refused(error):
                return False  # replaced since the GET
            raise
        finally:
            fs.invalidate_cache(path)
        return True
    except Exception as error:
        if isinstance(error, DiffColorError) or not storage._is_backend_error(error):
            raise
        raise storage.backend_error(uri, "writing", error, fs) from error


def _remove_if_owner(uri: str, owner: str | None) -> bool:
    """Removes the lease object at ``uri`` only while it names ``owner`` (None: while it names none, an
    unreadable object); False when it is gone or another's. Atomic as :func:`_replace_if_owner`; on
    local disk the lock folder goes too when this leaves it empty.
    """
    fs, path = storage.filesystem(uri)
    try:
        kind = _protocol_of(fs)
        if kind == "local":
            folder = os.path.dirname(path)
            with _local_guard(folder, create=False) as present:
                if not present:
                    return False
                held = _read_local(path)
                mine = held is not None and _owner_of(held) == owner
                if mine:
                    os.unlink(path)
                try:
                    os.rmdir(folder)  # only when empty; the guard's waiters then use a fresh folder
                except OSError:
                    pass
            return mine
        if kind == "memory":
            with _MEMORY_LOCK:
                if not fs.exists(path) or _owner_of(fs.cat_file(path)) != owner:
                    return False
                fs.rm_file(path)
                return True
        found = _s3_get(fs, path)
        if found is None or _owner_of(found[0]) != owner:
            return False
        bucket, key = path.split("/", 1)
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=found[1])
        except FileNotFoundError:
            return False
        except Exception as error:
            if _refused(error):
                return False
            raise
        finally:
            fs.invalidate_cache(path)
        return True
    except Exception as error:
        if isinstance(error, DiffColorError) or not storage._is_backend_error(error):
            raise
        raise storage.backend_error(uri, "removing", error, fs) from error


class Lease:
    """A held item lease (see the module docstring); :meth:`check` raises once it is lost."""

    def __init__(self, folder: str, generation: int, owner: str, lease_seconds: float):
        self.folder, self.generation, self.owner, self.lease_seconds = folder, generation, owner, lease_seconds
        self.uri = storage.join(folder, _name(generation))
        self.renewed = time.monotonic()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="diffcolor-lease", daemon=True)

    def _expired_locally(self) -> None:
        if self._lost is None and time.monotonic() - self.renewed > LOST_FRACTION * self.lease_seconds:
            self._lost = f"not renewed for {time.monotonic() - self.renewed:.0f} s"

    def check(self, *_) -> None:
        """Raises LeaseLostError when the lease is lost; cheap, called at every step (also as a progress callback)."""
        self._expired_locally()
        if self._lost is not None:
            raise LeaseLostError(f"lease '{redact(self.uri)}' lost: {self._lost}; the item's work stops")

    def renew(self) -> None:
        """Rewrites this worker's own lease object with a new expiry; marks the lease lost when it was taken
        over, its object is gone or is another worker's, or its last renewal is older than a lease (then
        nothing is written).
        """
        if self._lost is None and time.monotonic() - self.renewed > self.lease_seconds:
            self._lost = f"not renewed for {time.monotonic() - self.renewed:.0f} s, past its lease"
        if self._lost is not None:
            return  # lost, or expired: another worker may hold the lease now
        names = _generations(self.folder)
        if self.generation not in names:
            self._lost = "its lease object is gone (taken over and cleaned up)"
        elif max(names) > self.generation:
            self._lost = f"generation {max(names)} took over"
        elif _replace_if_owner(self.uri, self.owner, _content(self.owner, self.generation, self.lease_seconds)):
            self.renewed = time.monotonic()
        else:
            self._lost = "its lease object is another worker's now (taken over)"

    def beat(self) -> None:
        """One heartbeat: :meth:`renew`, a store failure left to :meth:`check` (lost once the last renewal is too old)."""
        try:
            self.renew()
        except DiffColorError:
            pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            self.beat()
            if self._lost is not None:
                return

    def stop_heartbeat(self) -> None:
        """Stops renewing; the lease object stays and expires after a lease (what a killed worker leaves)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def release(self) -> None:
        """Stops the heartbeat and removes this worker's own lease object, never another's (an object at the
        same name that another worker created since is left alone), and the lock folder when that leaves
        it empty (local disks)."""
        self.stop_heartbeat()
        _remove_if_owner(self.uri, self.owner)


def _name(generation: int) -> str:
    return f"lease-{generation:08d}.json"


def _generations(folder: str) -> list[int]:
    names = (uri.rsplit("/", 1)[-1] for uri in storage.list_files(folder))
    return sorted(int(match.group(1)) for match in map(_NAME.match, names) if match)


def _content(owner: str, generation: int, lease_seconds: float) -> bytes:
    return json.dumps({"owner": owner, "generation": generation, "host": socket.gethostname(), "pid": os.getpid(),
                       "expires": time.time() + lease_seconds}).encode()


def _judge(uri: str, lease_seconds: float) -> tuple[bool | None, str | None]:
    """Whether the lease at ``uri`` may be taken over (expired, its holder on this host has exited, or
    unreadable for longer than a lease), and the owner it names (None: none readable).

    (None, None) when the object is gone (released meanwhile).
    """
    try:
        data = storage.read_bytes(uri)
    except MissingObjectError:
        return None, None
    owner = _owner_of(data)
    try:
        held = json.loads(data)
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
            return True, owner  # its holder ran on this host and has exited: no need to wait out its lease
        return float(held["expires"]) < time.time(), owner
    except (ValueError, KeyError, TypeError, AttributeError):  # empty, truncated or foreign content: judge by its age
        try:
            modified = storage.modified_time(uri)
        except MissingObjectError:
            return None, None
        return modified is None or time.time() - modified > lease_seconds, owner


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
            timeout_seconds: float | None = None, heartbeat: bool = True) -> Lease:
    """Takes the lease of the item under ``prefix`` and starts its heartbeat (``heartbeat=False``: the
    caller calls :meth:`Lease.beat` itself, often enough).

    Waits while another live worker holds it. Raises TimeoutError after
    ``timeout_seconds`` (None: wait as long as it takes).
    """
    folder = lock_folder(prefix)
    owner = uuid.uuid4().hex
    started = time.monotonic()
    while True:
        generations = _generations(folder)
        current = max(generations, default=0)
        dead, held_by = (True, None) if not current else _judge(storage.join(folder, _name(current)), lease_seconds)
        if dead is None:
            continue  # released between the listing and the read: look again
        if dead:
            # Owners of what the new generation supersedes, read before it exists: afterwards each is removed
            # only while it is still that object (never a lease created since under a reused name).
            superseded = {generation: _owner_at(storage.join(folder, _name(generation)))
                          for generation in generations if generation != current}
            if current:
                superseded[current] = held_by
            mine = storage.join(folder, _name(current + 1))
            if _create_exclusive(mine, _content(owner, current + 1, lease_seconds)):
                if max(_generations(folder), default=0) > current + 1:  # this view was stale: a newer lease exists
                    _remove_if_owner(mine, owner)
                else:
                    for generation, their_owner in superseded.items():
                        _remove_if_owner(storage.join(folder, _name(generation)), their_owner)
                    lease = Lease(folder, current + 1, owner, lease_seconds)
                    if heartbeat:
                        lease._thread.start()
                    return lease
        if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
            raise TimeoutError(f"item lease '{redact(folder)}' still held after {timeout_seconds} s")
        time.sleep(poll_seconds)


def _owner_at(uri: str) -> str | None:
    try:
        return _owner_of(storage.read_bytes(uri))
    except MissingObjectError:
        return None


@contextmanager
def item_lease(prefix: str, *, lease_seconds: float = LEASE_SECONDS, poll_seconds: float = 0.5,
               timeout_seconds: float | None = None) -> Iterator[Lease]:
    """Holds the lease of the item under ``prefix`` for the duration of the block (see :func:`acquire`)."""
    lease = acquire(prefix, lease_seconds=lease_seconds, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds)
    try:
        yield lease
    finally:
        lease.release()
