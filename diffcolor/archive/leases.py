"""Item leases: one worker at a time works on an item, across runs and machines.

Two runs on one output (a nightly run and a curator's rerun, say) may reach the
same item at once. Before an item's work, a worker takes the item's lease, a
small ``lock.json`` object created only if absent:

- local disk: ``open(O_CREAT | O_EXCL)``, atomic on POSIX filesystems;
- S3: ``PutObject`` with ``If-None-Match: *`` (conditional write);
- ``memory://``: a check-and-set under a process lock (tests).

A held lease makes the other worker wait; once the lease is released it finds
the item's record and skips the work. A lease carries an expiry, renewed by a
heartbeat while the work goes on, so a lease of a killed worker is broken once
it has expired instead of blocking the item for ever.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from diffcolor.archive import storage
from diffcolor.common.errors import StorageError

LEASE_SECONDS = 120.0  # ours: a lease not renewed for this long belongs to a dead worker
_MEMORY_LOCK = threading.Lock()


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Creates the object at ``uri`` only if it does not exist; True when this call created it."""
    fs, path = storage.filesystem(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
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
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as error:  # botocore wraps 412 Precondition Failed in several classes
            text = str(error)
            if "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text:
                return False
            raise StorageError(f"taking the lease '{uri}' failed: {type(error).__name__}") from None
        fs.invalidate_cache(path)
        return True
    raise StorageError(f"leases are not supported on '{uri}' (protocols {protocols}); use local disk, S3 or memory")


def _lease(owner: str, seconds: float) -> bytes:
    return json.dumps({"owner": owner, "host": socket.gethostname(), "expires": time.time() + seconds}).encode()


@contextmanager
def item_lease(prefix: str, *, lease_seconds: float = LEASE_SECONDS, poll_seconds: float = 0.5,
               timeout_seconds: float | None = None) -> Iterator[str]:
    """Holds the lease of the item under ``prefix`` for the duration of the block.

    Waits while another live worker holds it; breaks a lease that expired.
    Raises TimeoutError after ``timeout_seconds`` (None: wait as long as it takes).
    """
    uri = storage.join(prefix, "lock.json")
    owner = uuid.uuid4().hex
    started = time.monotonic()
    while not _create_exclusive(uri, _lease(owner, lease_seconds)):
        try:
            held = storage.read_json(uri)
        except Exception:  # released (or half-visible) between our two calls: try again
            held = None
        if held is not None and held.get("expires", 0) < time.time():
            storage.remove(uri)  # the holder stopped renewing: it is gone
            continue
        if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
            raise TimeoutError(f"item lease '{uri}' still held after {timeout_seconds} s")
        time.sleep(poll_seconds)

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(lease_seconds / 3):
            storage.write_bytes(uri, _lease(owner, lease_seconds))

    renewer = threading.Thread(target=heartbeat, name="diffcolor-lease", daemon=True)
    renewer.start()
    try:
        yield owner
    finally:
        stop.set()
        renewer.join()
        storage.remove(uri)
