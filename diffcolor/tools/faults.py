"""Fault injection at every storage operation of one item, and the archive's invariants checked after each.

    python -m diffcolor.tools.faults                 # local disk and a moto S3 server on loopback
    python -m diffcolor.tools.faults --stores local  # local disk only (no test extra needed)
    python -m diffcolor.tools.faults --markdown docs/RELIABILITY.md  # the whole matrix, its table written there
    python -m diffcolor.tools.faults --check docs/RELIABILITY.md     # the table's operations still the code's?

One smoke item (tiny bundle, CPU; a target prompt and a colour map, so two
versions) is run the way a pool worker runs it: under its lease, checking the
lease at every step. The harness first runs it once while recording every
storage operation (read, write, exists, list, remove, stat, and the lease's
conditional create, rewrite and removal), so the list of operations is the
pipeline's own and a new write is covered without editing anything. Then, for
every operation ``k`` and every fault mode, it runs the item on a fresh
output, injects the fault at ``k``, runs the item again (the retry) and checks:

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

Operations come in two groups, each faulted on its own: ``item`` (everything
the worker does, its lease's acquisition and release included) and
``heartbeat`` (one renewal of the lease). The harness beats the heartbeat
itself, once, at the item's first step, instead of on a timer, so both lists
are the same on every run, whatever the machine's speed.

Fault modes: ``error-before`` (the operation fails as a store fails, a
transient StorageError, without happening), ``error-after`` (it happens, then
the answer is lost: a PUT committed whose response never came), and ``kill``
(the process dies before the operation: nothing after it runs, the lease is
left behind to expire). The retry comes once any lease left behind has
expired: the harness moves the leases' clock a lease ahead for it.

The matrix's table (operations and faults per store, group and mode) lives in
``docs/RELIABILITY.md`` between two markers: ``--markdown FILE`` writes it
there and ``--check FILE`` fails when it is no longer the code's (each runs one
uninterrupted item per store, no faults). A full run prints the same table
with the invariants held, and exits 1 when any did not hold.
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
from diffcolor.archive.layout import ItemLayout
from diffcolor.common.errors import DiffColorError, StorageError
from diffcolor.common.items import ItemRequest
from diffcolor.common.tensorfiles import read_header

OPERATIONS = ("read_bytes", "write_bytes", "publish_file", "exists", "list_files", "remove", "modified_time")
LEASE_OPERATIONS = ("_create_exclusive", "_replace_if_owner", "_remove_if_owner")  # the leases' conditional writes
MODES = ("error-before", "error-after", "kill")
GROUPS = ("item", "heartbeat")
CAPTION = "a dog sitting on a wooden bench"
# The harness's lease: far longer than any run of the item, however slow the machine, so that no run loses
# it between its one heartbeat and its end (which would change the operations); retries move the clock past it.
LEASE_SECONDS = 24 * 3600.0
BEGIN, END = "<!-- fault-table:begin -->", "<!-- fault-table:end -->"


class SimulatedKill(BaseException):
    """The worker process died here: not an Exception, so no handler of the pipeline records or cleans anything."""


@dataclass
class Injection:
    """Where the next fault goes: the ``at``-th storage operation (1-based) of ``group`` gets ``mode``; 0: record only."""

    at: int = 0
    mode: str = "error-before"
    group: str = "item"
    seen: dict[str, list[str]] = field(default_factory=lambda: {group: [] for group in GROUPS})  # in order
    fired: bool = False
    current: str = "item"  # the group of the operations running now
    _depth: int = 0

    @contextmanager
    def grouped(self, group: str) -> Iterator[None]:
        """The operations of the block belong to ``group``."""
        outer, self.current = self.current, group
        try:
            yield
        finally:
            self.current = outer


@contextmanager
def injected(injection: Injection) -> Iterator[Injection]:
    """Every storage operation, counted (and the chosen one failed) while the block runs."""
    targets = [(storage, name) for name in OPERATIONS] + [(leases, name) for name in LEASE_OPERATIONS]
    originals = {(module, name): getattr(module, name) for module, name in targets}

    def wrap(name: str, original: Callable) -> Callable:
        label = name.lstrip("_")

        def operation(uri, *args, **kwargs):
            if injection._depth:  # inside a counted operation: part of it
                return original(uri, *args, **kwargs)
            seen = injection.seen[injection.current]
            seen.append(f"{label} {_relative(uri)}")
            injection._depth += 1
            try:
                if injection.current != injection.group or len(seen) != injection.at or injection.fired:
                    return original(uri, *args, **kwargs)
                injection.fired = True
                if injection.mode == "kill":
                    raise SimulatedKill(f"killed before {label} {uri}")
                if injection.mode == "error-before":
                    raise StorageError(f"{label} '{uri}' failed: 503 Slow Down (injected before)")
                original(uri, *args, **kwargs)
                raise StorageError(f"{label} '{uri}' failed: connection reset (injected after it happened)")
            finally:
                injection._depth -= 1

        return operation

    for (module, name), original in originals.items():
        setattr(module, name, wrap(name, original))
    try:
        yield injection
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)


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


def run_item(models, request: ItemRequest, prefix: str, config, injection: Injection | None = None) -> list[dict] | None:
    """The item as a pool worker runs it: under its lease, the lease checked at every step.

    The heartbeat beats once, at the first step (its operations counted as the ``heartbeat`` group of
    ``injection``). Returns its records; None when a fault stopped it (an item error, a failed lease
    operation, or a simulated kill, which leaves the lease behind as a dead worker would).
    """
    from diffcolor.pipeline import colorize_item

    injection = injection or Injection()
    try:
        lease = leases.acquire(prefix, lease_seconds=LEASE_SECONDS, timeout_seconds=30, heartbeat=False)
    except (DiffColorError, SimulatedKill):
        return None
    beats = []

    def progress(*_) -> None:
        if not beats:
            beats.append(1)
            with injection.grouped("heartbeat"):
                lease.beat()
        lease.check()

    records = None
    try:
        records = colorize_item(models, request, prefix, config, progress=progress)
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
    if storage.list_files(layout.lock):
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
    group: str = "item"


def _setup(root: str):
    """The smoke item's configuration, request and source (written under ``root``), and the source's sha256."""
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
    request = ItemRequest(item_id="plate", source_uri=source_uri, caption=CAPTION, targets=("a brown dog on a bench",),
                          color_map={"bench": "black"}, seed=5)
    return config, request, source_uri, hashlib.sha256(source_bytes).hexdigest()


def record_operations(models, root: str) -> tuple[dict[str, list[str]], list[dict]]:
    """One uninterrupted run of the smoke item under ``root``: its operations by group, and its records."""
    config, request, _, _ = _setup(root)
    recording = Injection()
    with injected(recording):
        records = run_item(models, request, storage.join(root, "reference"), config, recording)
    if not records or any(record.get("status") != "done" for record in records):
        raise RuntimeError(f"the uninterrupted run of the smoke item did not finish: {records!r}")
    return recording.seen, records


def run_harness(models, root: str, *, store: str, modes=MODES, groups=GROUPS,
                only: Callable[[int], bool] = lambda k: True, select: Callable[[str, int, str], bool] | None = None,
                on_outcome: Callable[[Outcome], None] | None = None) -> tuple[dict[str, list[str]], list[Outcome]]:
    """Enumerates one item's storage operations under ``root``, then faults each (see the module docstring).

    Returns the enumerated operations by group and one outcome per (group, mode, operation) tried
    (``only(k)``, or ``select(group, k, operation)``, chooses which operations of each group are tried;
    all by default).
    """
    config, request, source_uri, source_sha = _setup(root)

    # 1. The uninterrupted reference, its storage operations recorded.
    seen, records = record_operations(models, root)
    reference = {record["version_key"]: {k: v for k, v in record["output_sha256"].items() if k != "state"}
                 for record in records}

    # 2. Each group, each mode, each operation: fault, check, retry, check.
    outcomes = []
    for group in groups:
        for mode in modes:
            for at in range(1, len(seen[group]) + 1):
                if not (only(at) if select is None else select(group, at, seen[group][at - 1])):
                    continue
                prefix = storage.join(root, f"{group}-{mode}-{at:03d}")
                injection = Injection(at=at, mode=mode, group=group)
                with injected(injection):
                    run_item(models, request, prefix, config, injection)
                problems = [] if injection.fired else ["the fault was not injected (the operations changed)"]
                problems += [f"after the fault: {item}" for item in visible_objects_whole(prefix)]
                with _clock_ahead(LEASE_SECONDS + 1):  # the retry comes once a lease left behind has expired
                    run_item(models, request, prefix, config)
                problems += check_invariants(prefix, reference, len(records), source_uri, source_sha)
                outcome = Outcome(store, mode, at, seen[group][at - 1], problems, group)
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
    return seen, outcomes


HEADER = ["| store | group | mode | operations | faults injected | invariants held |",
          "| --- | --- | --- | --- | --- | --- |"]


def summary_table(operations: dict[str, dict[str, list[str]]], outcomes: list[Outcome]) -> str:
    """The harness's table: per store, group and mode, operations enumerated, faults injected, invariants held."""
    lines = list(HEADER)
    for store in operations:
        for group in GROUPS:
            for mode in dict.fromkeys(o.mode for o in outcomes if o.store == store and o.group == group):
                tried = [o for o in outcomes if o.store == store and o.group == group and o.mode == mode]
                held = sum(1 for o in tried if not o.problems)
                lines.append(f"| {store} | {group} | {mode} | {len(operations[store][group])} | {len(tried)} | "
                             f"{held}/{len(tried)} |")
    return "\n".join(lines)


