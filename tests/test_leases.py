"""Item leases hold on local disk, memory and a real S3 API: one holder, conditional takeover, owner-only release."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

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

    def failing_write(uri, owner, data):
        raise StorageError(f"writing '{uri}' failed: 503 Slow Down (injected)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(leases, "_replace_if_owner", failing_write)
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
    real_write, failures = leases._replace_if_owner, []

    def flaky_write(uri, owner, data):
        if not failures:
            failures.append(uri)
            raise StorageError(f"writing '{uri}' failed: connection reset (injected once)")
        return real_write(uri, owner, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(leases, "_replace_if_owner", flaky_write)
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


@contextmanager
def _clock_ahead(seconds: float):
    """This process's wall clock ``seconds`` ahead: how a worker on a host whose clock runs ahead sees leases."""
    real = time.time
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(leases.time, "time", lambda: real() + seconds)
        yield


def test_a_stalled_holder_whose_generation_was_reused_renews_and_releases_nothing_of_the_new_holder(item):
    stalled = acquire(item, lease_seconds=30, heartbeat=False)
    assert stalled.generation == 1
    with _clock_ahead(31):  # its lease expired while it stalled: another worker takes over, then releases
        taker = acquire(item, lease_seconds=30, timeout_seconds=5, heartbeat=False)
    assert taker.generation == 2 and _lease_files(item) == ["lease-00000002.json"]
    taker.release()  # the lock folder is empty: generation numbers start again
    newest = acquire(item, lease_seconds=30, timeout_seconds=5, heartbeat=False)
    assert newest.uri == stalled.uri  # the stalled holder's object name, now the new holder's lease
    held = storage.read_bytes(newest.uri)

    stalled.renew()  # the stalled holder wakes up within what it believes is its lease
    with pytest.raises(LeaseLostError, match="another worker's"):
        stalled.check()
    assert storage.read_bytes(newest.uri) == held  # not rewritten
    stalled.release()
    assert storage.read_bytes(newest.uri) == held  # not removed

    newest.renew()
    newest.check()  # still the holder, and its renewals still work
    assert json.loads(storage.read_bytes(newest.uri))["owner"] == newest.owner
    with pytest.raises(TimeoutError):
        acquire(item, lease_seconds=30, poll_seconds=0.05, timeout_seconds=0.3)
    newest.release()
    assert _lease_files(item) == []


def test_a_holder_stalled_past_its_lease_writes_nothing_on_waking(item):
    holder = acquire(item, lease_seconds=30, heartbeat=False)
    held = storage.read_bytes(holder.uri)
    holder.renewed -= 31  # suspended for longer than its lease: another worker may hold it now
    holder.renew()
    with pytest.raises(LeaseLostError, match="not renewed"):
        holder.check()
    assert storage.read_bytes(holder.uri) == held
    holder.release()  # its own object: removed
    assert _lease_files(item) == []


def test_a_stale_acquirer_that_creates_a_superseded_generation_backs_off(item):
    # A worker judged generation 1 dead, stalled, and creates generation 2 after others reached generation 3.
    storage.write_bytes(storage.join(item, "lock", "lease-00000003.json"), json.dumps(
        {"owner": "current", "expires": time.time() + 60}).encode())
    real_generations, real_judge = leases._generations, leases._judge
    views, verdicts = iter([[1]]), iter([(True, "dead")])  # its stale view, once; then what the store says
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(leases, "_generations", lambda folder: next(views, None) or real_generations(folder))
        patch.setattr(leases, "_judge", lambda uri, seconds: next(verdicts, None) or real_judge(uri, seconds))
        with pytest.raises(TimeoutError):
            acquire(item, lease_seconds=30, poll_seconds=0.05, timeout_seconds=0.2)
    assert _lease_files(item) == ["lease-00000003.json"]  # its own generation 2 removed, the holder's untouched


_RACER = """
import os, sys, time
from diffcolor.archive.leases import item_lease
item, markers, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(os.path.join(markers, f"ready-{os.getpid()}"), "w").close()
while not os.path.exists(os.path.join(markers, "go")):
    time.sleep(0.01)
for _ in range(rounds):
    with item_lease(item, lease_seconds=30, poll_seconds=0.02, timeout_seconds=120):
        os.close(os.open(os.path.join(markers, "holding"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # fails on overlap
        with open(os.path.join(markers, "log"), "a") as log:
            log.write(f"{os.getpid()}\\n")
        time.sleep(0.02)
        os.unlink(os.path.join(markers, "holding"))
"""


@pytest.mark.parametrize("store", ["local", "s3"])
def test_racing_worker_processes_hold_the_lease_one_at_a_time(store, tmp_path, request):
    item = str(tmp_path / "items" / "plate-1") if store == "local" else f"{request.getfixturevalue('s3_bucket')}/items/p"
    markers, processes, rounds = tmp_path / "markers", 4, 4
    markers.mkdir()
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, item, str(markers), str(rounds)],
                               stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    deadline = time.monotonic() + 120
    while len(list(markers.glob("ready-*"))) < processes and time.monotonic() < deadline:
        time.sleep(0.05)
    (markers / "go").touch()  # all start at once
    errors = [racer.communicate(timeout=180)[1] for racer in racers]
    assert [racer.returncode for racer in racers] == [0] * processes, "\n".join(errors)
    assert len((markers / "log").read_text().split()) == processes * rounds
    assert _lease_files(item) == []
