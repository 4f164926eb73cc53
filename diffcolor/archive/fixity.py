"""The fixity audit of a collection's output: every item's records against the files they name.

``diffcolor verify OUTPUT`` (and the ``verify-output`` flow) walks ``OUTPUT/items/``
item by item, streaming (one item's listing and records in memory at a time),
and checks, per item:

- ``result.json`` is there (when the item has versions, or the done-index lists
  it as done) and is a JSON object; every ``versions/vNNNN.json`` is one too;
- the current version's record exists;
- every file a done record names (master, access copy, credentials sidecar; the
  colour state for the current version only: a refit replaces that one object)
  is present under the item and its sha256 equals the record's;
- a lost or altered file of an earlier version whose work a later whole version
  redid (a run remade it) is a note, not a problem;
- on a local disk, nothing in the item is a symbolic link that leaves the output
  root (such a link is reported and never read), and the item folder is not one;
  a FIFO or device file is reported and never opened;
- a record names its files inside its own item (``../`` or another place is a
  problem, and is never read).

Items the done-index lists as done but that have no folder at all are
reported too. The audit writes nothing unless asked to repair: with
``repair`` the affected items get a ``needs_repair`` entry in the done-index
(the newest entry wins, so the next run does them again, and the worker, which
checks its outputs' sha256 before skipping, makes them anew), and the report is
written to ``OUTPUT/verify/TIME.json``. Items behind a link out of the root are
never queued: they need a person to remove the link.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from diffcolor.archive import storage
from diffcolor.archive.layout import ITEMS, RESULT, OutputLayout, is_record_path, path_in_item, record_path
from diffcolor.archive.planning import read_done_index, update_done_index
from diffcolor.common.errors import InputUnavailableError, MissingObjectError, UserError

REPAIR_STATUS = "needs_repair"  # a done-index status: the item is done again by the next run
_LINK_PROBLEM = "symbolic link leaving the output root (not read)"


@dataclass
class Problem:
    """One thing wrong with one item: which file, what, and the expected and found values when there are."""

    item_id: str
    file: str
    problem: str
    expected: str | None = None
    found: str | None = None

    def line(self) -> str:
        text = f"{self.item_id}: {self.file or '(item)'}: {self.problem}"
        if self.expected is not None or self.found is not None:
            text += f" (expected {self.expected or '-'}, found {self.found or '-'})"
        return text


@dataclass
class Audit:
    """What an audit checked and found."""

    output: str
    started: str
    seconds: float = 0.0
    items: int = 0
    files: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)  # not problems: lost files of superseded versions
    repair: bool = False
    queued: list[str] = field(default_factory=list)  # items put back into the work queue by the repair
    not_queued: list[str] = field(default_factory=list)  # items with problems a person must fix (links)
    report: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_items(self) -> list[str]:
        return sorted({problem.item_id for problem in self.problems})

    def summary(self) -> str:
        verdict = "all records hold" if self.ok else (f"{len(self.problems)} problem(s) in "
                                                      f"{len(self.damaged_items)} item(s)")
        text = f"verify {self.output}: {self.items} item(s), {self.files} file(s) checked: {verdict}"
        if self.repair and self.queued:
            text += f"; {len(self.queued)} item(s) queued for the next run (dropped from the done-index)"
        if self.not_queued:
            text += f"; {len(self.not_queued)} item(s) not queued (links out of the root: remove them by hand)"
        return text

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(ok=self.ok, damaged_items=self.damaged_items, summary=self.summary())
        return data


def audit_output(output: str, *, repair: bool = False, on_problem: Callable[[Problem], None] | None = None,
                 on_note: Callable[[Problem], None] | None = None) -> Audit:
    """Audits every item of the collection output ``output``; see the module docstring.

    ``on_problem`` is called with each problem as it is found, ``on_note`` with
    each note (a lost file of an earlier version whose work was redone since). Raises
    ValueError when ``output`` holds no collection output (no ``items/`` and no
    done-index).
    """
    started = time.perf_counter()
    output = storage.absolute(output).rstrip("/")
    audit = Audit(output=output, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), repair=repair)
    done = read_done_index(output)
    fs, root_path = storage.filesystem(output)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if not done and not (os.path.isdir(os.path.join(root_path, ITEMS)) if local
                         else any(True for _ in storage.iter_objects(OutputLayout(output).items))):
        raise UserError(f"'{output}' holds no collection output (no items/ folder, no done-index)")

    def report(problem: Problem) -> None:
        audit.problems.append(problem)
        if on_problem is not None:
            on_problem(problem)

    def note(problem: Problem) -> None:
        audit.notes.append(problem)
        if on_note is not None:
            on_note(problem)

    seen: set[str] = set()
    items = _local_items(root_path) if local else _remote_items(output)
    for item_id, files, links in items:
        seen.add(item_id)
        audit.items += 1
        audit.files += _audit_item(output, item_id, files, links, item_id in done, report, note)
    for item_id in sorted(set(done) - seen):
        audit.items += 1
        report(Problem(item_id, "", "the done-index lists the item as done but its folder is missing"))

    if repair:
        _repair(audit)
    audit.seconds = time.perf_counter() - started
    if repair:
        audit.report = OutputLayout(output).verify_report(audit.started.replace(':', '').replace('-', ''))
        storage.write_json(audit.report, audit.to_dict())
    return audit


def _repair(audit: Audit) -> None:
    links = {problem.item_id for problem in audit.problems if problem.problem == _LINK_PROBLEM}
    audit.not_queued = sorted(links)
    audit.queued = [item for item in audit.damaged_items if item not in links]
    if audit.queued:
        update_done_index(audit.output, ((item, "", REPAIR_STATUS, None) for item in audit.queued),
                          run_id=f"verify-{audit.started.replace(':', '').replace('-', '')}")


# ---------------------------------------------------------------------------
# The items, one at a time: (item id, its files relative to its folder, those of them that are bad links).


def _local_items(root: str) -> Iterator[tuple[str, set[str], set[str]]]:
    real_root = os.path.realpath(root)
    items_root = os.path.join(root, ITEMS)
    if os.path.islink(items_root) and not _inside(os.path.realpath(items_root), real_root):
        yield "(items)", set(), {""}
        return
    try:
        names = sorted(os.listdir(items_root))
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        if name.startswith("."):  # staging files; no item id starts with '.'
            continue
        folder = os.path.join(items_root, name)
        if os.path.islink(folder) and not _inside(os.path.realpath(folder), real_root):
            yield name, set(), {""}
            continue
        if not os.path.isdir(folder):
            continue
        files, links, special = set(), set(), set()
        for parent, folders, entries in os.walk(folder, followlinks=False):
            inner = os.path.relpath(parent, folder)
            prefix = "" if inner == "." else inner.replace(os.sep, "/") + "/"
            for entry in entries + [f for f in folders if os.path.islink(os.path.join(parent, f))]:
                if entry.endswith(".partial"):
                    continue
                path = os.path.join(parent, entry)
                files.add(prefix + entry)
                if os.path.islink(path) and not _inside(os.path.realpath(path), real_root):
                    links.add(prefix + entry)
                elif not _regular(path):
                    special.add(prefix + entry)
        yield name, files, links | {f"\0{entry}" for entry in special}


def _regular(path: str) -> bool:
    """Whether ``path`` (a link followed) is a regular file: a FIFO or a device is never opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # gone or a dangling link: reported as missing when a record names it


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _remote_items(output: str) -> Iterator[tuple[str, set[str], set[str]]]:
    """From the sorted listing of ``items/``: an item's keys are contiguous, so one item is held at a time."""
    current, files = None, set()
    for page in storage.iter_objects(OutputLayout(output).items):
        for name in page:
            item, _, rest = name.partition("/")
            if not rest:
                continue
            if item != current:
                if current is not None:
                    yield current, files, set()
                current, files = item, set()
            files.add(rest)
    if current is not None:
        yield current, files, set()


