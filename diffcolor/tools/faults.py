"""Fault injection at every storage operation of one item, and the archive's invariants checked after each.

    python -m diffcolor.tools.faults                 # local disk and a moto S3 server on loopback
    python -m diffcolor.tools.faults --stores local  # local disk only (no test extra needed)

One smoke item (tiny bundle, CPU; a target prompt and a colour map, so two
versions) is run the way a pool worker runs it: under its lease, checking the
lease at every step. The harness first runs it once while recording every
storage operation (read, write, exists, list, remove, stat), so the list of
operations is the pipeline's own and a new write is covered without editing
anything. Then, for every operation ``k`` and every fault mode, it runs the
item on a fresh output, injects the fault at ``k``, runs the item again (the
retry) and checks:

- **nothing partial is visible**: after the fault and after the retry, every
  object under the item reads whole (JSON parses, images decode, colour states
  and checkpoints have their header);
- **no duplicate version**: one version record per target, their keys unique;
- **the current version is readable**: ``result.json`` is done and names a
  version record that exists;
- **outputs match their records**: the sha256 of every output equals the
  record's, and equals the uninterrupted reference run's (a retried item ends
  bit-identical on the CPU);
- **the original is unchanged**: the source's bytes are the same;
- **no orphaned lease**: no lease object is left after the retry.

Fault modes: ``error-before`` (the operation fails as a store fails, a
transient StorageError, without happening), ``error-after`` (it happens, then
the answer is lost: a PUT committed whose response never came), and ``kill``
(the process dies before the operation: nothing after it runs, the lease is
left behind to expire). The retry comes once any lease left behind has
expired: the harness moves the leases' clock a lease ahead for it. (Taking a
lease's first generation is one conditional create outside this list; the
lease tests fault it.)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from diffcolor.archive import leases, storage
from diffcolor.archive.items import ItemLayout
from diffcolor.common.errors import DiffColorError, StorageError
from diffcolor.common.items import ItemRequest
from diffcolor.common.tensorfiles import read_header

OPERATIONS = ("read_bytes", "write_bytes", "exists", "list_files", "remove", "modified_time")
MODES = ("error-before", "error-after", "kill")
CAPTION = "a dog sitting on a wooden bench"


class SimulatedKill(BaseException):
    """The worker process died here: not an Exception, so no handler of the pipeline records or cleans anything."""


@dataclass
class Injection:
    """Where the next fault goes: the ``at``-th storage operation (1-based) gets ``mode``; 0: record only."""

    at: int = 0
    mode: str = "error-before"
    seen: list[str] = field(default_factory=list)  # "write_bytes …/versions/v0001.json", in order
    fired: bool = False


@contextmanager
def injected(injection: Injection) -> Iterator[Injection]:
    """Every storage operation, counted (and the chosen one failed) while the block runs."""
    originals = {name: getattr(storage, name) for name in OPERATIONS}

    def wrap(name: str, original: Callable) -> Callable:
        def operation(uri, *args, **kwargs):
            injection.seen.append(f"{name} {_relative(uri)}")
            if len(injection.seen) != injection.at or injection.fired:
                return original(uri, *args, **kwargs)
            injection.fired = True
            if injection.mode == "kill":
                raise SimulatedKill(f"killed before {name} {uri}")
            if injection.mode == "error-before":
                raise StorageError(f"{name} '{uri}' failed: 503 Slow Down (injected before)")
            original(uri, *args, **kwargs)
            raise StorageError(f"{name} '{uri}' failed: connection reset (injected after it happened)")

        return operation

    for name, original in originals.items():
        setattr(storage, name, wrap(name, original))
    try:
        yield injection
    finally:
        for name, original in originals.items():
            setattr(storage, name, original)


def _relative(uri: str) -> str:
    """The end of a URI that says which object it is (``checkpoints/stage1/step-00000002.safetensors``)."""
    return "/".join(str(uri).split("/")[-3:])


@contextmanager
def _clock_ahead(seconds: float) -> Iterator[None]:
    """The leases' wall clock moved ``seconds`` ahead: what waiting out a dead worker's lease would do."""
    real = leases.time.time
    leases.time.time = lambda: real() + seconds
    try:
        yield
    finally:
        leases.time.time = real


def run_item(models, request: ItemRequest, prefix: str, config) -> list[dict] | None:
    """The item as a pool worker runs it: under its lease, the lease checked at every step.

    Returns its records; None when a fault stopped it (an item error, a failed lease operation, or a
    simulated kill, which leaves the lease behind as a dead worker would).
    """
    from diffcolor.pipeline import colorize_item

    try:
        lease = leases.acquire(prefix, timeout_seconds=30)
    except (DiffColorError, SimulatedKill):
        return None
    records = None
    try:
        records = colorize_item(models, request, prefix, config, progress=lease.check)
    except SimulatedKill:
        lease.stop_heartbeat()
        return None
    except DiffColorError:
        pass
    try:
        lease.release()
    except (DiffColorError, SimulatedKill):  # the lease is left behind, to expire like a dead worker's
        lease.stop_heartbeat()
    return records


def visible_objects_whole(prefix: str) -> list[str]:
    """The objects under ``prefix`` that do not read whole (empty when every one does)."""
    from PIL import Image

    broken = []
    for uri in _walk(prefix):
        data = storage.read_bytes(uri)
        try:
            if uri.endswith(".json"):
                json.loads(data)
            elif uri.endswith(".safetensors"):
                read_header(data)
            elif uri.endswith((".tif", ".jpg", ".png", ".webp")):
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
        except Exception as error:  # anything that does not parse is a partial or damaged object
            broken.append(f"{_relative(uri)}: {type(error).__name__}")
    return broken


def _walk(prefix: str) -> list[str]:
    found = list(storage.list_files(prefix))
    fs, path = storage.filesystem(prefix)
    try:
        folders = [entry["name"] for entry in fs.ls(path, detail=True) if entry.get("type") == "directory"]
    except FileNotFoundError:
        folders = []
    for folder in folders:
        found += _walk(storage.join(prefix, folder.rstrip("/").rsplit("/", 1)[-1]))
    return found


def check_invariants(prefix: str, reference: dict, versions: int, source_uri: str, source_sha: str) -> list[str]:
    """Every invariant of the module docstring that does not hold for the item under ``prefix`` (empty: all hold)."""
    problems = [f"partial object visible: {item}" for item in visible_objects_whole(prefix)]
    layout = ItemLayout(prefix)
    records = [storage.read_json(uri) for uri in layout.version_records()]
    keys = [record.get("version_key") for record in records]
    if len(records) != versions or len(set(keys)) != len(keys):
        problems.append(f"duplicate or missing versions: {len(records)} records, keys {keys}")
    current = storage.read_json(layout.result) if storage.exists(layout.result) else {}
    if current.get("status") != "done" or not storage.exists(layout.record(current.get("version") or 0)):
        problems.append(f"current version not readable: result.json is {current.get('status')!r}")
    for record in records:
        for role, output in record["outputs"].items():
            if hashlib.sha256(storage.read_bytes(output)).hexdigest() != record["output_sha256"][role]:
                problems.append(f"v{record['version']} {role} does not match its record")
        expected = reference.get(record.get("version_key"), {})
        if {k: v for k, v in record["output_sha256"].items() if k != "state"} != expected:
            problems.append(f"v{record['version']} differs from the uninterrupted run")
    if hashlib.sha256(storage.read_bytes(source_uri)).hexdigest() != source_sha:
        problems.append("the original changed")
    if storage.list_files(storage.join(prefix, "lock")):
        problems.append("a lease object was left behind")
    return problems


@dataclass
class Outcome:
    """One injected fault and what was found."""

    store: str
    mode: str
    at: int
    operation: str
    problems: list[str]


def run_harness(models, root: str, *, store: str, modes=MODES, only: Callable[[int], bool] = lambda k: True,
                on_outcome: Callable[[Outcome], None] | None = None) -> tuple[list[str], list[Outcome]]:
    """Enumerates one item's storage operations under ``root``, then faults each (see the module docstring).

    Returns the enumerated operations and one outcome per (mode, operation) tried (``only(k)`` chooses
    which operations are tried; all by default).
    """
    from dataclasses import replace

    from PIL import Image

    from diffcolor.method.presets import get_preset
    from diffcolor.tools.identical import write_inputs

    smoke = get_preset("smoke")
    config = replace(smoke, stage2=replace(smoke.stage2, finetune_steps=4))
    with tempfile.TemporaryDirectory() as folder:
        with Image.open(write_inputs(Path(folder))["gray8"]) as picture:  # a small scan keeps each run short
            buffer = io.BytesIO()
            picture.resize((96, 72), Image.Resampling.LANCZOS).save(buffer, format="PNG")
        source_bytes = buffer.getvalue()
    source_uri = storage.join(root, "sources", "plate.png")
    storage.write_bytes(source_uri, source_bytes)
    source_sha = hashlib.sha256(source_bytes).hexdigest()
    request = ItemRequest(item_id="plate", source_uri=source_uri, caption=CAPTION, targets=("a brown dog on a bench",),
                          color_map={"bench": "black"}, seed=5)

    # 1. The uninterrupted reference, its storage operations recorded.
    recording = Injection()
    with injected(recording):
        records = run_item(models, request, storage.join(root, "reference"), config)
    reference = {record["version_key"]: {k: v for k, v in record["output_sha256"].items() if k != "state"}
                 for record in records}

    # 2. Each operation, each mode: fault, check, retry, check.
    outcomes = []
    for mode in modes:
        for at in range(1, len(recording.seen) + 1):
            if not only(at):
                continue
            prefix = storage.join(root, f"{mode}-{at:03d}")
            with injected(Injection(at=at, mode=mode)):
                run_item(models, request, prefix, config)
            problems = [f"after the fault: {item}" for item in visible_objects_whole(prefix)]
            with _clock_ahead(leases.LEASE_SECONDS + 1):  # the retry comes once a lease left behind has expired
                run_item(models, request, prefix, config)
            problems += check_invariants(prefix, reference, len(records), source_uri, source_sha)
            outcome = Outcome(store, mode, at, recording.seen[at - 1], problems)
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    return recording.seen, outcomes


def summary_table(operations: dict[str, list[str]], outcomes: list[Outcome]) -> str:
    """The harness's table: per store and mode, operations enumerated, faults injected, invariants held."""
    lines = ["| store | mode | operations | faults injected | invariants held |", "| --- | --- | --- | --- | --- |"]
    for store in operations:
        for mode in dict.fromkeys(o.mode for o in outcomes if o.store == store):
            tried = [o for o in outcomes if o.store == store and o.mode == mode]
            held = sum(1 for o in tried if not o.problems)
            lines.append(f"| {store} | {mode} | {len(operations[store])} | {len(tried)} | {held}/{len(tried)} |")
    return "\n".join(lines)


