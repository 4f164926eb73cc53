"""Planning a collection run: what to skip, what to do, in windows. Plain functions.

The output root's layout (``items/``, ``runs/``, the done-index under
``index/``) is :mod:`diffcolor.archive.layout`'s.

Planning must not touch every item's objects: for a nightly run over a
million-row manifest that is a million storage requests. Instead each manifest
row gets a *plan key* computed from the row alone (item id, image URI, caption,
targets, colour map, seed, the configuration and the model hash; plus the
``image_sha256`` or ``image_etag`` catalogue column when the manifest has one),
and rows whose plan key (:func:`diffcolor.common.keys.plan_key`) the done-index lists as done are skipped without a
storage request per item. The index is a cache, not the truth: one listing of
``items/`` (:func:`missing_done_items`) finds done items whose ``result.json``,
record or outputs are gone, and those are done again. The worker then checks the
item's full cache key, which hashes the image bytes, and that the outputs its
``result.json`` names are whole, before any GPU work, so a stale index never
causes wrong or missing output, only a cheap check.
"""

from __future__ import annotations

import io
import itertools
import os
import time
import uuid
from dataclasses import dataclass
from typing import Container, Iterable, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffcolor.archive import storage
from diffcolor.archive.layout import ACCESS, MASTER, RESULT, OutputLayout, record_path, version_path
from diffcolor.common.items import ItemRequest
from diffcolor.common.keys import plan_keys

INDEX_SCHEMA = pa.schema([("item_id", pa.string()), ("plan_key", pa.string()), ("status", pa.string()),
                          ("version", pa.int64()), ("updated_at", pa.float64())])
COMPACT_AFTER_SHARDS = 16  # ours: a run folds the shards into the compacted index once there are more than this


def _shard_uris(output: str) -> list[str]:
    return [uri for uri in storage.list_files(OutputLayout(output).index_shards) if uri.endswith(".parquet")]


def _index_table(uri: str) -> pa.Table:
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    if "updated_at" not in table.column_names:  # an index written before entries carried their time
        table = table.append_column("updated_at", pa.array([0.0] * table.num_rows, pa.float64()))
    return table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)


def _latest_entries(output: str, shards: list[str]) -> pa.Table:
    """The compacted index and ``shards`` merged: one row per item, its newest entry."""
    compacted = OutputLayout(output).index_table
    uris = ([compacted] if storage.exists(compacted) else []) + shards
    tables = [_index_table(uri) for uri in uris]
    if not tables:
        return INDEX_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    if pc.count_distinct(table["item_id"]).as_py() == table.num_rows:  # one entry per item: nothing to pick
        return table
    table = table.sort_by([("updated_at", "ascending")])
    latest = {item: index for index, item in enumerate(table["item_id"].to_pylist())}  # the newest row wins
    return table.take(pa.array(sorted(latest.values()), pa.int64()))


class DoneEntry(NamedTuple):
    """What the done-index says of a done item: the plan key of its work and the version result.json names."""

    plan_key: str
    version: int | None


def read_done_index(output: str) -> dict[str, DoneEntry]:
    """item id -> :class:`DoneEntry` of the items the index lists as done (empty when there is no index)."""
    table = _latest_entries(output, _shard_uris(output))
    done = table.filter(pc.equal(table["status"], "done"))
    # DoneEntry tuples made in C (tuple.__new__), not through the NamedTuple's Python-level __new__
    pairs = zip(done["plan_key"].to_pylist(), done["version"].to_pylist())
    entries = map(tuple.__new__, itertools.repeat(DoneEntry), pairs)
    return dict(zip(done["item_id"].to_pylist(), entries))


LIST_SHARD_ITEMS = 20_000  # ours: done items per S3 listing range; ranges are listed in parallel
_RESULT, _RECORD, _MASTER, _ACCESS = 1, 2, 4, 8


def _needed(entry: DoneEntry) -> int:
    return _RESULT | (_RECORD | _MASTER | _ACCESS if entry.version else 0)


def _found(rest: str, entry: DoneEntry) -> int:
    """Which of the objects a done item needs ``rest`` (a path inside the item's folder) is."""
    if rest == RESULT:
        return _RESULT
    if not entry.version:
        return 0
    version = version_path(entry.version)
    if rest == record_path(entry.version):
        return _RECORD
    if rest == f"{version}/{MASTER}":
        return _MASTER
    if rest.startswith(f"{version}/{ACCESS}."):
        return _ACCESS
    return 0


def missing_done_items(output: str, done: dict[str, DoneEntry]) -> set[str]:
    """The items of ``done`` (:func:`read_done_index`) whose work is not in the archive any more.

    The done-index is a cache of the archive, not its truth: an item is
    missing when its ``result.json`` is gone, or (when the index names its
    version) that version's record, master or access copy is gone. Found by
    listing, never one request per item: on a local disk one listing of
    ``items/``, then per done item an ``access`` check of each object it needs (the
    version's folder is listed only when its access copy is not ``access.jpg``;
    no file is opened, no round trip); on S3 the
    ``ListObjectsV2`` pages of ``items/``, cut into ranges of
    :data:`LIST_SHARD_ITEMS` done items listed in parallel. Whether the files
    are whole (their sha256) is ``diffcolor verify``'s audit, not the plan's.
    """
    if not done:
        return set()
    root = OutputLayout(output).items
    fs, path = storage.filesystem(root)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return _missing_on_disk(path, done)
    ids = sorted(done)
    split_at = [f"{item}/" for item in ids[LIST_SHARD_ITEMS::LIST_SHARD_ITEMS]]
    have: dict[str, int] = {}
    for page in storage.iter_objects(root, split_at=split_at):
        for name in page:
            item, _, rest = name.partition("/")
            entry = done.get(item)
            if entry is not None:
                have[item] = have.get(item, 0) | _found(rest, entry)
    return {item for item, entry in done.items() if have.get(item, 0) & _needed(entry) != _needed(entry)}