# ---------------------------------------------------------------------------
# One item.


def _audit_item(output: str, item_id: str, files: set[str], links: set[str], indexed: bool, report, note) -> int:
    """Checks one item; reports its problems; returns how many files it hashed."""
    prefix = OutputLayout(output).listed_item(item_id).prefix
    if "" in links:  # the item folder itself
        report(Problem(item_id, "", _LINK_PROBLEM))
        return 0
    special = {name[1:] for name in links if name.startswith("\0")}
    links = {name for name in links if not name.startswith("\0")}
    for link in sorted(links):
        report(Problem(item_id, link, _LINK_PROBLEM))
    for name in sorted(special):
        report(Problem(item_id, name, "not a regular file (a FIFO, a device or a folder; not read)"))
    links = links | special  # neither is ever read

    def read_record(name: str) -> dict | None:
        if name in links:
            return None
        try:
            value = json.loads(storage.read_bytes(storage.join(prefix, name)).decode("utf-8"))
        except MissingObjectError:
            report(Problem(item_id, name, "missing"))
            return None
        except ValueError as error:
            report(Problem(item_id, name, f"does not parse as JSON ({type(error).__name__}: {error})"))
            return None
        if not isinstance(value, dict):
            report(Problem(item_id, name, f"is not a JSON object (a {type(value).__name__})"))
            return None
        return value

    version_names = sorted(name for name in files if is_record_path(name))
    result = None
    if RESULT in files:
        result = read_record(RESULT)
    elif version_names or indexed:
        report(Problem(item_id, RESULT, "missing"))
    current = _number(result.get("version")) if result and result.get("status") == "done" else None
    if result and result.get("status") == "done" and current is None:
        report(Problem(item_id, RESULT, f"names no valid version ({result.get('version')!r})"))
    if current is not None and record_path(current) not in files:
        report(Problem(item_id, record_path(current), f"missing (the version {RESULT} names)"))

    records = [(result, True)] if current is not None else []
    for name in version_names:
        record = read_record(name)
        if record is not None and record.get("status") == "done":
            records.append((record, current is not None and _number(record.get("version")) == current))

    hashed: dict[str, str | None] = {}
    checked = []  # (record, is_current, its problems)
    for record, is_current in records:
        found_problems = []
        expected_hashes, outputs = record.get("output_sha256") or {}, record.get("outputs") or {}
        if not isinstance(expected_hashes, dict) or not isinstance(outputs, dict):
            where = RESULT if record is result else record_path(_number(record.get("version")) or 0)
            report(Problem(item_id, where, "its outputs or output_sha256 is not a JSON object"))
            continue
        for role, uri in sorted(outputs.items()):
            if role == "state" and not is_current:
                continue  # one object, replaced by a refit: only the current version's hash must hold
            name = path_in_item(str(uri), item_id)
            expected = expected_hashes.get(role)
            if name is None:
                found_problems.append(Problem(item_id, str(uri), f"the record of version {record.get('version')} "
                                                                 "names a file outside the item's folder",
                                              expected=expected))
                continue
            if name in links:
                continue  # reported above, never read
            if name not in hashed:
                hashed[name] = _sha256(storage.join(prefix, name)) if name in files else None
            found = hashed[name]
            if found is None:
                found_problems.append(Problem(item_id, name, "missing or unreadable", expected=expected))
            elif expected and found != expected:
                found_problems.append(Problem(item_id, name, "sha256 differs from the record's", expected=expected,
                                              found=found))
        checked.append((record, is_current, found_problems))

    # A damaged earlier version whose work a later whole version redid (the same version_key: the run remade
    # what was lost) is a note, not a problem: the item's content is whole again.
    whole = {(str(record.get("version_key")), _number(record.get("version"))) for record, _, found in checked
             if not found}
    reported = set()
    for record, is_current, found_problems in checked:
        key, number = record.get("version_key"), _number(record.get("version")) or 0
        redone = not is_current and isinstance(key, str) and any(later_key == key and (_number(later) or 0) > number
                                                                 for later_key, later in whole)
        for problem in found_problems:
            if (problem.file, problem.problem) in reported:
                continue  # result.json and the current version's record name the same files
            reported.add((problem.file, problem.problem))
            if redone:
                problem.problem += f" (version {record.get('version')}, superseded: its work was redone as a later version)"
                note(problem)
            else:
                report(problem)
    return len(hashed) + (1 if result is not None else 0) + len(version_names)


def _number(value) -> int | None:
    """A version number as records give it; None for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _sha256(uri: str) -> str | None:
    """The object's sha256; None when it is gone or cannot be read (a transient store failure is raised)."""
    try:
        return storage.sha256_of(uri)
    except InputUnavailableError:  # missing, or reading denied
        return None
