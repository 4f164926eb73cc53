"""Curators' decisions on item versions: append-only records, the approved pointer, the published copy.

A curator approves or rejects one version of an item, with a note. Nothing an
earlier run or decision wrote is ever changed; a decision adds, under the
item's prefix (:mod:`diffcolor.archive.items`)::

    PREFIX/decisions/NNNNNNNN.json       the decision: who, when, which version, approved/rejected, note
                                         (one object per decision, never overwritten: the history; NNNNNNNN
                                         is the item's decision sequence, 00000001 up)
    PREFIX/published/TIME-ID.jpg         on approval: the version's access copy, the same compressed
                                         pixels byte for byte, with an XMP packet that adds the decision
    PREFIX/approved.json                 the pointer to the published version (rewritten by each approval,
                                         like result.json; a rejection of that version withdraws it)

and, for the collection, a *review run* (:func:`publish_review_run`)::

    OUTPUT/runs/RUN_ID/results.parquet   the decided versions' records with decision, decided_by,
    OUTPUT/runs/RUN_ID/report.html       decided_at and decision_note filled in; the run id ends in -review

"Published" means: the version ``approved.json`` names. Its archival master
stays where and as it was made (masters are never rewritten in place: their
sha256 is in the version record and in ``approved.json``); the access copy
under ``published/`` is what goes to the public catalogue, and says in its own
metadata that a curator approved it, who and when. Whoever publishes follows
``approved.json`` only: an item without one (or whose pointer was withdrawn)
has nothing approved.

Order under concurrency. Two curators (two server processes, two machines)
may decide on one item at once. Each decision takes the next number of the
item's sequence with the store's conditional create
(:func:`diffcolor.archive.storage.create_exclusive`: of two writers racing
for ``00000007.json`` exactly one creates it, the other takes ``00000008``),
so the log has one order that every reader sees. ``approved.json`` is a
function of that log (the last approval, unless a later rejection of that
version withdrew it), never of which writer finished last: after creating
its decision a writer writes the pointer the log gives, then reads the log
and the pointer again and rewrites the pointer until they agree. The last
writer to touch the pointer checks it against a log that holds every
decision (a decision made later has a writer that writes after it), so once
all writers return, ``approved.json`` is the one the log gives. Decisions
written before sequence numbers (``TIME-ID.json``) come first, in the order
of their names (time, then a random part).

Every path goes through :func:`diffcolor.archive.storage.confine`: an item
folder or file that is a symbolic link out of the output is neither read
nor written.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime, timezone

from diffcolor.archive import storage
from diffcolor.archive.layout import ItemLayout, OutputLayout, RunLayout
from diffcolor.archive.metadata import replace_jpeg_xmp, xmp_for_format
from diffcolor.archive.report import write_report
from diffcolor.archive.results import write_results
from diffcolor.common.errors import PermanentError, StorageError
from diffcolor.common.ids import normalize_item_id

DECISIONS = ("approved", "rejected")
MAX_NOTE_CHARS = 2000  # ours: a paragraph; longer texts belong in the catalogue
MAX_NAME_CHARS = 200
MAX_POINTER_ROUNDS = 50  # ours: rewrites of approved.json before giving up (each needs another writer's decision)
_SEQUENCE_NAME = re.compile(r"^(\d{8})\.json$")


class DecisionError(PermanentError):
    """A decision that cannot be recorded: an unknown decision word, a version that is not done, no name."""

    error_class = "bad_decision"


def decisions_folder(layout: ItemLayout) -> str:
    return layout.decisions


def approved_uri(layout: ItemLayout) -> str:
    return layout.approved


def item_layout(output: str, item_id: str) -> ItemLayout:
    """The layout of ``item_id`` under ``output``; OutsideRootError when its folder leads outside the output."""
    return ItemLayout(storage.confine(output, OutputLayout(output).item_prefix(item_id)))


def _order(name: str) -> tuple:
    """Sort key of a decision's file name: old ``TIME-ID`` names first (by name), then by sequence number."""
    match = _SEQUENCE_NAME.match(name)
    return (1, int(match.group(1)), name) if match else (0, 0, name)


def _decision_uris(output: str, layout: ItemLayout) -> list[str]:
    folder = storage.confine(output, decisions_folder(layout))
    names = [uri.rsplit("/", 1)[-1] for uri in storage.list_files(folder) if uri.endswith(".json")]
    return [storage.join(folder, name) for name in sorted(names, key=_order)]