def _lists_an_access_copy(version: str) -> bool:
    try:
        return any(name.startswith(f"{ACCESS}.") for name in os.listdir(version))
    except OSError:  # gone, or not a folder
        return False


def _missing_on_disk(root: str, done: dict[str, DoneEntry]) -> set[str]:
    try:
        present = set(os.listdir(root))  # one listing of items/
    except (FileNotFoundError, NotADirectoryError):
        return set(done)
    there, exists = os.access, os.F_OK  # a path lookup per object, and no stat result built in Python
    missing = set()
    for item, entry in done.items():
        if item not in present:
            missing.add(item)
            continue
        folder = f"{root}/{item}"
        if not there(f"{folder}/{RESULT}", exists):
            missing.add(item)
        elif entry.version:
            version = f"{folder}/{version_path(entry.version)}"
            if not (there(f"{version}.json", exists) and there(f"{version}/{MASTER}", exists)
                    and (there(f"{version}/{ACCESS}.jpg", exists) or _lists_an_access_copy(version))):
                missing.add(item)  # the version's folder is listed only when its access copy is not access.jpg
    return missing


@dataclass
class PlannedItem:
    """One manifest row and what the run does with it."""

    request: ItemRequest
    plan_key: str
    skip: bool  # True: the done-index says this exact work is done
    version: int | None = None  # of a skipped item: the version its result.json names
    missing: bool = False  # the done-index listed this work as done, but the archive lacks it: redone


def plan_items(requests: Iterable[ItemRequest], done: dict[str, DoneEntry], *, config_hash: str, model_hash: str,
               force: bool = False, missing: Container[str] = frozenset()) -> Iterator[PlannedItem]:
    """Marks each request skip or do, streaming (never holds the manifest in memory).

    ``done`` is :func:`read_done_index`'s; ``force`` re-does items whose work the index lists as done;
    ``missing`` (:func:`missing_done_items`) are items the index lists as done that the archive lacks:
    they are done again, never skipped.
    """
    for request, key in _with_plan_keys(requests, config_hash, model_hash):
        entry = done.get(request.item_id)
        listed = entry is not None and entry.plan_key == key
        gone = listed and request.item_id in missing
        skip = not force and listed and not gone
        yield PlannedItem(request=request, plan_key=key, skip=skip, version=entry.version if skip else None,
                          missing=gone and not force)


PLAN_BATCH = 4096  # ours: requests whose plan keys are computed together (plan_keys), a bounded read-ahead


def _with_plan_keys(requests: Iterable[ItemRequest], config_hash: str,
                    model_hash: str) -> Iterator[tuple[ItemRequest, str]]:
    stream = iter(requests)
    while batch := list(itertools.islice(stream, PLAN_BATCH)):
        yield from zip(batch, plan_keys(batch, config_hash, model_hash))


def update_done_index(output: str, entries: Iterable[tuple[str, str, str, int | None]], *,
                      run_id: str | None = None) -> int:
    """Adds ``(item_id, plan_key, status, version)`` entries to the done-index; returns how many.

    Each call writes its own shard (``index/runs/RUN_ID.parquet``), so two runs
    finishing at once never overwrite each other's entries; the newest entry
    for an item wins when the index is read. Past :data:`COMPACT_AFTER_SHARDS`
    shards, the call folds them into ``index/items.parquet`` under the index's
    lease (a run that finds it held leaves compaction to the holder) and
    removes exactly the shards it folded in.
    """
    now = time.time()
    rows = [(item_id, key, status, version, now) for item_id, key, status, version in entries]
    columns = list(zip(*rows)) or [()] * len(INDEX_SCHEMA)
    table = pa.table([pa.array(list(column), type=field.type) for column, field in zip(columns, INDEX_SCHEMA)],
                     schema=INDEX_SCHEMA)
    name = run_id or f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}-{uuid.uuid4().hex[:8]}"
    storage.write_bytes(OutputLayout(output).index_shard(name), _parquet(table))
    if len(_shard_uris(output)) > COMPACT_AFTER_SHARDS:
        compact_done_index(output)
    return table.num_rows


def compact_done_index(output: str) -> bool:
    """Folds the shards into the compacted index; False when another run is compacting it now."""
    from diffcolor.archive.leases import LeaseLostError, item_lease

    try:
        with item_lease(OutputLayout(output).index, timeout_seconds=0) as lease:
            shards = _shard_uris(output)
            merged = _parquet(_latest_entries(output, shards))
            lease.check()  # a compaction that stalled past its lease must not overwrite a newer one's index
            storage.write_bytes(OutputLayout(output).index_table, merged)
            for uri in shards:
                storage.remove(uri)
    except (TimeoutError, LeaseLostError):  # held by another run, or lost to one: its compaction folds the shards
        return False
    return True


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()
