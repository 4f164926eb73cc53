"""One item under its output prefix: the layout of its objects, its records, its checkpoint folder.

The item's layout under its output prefix (``result.json``, ``versions/``,
``state/``, ``attempts/``, ...) is :mod:`diffcolor.archive.layout`'s
(:class:`~diffcolor.archive.layout.ItemLayout`).

A record is a JSON object per item version (docs/DESIGN.md §10.3): what was asked,
what was made, with which models and software, and how it went.

How a version is committed, so that a retry never duplicates one and a reader
never loses the current one:

1. the version's outputs (master, access copy) are published whole;
2. its record ``versions/vNNNN.json``, carrying a ``version_key`` (the hash of
   the work: cache key, target), is published: from here on the version exists,
   and a retry of the same work finds it by its key and reuses it instead of
   adding another;
3. ``result.json`` is published last and names the current version.

A failure never replaces a done ``result.json``: a failed attempt's record
goes to ``attempts/`` (always) and to ``result.json`` only while the item has no
done version, so the pointer to the latest good version is kept. Every record
is redacted (:mod:`diffcolor.common.redact`) before it is written or returned.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone

from diffcolor import __version__
from diffcolor.archive import storage
from diffcolor.archive.layout import ItemLayout
from diffcolor.common.errors import BadImageError, DiffColorError, InputUnavailableError, MissingObjectError
from diffcolor.common.items import ItemRequest
from diffcolor.common.record import VersionRecord
from diffcolor.common.redact import redact, redact_value

SOFTWARE = "diffcolor-archive"


class CommittedVersions(Mapping[str, dict]):
    """``version_key`` -> record of every done version whose outputs are all whole (step 2 of the protocol).

    The records are read when it is made; a version's outputs are checked
    against their sha256 only when its key is looked up (once), so that a
    recolour of an item with many large versions reads only the version it
    might reuse, not every master it has.
    """

    def __init__(self, records: dict[str, list[dict]]):
        self._records = records  # key -> the done records that name it, in version order
        self._whole: dict[str, dict | None] = {}  # key -> the latest of them whose outputs are whole, once checked

    def _checked(self, key: str) -> dict | None:
        if key not in self._whole:
            self._whole[key] = next((record for record in reversed(self._records.get(key, [])) if outputs_whole(record)),
                                    None)
        return self._whole[key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._records and self._checked(key) is not None

    def __getitem__(self, key: str) -> dict:
        record = self._checked(key) if isinstance(key, str) and key in self._records else None
        if record is None:
            raise KeyError(key)
        return record

    def __iter__(self) -> Iterator[str]:
        return (key for key in list(self._records) if self._checked(key) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def committed_versions(layout: ItemLayout) -> CommittedVersions:
    """``version_key`` -> record of every done version whose outputs are all whole (step 2 of the protocol).

    A version whose record exists but cannot be read, or whose outputs are
    gone or no longer match their recorded sha256, is left out: its work is
    done again, as a new version. Outputs are checked when a key is looked up.
    """
    records = {}
    for uri in layout.version_records():
        try:
            record = storage.read_json(uri)
        except (MissingObjectError, ValueError):  # gone since the listing, or not JSON any more
            continue
        key = record.get("version_key") if isinstance(record, dict) else None
        if isinstance(key, str) and key and record.get("status") == "done":
            records.setdefault(key, []).append(record)
    return CommittedVersions(records)


def outputs_whole(record: dict) -> bool:
    """Whether every output ``record`` names (the colour state aside: one object, replaced by a refit) exists and
    has the sha256 the record gives it."""
    hashes, outputs = record.get("output_sha256") or {}, record.get("outputs") or {}
    if not isinstance(hashes, dict) or not isinstance(outputs, dict):
        return False
    for role, uri in outputs.items():
        if role == "state":
            continue
        try:  # read in chunks (a 100 Mpx master is 600 MB), regular files only: a FIFO never hangs it
            digest = storage.sha256_bounded(str(uri), storage.ReadLimits())
        except (InputUnavailableError, BadImageError):  # gone, unreadable, not a file, or too large
            return False
        if hashes.get(role) and digest != hashes[role]:
            return False
    return True


def base_record(request: ItemRequest, provenance: dict | None, preset: str, source_sha256: str | None,
                key: str | None) -> VersionRecord:
    """A record of ``request`` with every contract field present and nothing done yet.

    ``provenance`` is the loaded models' description (``Models.provenance``:
    model and CLIP ids, hashes, whether the weights are random, their storage
    dtype); None when the item failed before models were involved. URIs and
    catalogue fields are redacted.
    """
    models = provenance or {}
    return {
        "item_id": request.item_id,
        "version": None,
        "status": None,
        "error_class": None,
        "error_message": None,
        "cache_key": key,
        "source_uri": redact(request.source_uri),
        "source_sha256": source_sha256,
        "caption": request.caption,
        "seed": int(request.seed),
        "preset": preset,
        "model_id": models.get("model_id"),
        "clip_model_id": models.get("clip_model_id"),
        "model_hash": models.get("model_hash"),
        "weight_sha256": dict(models.get("weight_sha256") or {}),
        "smoke_run": models.get("random_weights"),
        "weight_dtype": models.get("weight_dtype"),  # frozen weights' storage
        "software": SOFTWARE,
        "software_version": __version__,
        "catalogue": redact_value(dict(request.catalogue)),
        "outputs": {},
        "output_sha256": {},
        "seconds": {},
        "finetune_steps_run": 0,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def failure_record(request: ItemRequest, error: BaseException, *, status: str = "failed", provenance: dict | None = None,
                   preset: str = "", source_sha256: str | None = None) -> VersionRecord:
    """A record for an item that could not be processed (no version, no outputs); its message redacted."""
    record = base_record(request, provenance, preset, source_sha256, None)
    if isinstance(error, DiffColorError):
        error_class, message = error.error_class, str(error)
    else:  # not raised on purpose: name the class, so the message is never a bare repr
        error_class, message = "internal", f"{type(error).__name__}: {error}"
    record.update(status=status, error_class=error_class, error_message=redact(message))
    return record


def publish_record(layout: ItemLayout, record: VersionRecord) -> VersionRecord:
    """Commits a done version: its record (steps 2 and 3 of the protocol), then ``result.json``; returns it redacted."""
    record = redact_value(record)
    if record.get("version") is not None:
        storage.write_json(layout.record(record["version"]), record)
    storage.write_json(layout.result, record)
    return record


def publish_failure(layout: ItemLayout, record: VersionRecord) -> VersionRecord:
    """Records a failed attempt beside the item's versions; ``result.json`` only while no done version exists.

    Returns the record as written (redacted). A ``result.json`` that cannot be
    read is left alone: the attempt is still recorded.
    """
    record = redact_value(record)
    stamp = record["created_at"].replace(":", "").replace("-", "")
    storage.write_json(storage.join(layout.attempts, f"{stamp}-{uuid.uuid4().hex[:8]}.json"), record)
    try:
        current = storage.read_json(layout.result) if storage.exists(layout.result) else None
    except (DiffColorError, ValueError):  # unreadable now, or not JSON: leave it for the next good version
        return record
    if current is None or current.get("status") != "done":
        storage.write_json(layout.result, record)
    return record


class CheckpointFolder:
    """A loop's checkpoints as named objects under a storage prefix (the method's ``CheckpointStore``).

    The fit loops of :mod:`diffcolor.method.training` publish and read their
    checkpoints through this object alone, so the method never names a URI.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix

    def names(self) -> list[str]:
        """Names of the objects directly in the folder, sorted (staging files left out)."""
        return [uri.rsplit("/", 1)[-1] for uri in storage.list_files(self.prefix)]

    def read(self, name: str) -> bytes:
        return storage.read_bytes(storage.join(self.prefix, name))

    def write(self, name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.prefix, name), data)

    def remove(self, name: str) -> None:
        storage.remove(storage.join(self.prefix, name))

    def child(self, name: str) -> "CheckpointFolder":
        """The folder ``name`` inside this one (one per loop)."""
        return CheckpointFolder(storage.join(self.prefix, name))

    def __repr__(self) -> str:
        return f"CheckpointFolder({self.prefix!r})"