def read_decisions(output: str, item_id: str, *, known: dict | None = None) -> list[dict]:
    """Every decision on the item, in the order they were made (the item's decision sequence).

    ``known``: decisions already read, by URI (a decision object never changes), reused and added to.
    """
    layout = item_layout(output, item_id)
    known = {} if known is None else known
    uris = _decision_uris(output, layout)
    for uri in uris:
        if uri not in known:
            known[uri] = storage.read_json(storage.confine(output, uri))
    return [known[uri] for uri in uris]


def read_approved(output: str, item_id: str) -> dict | None:
    """The item's approved pointer, or None when no version is approved now."""
    uri = storage.confine(output, approved_uri(item_layout(output, item_id)))
    if not storage.exists(uri):
        return None
    pointer = storage.read_json(uri)
    return pointer if pointer.get("version") is not None else None


def version_output(layout: ItemLayout, record: dict, role: str) -> str | None:
    """The URI of a version's output ``role`` under the item's own prefix, or None when it has none.

    Only the file name of the recorded URI is used, checked by the item-id rule,
    so a record can never point a reader outside the item's version folder.
    """
    recorded = (record.get("outputs") or {}).get(role)
    if not recorded or record.get("version") is None:
        return None
    return layout.output(int(record["version"]), normalize_item_id(recorded.rsplit("/", 1)[-1]))


