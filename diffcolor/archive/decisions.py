"""Curators' decisions on item versions: append-only records, the approved pointer, the published copy.

A curator approves or rejects one version of an item, with a note. Nothing an
earlier run or decision wrote is ever changed; a decision adds, under the
item's prefix (:mod:`diffcolor.archive.items`)::

    PREFIX/decisions/TIME-ID.json        the decision: who, when, which version, approved/rejected, note
                                         (one object per decision, never overwritten: the history)
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
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timezone

from diffcolor.archive import storage
from diffcolor.archive.items import ItemLayout
from diffcolor.archive.metadata import replace_jpeg_xmp, xmp_for_format
from diffcolor.archive.planning import item_prefix, run_prefix
from diffcolor.archive.report import write_report
from diffcolor.archive.results import write_results
from diffcolor.common.errors import PermanentError
from diffcolor.common.ids import normalize_item_id

DECISIONS = ("approved", "rejected")
MAX_NOTE_CHARS = 2000  # ours: a paragraph; longer texts belong in the catalogue
MAX_NAME_CHARS = 200


class DecisionError(PermanentError):
    """A decision that cannot be recorded: an unknown decision word, a version that is not done, no name."""

    error_class = "bad_decision"


def decisions_folder(layout: ItemLayout) -> str:
    return storage.join(layout.prefix, "decisions")


def approved_uri(layout: ItemLayout) -> str:
    return storage.join(layout.prefix, "approved.json")


def read_decisions(layout: ItemLayout) -> list[dict]:
    """Every decision on the item, oldest first (the names sort by time)."""
    return [storage.read_json(uri) for uri in storage.list_files(decisions_folder(layout)) if uri.endswith(".json")]


def read_approved(layout: ItemLayout) -> dict | None:
    """The item's approved pointer, or None when no version is approved now."""
    if not storage.exists(approved_uri(layout)):
        return None
    pointer = storage.read_json(approved_uri(layout))
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
    """
    # 1. Check inputs: the words, the name, the version's record.
    if decision not in DECISIONS:
        raise DecisionError(f"decision must be one of {DECISIONS}, got {decision!r}")
    decided_by, note = (decided_by or "").strip(), (note or "").strip()
    if not decided_by or len(decided_by) > MAX_NAME_CHARS:
        raise DecisionError(f"a decision needs the curator's name (1 to {MAX_NAME_CHARS} characters), got {decided_by!r:.60}")
    if len(note) > MAX_NOTE_CHARS:
        raise DecisionError(f"the note has {len(note)} characters; at most {MAX_NOTE_CHARS}")
    layout = ItemLayout(item_prefix(output, item_id))
    record_uri = layout.record(int(version))
    record = storage.read_json(record_uri) if storage.exists(record_uri) else None
    if record is None or record.get("status") != "done":
        raise DecisionError(f"item {item_id!r} has no done version {version}")

    # 2. The decision object, never overwritten.
    now = now or datetime.now(timezone.utc)
    decision_id = _stamp(now)
    entry = {"decision_id": decision_id, "item_id": record["item_id"], "version": int(version), "decision": decision,
             "decided_by": decided_by, "decided_at": now.isoformat(timespec="seconds"), "note": note,
             "version_record": record_uri}
    storage.write_json(storage.join(decisions_folder(layout), f"{decision_id}.json"), entry)

    # 3. The pointer: an approval publishes a copy and names it; rejecting the approved version withdraws it.
    if decision == "approved":
        _publish(layout, record, entry)
    else:
        current = read_approved(layout)
        if current is not None and current["version"] == int(version):
            storage.write_json(approved_uri(layout), {"item_id": record["item_id"], "version": None,
                                                      "withdrawn_by": decision_id, "previous": current})
    return entry


def _publish(layout: ItemLayout, record: dict, entry: dict) -> None:
    """The published access copy (the version's, with the decision in its XMP) and ``approved.json``."""
    fields = dict(record, decision=entry["decision"], decided_by=entry["decided_by"], decided_at=entry["decided_at"],
                  decision_note=entry["note"] or None)
    access = version_output(layout, record, "access")
    published = None
    if access and access.lower().endswith((".jpg", ".jpeg")) and storage.exists(access):
        data = replace_jpeg_xmp(storage.read_bytes(access), xmp_for_format(fields, "JPEG"))
        published = storage.join(layout.prefix, "published", f"{entry['decision_id']}.jpg")
        storage.write_bytes(published, data)
    master = version_output(layout, record, "master")
    storage.write_json(approved_uri(layout), {
        "item_id": record["item_id"], "version": entry["version"], "decision_id": entry["decision_id"],
        "decided_by": entry["decided_by"], "decided_at": entry["decided_at"], "note": entry["note"],
        "master": master, "master_sha256": (record.get("output_sha256") or {}).get("master"),
        "published_access": published,
        "published_access_sha256": hashlib.sha256(data).hexdigest() if published else None,
    })


def decided_record(output: str, entry: dict) -> dict:
    """The decided version's record with the decision's fields, as a review run lists it."""
    layout = ItemLayout(item_prefix(output, entry["item_id"]))
    record = storage.read_json(layout.record(entry["version"]))
    return dict(record, decision=entry["decision"], decided_by=entry["decided_by"], decided_at=entry["decided_at"],
                decision_note=entry["note"] or None)


def publish_review_run(output: str, entries: list[dict], *, now: datetime | None = None) -> str:
    """Publishes a review run of ``entries`` (decisions): its results table and report; returns its prefix."""
    now = now or datetime.now(timezone.utc)
    run_id = _stamp(now) + "-review"  # sorts by time among the flows' run ids (flows.runs.new_run_id)
    prefix = run_prefix(output, run_id)
    records = [decided_record(output, entry) for entry in entries]
    write_results(records, storage.join(prefix, "results.parquet"))
    write_report(records, storage.join(prefix, "report.html"), run_id=run_id)
    return prefix