@contextmanager
def _moto_bucket() -> Iterator[str]:
    """A bucket on a moto S3 server on loopback, the environment pointed at it (needs the test extra)."""
    import logging
    import os

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = dict(os.environ)
    os.environ.update(AWS_ACCESS_KEY_ID="FAKEFAULTSKEY", AWS_SECRET_ACCESS_KEY="fake-faults-secret",
                      AWS_DEFAULT_REGION="us-east-1", DIFFCOLOR_S3_ENDPOINT_URL=f"http://{host}:{port}",
                      NO_PROXY="127.0.0.1,localhost")
    try:
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="diffcolor-faults")
        s3fs.S3FileSystem.clear_instance_cache()
        yield "s3://diffcolor-faults"
    finally:
        os.environ.clear()
        os.environ.update(saved)
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffcolor.tools.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="local,s3", help="comma-separated: local, s3 (moto on loopback)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args(argv)

    from diffcolor.tools.tiny import load_named_models

    models = load_named_models("tiny", device="cpu")
    operations, outcomes = {}, []

    def show(outcome: Outcome) -> None:
        verdict = "ok" if not outcome.problems else "FAILED: " + "; ".join(outcome.problems)
        print(f"{outcome.store:5} {outcome.mode:12} op {outcome.at:3} {outcome.operation:60.60} {verdict}", flush=True)

    started = time.monotonic()
    for store in args.stores.split(","):
        with tempfile.TemporaryDirectory(prefix="diffcolor-faults-") as folder:
            context = _moto_bucket() if store == "s3" else _local(folder)
            with context as root:
                operations[store], found = run_harness(models, root, store=store, modes=args.modes.split(","),
                                                       on_outcome=show)
                outcomes += found
    print(f"\n{summary_table(operations, outcomes)}\n\n{len(outcomes)} faults in {time.monotonic() - started:.0f} s")
    return 0 if all(not outcome.problems for outcome in outcomes) else 1


@contextmanager
def _local(folder: str) -> Iterator[str]:
    yield folder


if __name__ == "__main__":
    sys.exit(main())