def expected_rows(operations: dict[str, dict[str, list[str]]], modes=MODES) -> list[tuple[str, ...]]:
    """The whole matrix's plan: store, group, mode, operations, faults injected (all deterministic)."""
    return [(store, group, mode, str(len(operations[store][group])), str(len(operations[store][group])))
            for store in operations for group in GROUPS for mode in modes]


def doc_table(operations: dict[str, dict[str, list[str]]]) -> str:
    """The documented table: :func:`expected_rows` as Markdown."""
    lines = ["| store | group | mode | operations | faults injected |", "| --- | --- | --- | --- | --- |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in expected_rows(operations)])


def documented_rows(text: str) -> list[tuple[str, ...]] | None:
    """The rows of the table between the markers of ``text``; None when there are no markers."""
    if BEGIN not in text or END not in text:
        return None
    block = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    cells = ([cell.strip() for cell in line.strip().strip("|").split("|")] for line in block.splitlines()
             if line.startswith("|"))
    return [tuple(row) for row in cells if row[0] not in ("store", "---")]


def doc_differences(text: str, operations: dict[str, dict[str, list[str]]]) -> list[str]:
    """How the documented table's rows of the stores in ``operations`` differ from what the code gives (empty: none)."""
    documented = documented_rows(text)
    if documented is None:
        return [f"no fault table between '{BEGIN}' and '{END}'"]
    documented = [row for row in documented if row[0] in operations]  # the stores checked
    expected = expected_rows(operations)
    if documented == expected:
        return []
    differences = [f"documented '{' | '.join(row)}', the code gives '{' | '.join(want)}'"
                   for row, want in zip(documented, expected) if row != want]
    if len(documented) != len(expected):
        differences.append(f"documented {len(documented)} rows, the code gives {len(expected)}")
    return differences


def write_table(text: str, table: str) -> str:
    """``text`` with the table between the markers replaced by ``table``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no '{BEGIN}' ... '{END}' markers to write the table between")
    return f"{text[:text.index(BEGIN) + len(BEGIN)]}\n{table}\n{text[text.index(END):]}"


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
    parser.add_argument("--markdown", metavar="FILE", help="run each store's item once, without faults, and write "
                        f"the matrix's table (operations and faults per store, group, mode) into FILE, between "
                        f"{BEGIN} and {END}")
    parser.add_argument("--check", metavar="FILE", help="run each store's item once, without faults, and fail when "
                        "the table in FILE is not the one --markdown would write")
    args = parser.parse_args(argv)
    stores, modes = args.stores.split(","), args.modes.split(",")
    unknown = sorted(set(stores) - {"local", "s3"}) + sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown store or mode: {', '.join(unknown)}")
    for path in (args.markdown, args.check):
        if path and not Path(path).is_file():
            parser.error(f"'{path}' is not a file")
    if args.markdown and (set(stores) != {"local", "s3"} or modes != list(MODES)):
        parser.error("--markdown writes the whole matrix's table: leave --stores and --modes at their defaults")
    if args.markdown and args.check:
        parser.error("--markdown or --check, not both")

    from diffcolor.method.model_names import load_named_models

    models = load_named_models("tiny", device="cpu")
    operations, outcomes = {}, []

    if args.check or args.markdown:
        for store in stores:
            with tempfile.TemporaryDirectory(prefix="diffcolor-faults-") as folder:
                with (_moto_bucket() if store == "s3" else _local(folder)) as root:
                    operations[store], _ = record_operations(models, root)
        for store in operations:
            print(f"{store}: " + ", ".join(f"{len(ops)} {group} operations" for group, ops in operations[store].items()))
        if args.markdown:
            path = Path(args.markdown)
            path.write_text(write_table(path.read_text(encoding="utf-8"), doc_table(operations)), encoding="utf-8")
            print(f"the fault table in {args.markdown} written")
            return 0
        differences = doc_differences(Path(args.check).read_text(encoding="utf-8"), operations)
        if differences:
            print(f"the fault table in {args.check} is not the code's:\n  " + "\n  ".join(differences)
                  + f"\nregenerate it: python -m diffcolor.tools.faults --markdown {args.check}", file=sys.stderr)
            return 1
        print(f"the fault table in {args.check} lists the code's operations")
        return 0

    def show(outcome: Outcome) -> None:
        verdict = "ok" if not outcome.problems else "FAILED: " + "; ".join(outcome.problems)
        print(f"{outcome.store:5} {outcome.group:9} {outcome.mode:12} op {outcome.at:3} {outcome.operation:60.60} "
              f"{verdict}", flush=True)

    started = time.monotonic()
    for store in stores:
        with tempfile.TemporaryDirectory(prefix="diffcolor-faults-") as folder:
            context = _moto_bucket() if store == "s3" else _local(folder)
            with context as root:
                operations[store], found = run_harness(models, root, store=store, modes=modes, on_outcome=show)
                outcomes += found
    print(f"\n{summary_table(operations, outcomes)}\n\n{len(outcomes)} faults in {time.monotonic() - started:.0f} s")
    return 0 if all(not outcome.problems for outcome in outcomes) else 1


@contextmanager
def _local(folder: str) -> Iterator[str]:
    yield folder


if __name__ == "__main__":
    sys.exit(main())