def _stamp(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def record_decision(output: str, item_id: str, version: int, decision: str, decided_by: str, note: str = "",
                    *, now: datetime | None = None) -> dict:
    """Records ``decision`` on ``version`` of ``item_id`` under ``output``; returns the decision object.

    Raises:
        DecisionError: ``decision`` is not approved/rejected, ``decided_by`` is
            empty, the note is too long, or the version has no done record.
        UnsafeItemIdError: an unsafe item id.
        OutsideRootError: a folder or file of the item leads outside the output.
    """
    # 1. Check inputs: the words, the name, the version's record.
    if decision not in DECISIONS:
        raise DecisionError(f"decision must be one of {DECISIONS}, got {decision!r}")
    decided_by, note = (decided_by or "").strip(), (note or "").strip()
    if not decided_by or len(decided_by) > MAX_NAME_CHARS:
        raise DecisionError(f"a decision needs the curator's name (1 to {MAX_NAME_CHARS} characters), got {decided_by!r:.60}")
    if len(note) > MAX_NOTE_CHARS:
        raise DecisionError(f"the note has {len(note)} characters; at most {MAX_NOTE_CHARS}")
    output = storage.absolute(output)
    layout = item_layout(output, item_id)
    record_uri = storage.confine(output, layout.record(int(version)))
    record = storage.read_json(record_uri) if storage.exists(record_uri) else None
    if record is None or record.get("status") != "done":
        raise DecisionError(f"item {item_id!r} has no done version {version}")

    # 2. An approval's published copy first, so that the decision can name it (a failure leaves an unnamed copy).
    now = now or datetime.now(timezone.utc)
    entry = {"decision_id": None, "item_id": record["item_id"], "version": int(version), "decision": decision,
             "decided_by": decided_by, "decided_at": now.isoformat(timespec="seconds"), "note": note,
             "version_record": record_uri}
    if decision == "approved":
        entry.update(_publish_copy(output, layout, record, entry, _stamp(now)))

    # 3. The decision object, under the next number of the item's sequence, never overwritten.
    while True:
        uris = _decision_uris(output, layout)
        sequence = max((int(m.group(1)) for m in (_SEQUENCE_NAME.match(u.rsplit("/", 1)[-1]) for u in uris) if m),
                       default=0) + 1
        entry.update(decision_id=f"{sequence:08d}", sequence=sequence)
        uri = storage.confine(output, storage.join(decisions_folder(layout), f"{sequence:08d}.json"))
        if storage.create_exclusive(uri, (storage.strict_json(entry, indent=2) + "\n").encode("utf-8")):
            break

    # 4. The pointer, as the log gives it, until pointer and log agree.
    settle_approved(output, item_id)
    return entry


def _publish_copy(output: str, layout: ItemLayout, record: dict, entry: dict, name: str) -> dict:
    """The published access copy (the version's, with the decision in its XMP); the pointer's fields of it."""
    fields = dict(record, decision=entry["decision"], decided_by=entry["decided_by"], decided_at=entry["decided_at"],
                  decision_note=entry["note"] or None)
    access = version_output(layout, record, "access")
    published = data = None
    if access and access.lower().endswith((".jpg", ".jpeg")) and storage.exists(storage.confine(output, access)):
        data = replace_jpeg_xmp(storage.read_bytes(access), xmp_for_format(fields, "JPEG"))
        published = storage.confine(output, layout.published(name))
        storage.write_bytes(published, data)
    return {"master": version_output(layout, record, "master"),
            "master_sha256": (record.get("output_sha256") or {}).get("master"),
            "published_access": published,
            "published_access_sha256": hashlib.sha256(data).hexdigest() if published else None}


def _approval_pointer(output: str, layout: ItemLayout, entry: dict) -> dict:
    """``approved.json`` for the approval ``entry`` (an approval of before sequence numbers: from its record)."""
    if "published_access" not in entry:  # written before decisions named their published copy
        record = storage.read_json(storage.confine(output, layout.record(int(entry["version"]))))
        published = layout.published(entry["decision_id"])
        data = storage.read_bytes(storage.confine(output, published)) if storage.exists(published) else None
        entry = dict(entry, master=version_output(layout, record, "master"),
                     master_sha256=(record.get("output_sha256") or {}).get("master"),
                     published_access=published if data is not None else None,
                     published_access_sha256=hashlib.sha256(data).hexdigest() if data is not None else None)
    return {name: entry.get(name) for name in (
        "item_id", "version", "decision_id", "decided_by", "decided_at", "note", "master", "master_sha256",
        "published_access", "published_access_sha256")}


def pointer_of(output: str, layout: ItemLayout, log: list[dict], current: dict | None = None) -> dict | None:
    """The ``approved.json`` the decision ``log`` gives (None: no decision touches it; keep ``current``).

    Folded in order: an approval names its version; a rejection of the version
    named then withdraws it (``version`` null, with the pointer withdrawn).
    """
    pointer, approval = current, None  # approval: the entry the pointer names, made into one only when needed
    for entry in log:
        if entry.get("decision") == "approved":
            pointer, approval = None, entry
            continue
        named = approval["version"] if approval is not None else (pointer or {}).get("version")
        if named is not None and named == entry.get("version"):
            previous = _approval_pointer(output, layout, approval) if approval is not None else pointer
            pointer, approval = {"item_id": entry.get("item_id"), "version": None,
                                 "withdrawn_by": entry.get("decision_id"), "previous": previous}, None
    return _approval_pointer(output, layout, approval) if approval is not None else pointer


def settle_approved(output: str, item_id: str) -> dict | None:
    """Writes ``approved.json`` as the item's decision log gives it, until a re-read finds pointer and log agree.

    Returns the pointer (None when no decision made one). See the module
    docstring for why this leaves the pointer the log's under concurrency.
    """
    output = storage.absolute(output)
    layout = item_layout(output, item_id)
    uri = storage.confine(output, approved_uri(layout))
    known: dict = {}
    for _ in range(MAX_POINTER_ROUNDS):
        wanted = pointer_of(output, layout, read_decisions(output, item_id, known=known))
        if wanted is None:
            return None
        storage.write_json(uri, wanted)
        after = pointer_of(output, layout, read_decisions(output, item_id, known=known))
        if _same(storage.read_json(uri), after):
            return after
    raise StorageError(f"'{uri}' kept changing under {MAX_POINTER_ROUNDS} rewrites; decide again to settle it")


def _same(left, right) -> bool:
    return json.loads(storage.strict_json(left)) == json.loads(storage.strict_json(right))


def decided_record(output: str, entry: dict) -> dict:
    """The decided version's record with the decision's fields, as a review run lists it."""
    layout = item_layout(output, entry["item_id"])
    record = storage.read_json(storage.confine(output, layout.record(entry["version"])))
    return dict(record, decision=entry["decision"], decided_by=entry["decided_by"], decided_at=entry["decided_at"],
                decision_note=entry["note"] or None)


def publish_review_run(output: str, entries: list[dict], *, now: datetime | None = None) -> str:
    """Publishes a review run of ``entries`` (decisions): its results table and report; returns its prefix."""
    now = now or datetime.now(timezone.utc)
    run_id = _stamp(now) + "-review"  # sorts by time among the flows' run ids (flows.runs.new_run_id)
    run = RunLayout(storage.confine(output, OutputLayout(output).run_prefix(run_id)))
    records = [decided_record(output, entry) for entry in entries]
    write_results(records, run.results)
    write_report(records, run.report, run_id=run_id)
    return run.prefix
