"""Item leases hold on local disk, memory and a real S3 API: one holder, conditional takeover, owner-only release."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from diffcolor.archive import leases, storage
from diffcolor.archive.leases import LeaseLostError, acquire, item_lease
from diffcolor.common.errors import StorageError


@pytest.fixture(params=["local", "memory", "s3"])
def item(request, tmp_path):
    """An item prefix on each store the product supports."""
    if request.param == "local":
        return str(tmp_path / "items" / "plate-1")
    if request.param == "memory":
        return f"memory://leases-{os.getpid()}-{time.monotonic_ns()}/items/plate-1"
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/items/plate-1"


def _lease_files(prefix: str) -> list[str]:
    return [uri.rsplit("/", 1)[-1] for uri in storage.list_files(storage.join(prefix, "lock"))]


def test_a_held_lease_makes_the_second_worker_wait_then_it_gets_it(item):
    first = acquire(item, lease_seconds=30)
    with pytest.raises(TimeoutError, match="still held"):
        acquire(item, lease_seconds=30, poll_seconds=0.05, timeout_seconds=0.3)
    first.release()
    second = acquire(item, lease_seconds=30, timeout_seconds=5)
    assert _lease_files(item) == ["lease-00000001.json"]  # released and taken afresh
    second.release()
    assert _lease_files(item) == []


def test_only_one_of_many_racing_workers_holds_the_lease_at_a_time(item):
    holders, overlaps, lock = [0], [], threading.Lock()

    def work():
        with item_lease(item, lease_seconds=30, poll_seconds=0.01, timeout_seconds=60):
            with lock:
                holders[0] += 1
                overlaps.append(holders[0])
            time.sleep(0.05)
            with lock:
                holders[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(overlaps) == 6 and max(overlaps) == 1
    assert _lease_files(item) == []


def test_an_expired_lease_of_a_dead_worker_is_taken_over_with_the_next_generation(item):
    dead = storage.join(item, "lock", "lease-00000001.json")
    storage.write_bytes(dead, json.dumps({"owner": "dead", "expires": time.time() - 1}).encode())
    lease = acquire(item, lease_seconds=30, timeout_seconds=5)
    assert lease.generation == 2 and _lease_files(item) == ["lease-00000002.json"]  # the dead one is cleaned up
    lease.release()


def test_a_live_lease_is_never_taken_over(item):
    storage.write_bytes(storage.join(item, "lock", "lease-00000001.json"),
                        json.dumps({"owner": "alive", "expires": time.time() + 60}).encode())
    with pytest.raises(TimeoutError):
        acquire(item, lease_seconds=30, poll_seconds=0.05, timeout_seconds=0.3)
    assert _lease_files(item) == ["lease-00000001.json"]


def test_an_empty_lease_file_blocks_for_at_most_one_lease(item):
    storage.write_bytes(storage.join(item, "lock", "lease-00000001.json"), b"")  # a full disk left it empty
    with pytest.raises(TimeoutError):  # young: it may be a lease being written
        acquire(item, lease_seconds=30, poll_seconds=0.05, timeout_seconds=0.3)
    lease = acquire(item, lease_seconds=1.0, poll_seconds=0.1, timeout_seconds=10)  # older than a lease: taken over
    assert lease.generation == 2
    lease.release()


def test_a_taken_over_holder_stops_and_releases_only_its_own_object(item):
    holder = acquire(item, lease_seconds=30)
    # Another worker decided the holder was dead (say, a clock far ahead) and took generation 2.
    storage.write_bytes(storage.join(item, "lock", "lease-00000002.json"),
                        json.dumps({"owner": "other", "expires": time.time() + 60}).encode())
    holder.renew()
    with pytest.raises(LeaseLostError, match="generation 2 took over"):
        holder.check()
    holder.release()
    assert _lease_files(item) == ["lease-00000002.json"]  # the other worker's lease is untouched


def test_a_holder_whose_heartbeat_fails_stops_before_anyone_may_take_over(item):
    lease = acquire(item, lease_seconds=0.6)
    real_write = storage.write_bytes

    def failing_write(uri, data):
        if "/lock/" in uri:
            raise StorageError(f"writing '{uri}' failed: 503 Slow Down (injected)")
        return real_write(uri, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "write_bytes", failing_write)
        lease.check()  # fine right after acquiring
        time.sleep(0.6 * leases.LOST_FRACTION + 0.1)
        with pytest.raises(LeaseLostError, match="not renewed"):
            lease.check()  # lost at two thirds of a lease: a third before the lease expires for others
    lease.release()


def test_a_suspended_holder_finds_its_lease_gone_and_stops(item):
    holder = acquire(item, lease_seconds=30)
    storage.remove(holder.uri)  # taken over and cleaned up while this process was stopped
    holder.renew()
    with pytest.raises(LeaseLostError, match="gone"):
        holder.check()
    holder.release()


def test_a_heartbeat_that_fails_once_keeps_renewing(tmp_path):
    lease = acquire(str(tmp_path / "item"), lease_seconds=0.6)
    real_write, failures = storage.write_bytes, []

    def flaky_write(uri, data):
        if "/lock/" in uri and not failures:
            failures.append(uri)
            raise StorageError(f"writing '{uri}' failed: connection reset (injected once)")
        return real_write(uri, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "write_bytes", flaky_write)
        time.sleep(1.5)  # several heartbeats: the first fails, the next ones renew
        assert failures
        lease.check()
    lease.release()


def test_the_lease_of_a_process_that_exited_on_this_host_is_taken_over_at_once(item):
    import socket
    import subprocess
    import sys

    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage.write_bytes(storage.join(item, "lock", "lease-00000001.json"), json.dumps(
        {"owner": "killed", "host": socket.gethostname(), "pid": int(exited.stdout), "expires": time.time() + 60}).encode())
    lease = acquire(item, lease_seconds=30, timeout_seconds=2)
    assert lease.generation == 2
    lease.release()
    # The same lease, held by a live process of this host, is respected.
    storage.write_bytes(storage.join(item, "lock", "lease-00000001.json"), json.dumps(
        {"owner": "alive", "host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + 60}).encode())
    with pytest.raises(TimeoutError):
        acquire(item, lease_seconds=30, poll_seconds=0.05, timeout_seconds=0.3)
