"""Planning a collection run: what to skip, what to do, in windows. Plain functions.

The output root of a collection is laid out as::

    OUTPUT/items/ITEM_ID/...          each item's layout (see diffcolor.archive.items)
    OUTPUT/runs/RUN_ID/results.parquet  the run's records
    OUTPUT/runs/RUN_ID/report.html      the run's contact sheet
    OUTPUT/index/items.parquet          the done-index: the latest plan key and status per item

Planning must not touch every item's objects: for a nightly run over a
million-row manifest that is a million storage requests. Instead each manifest
row gets a *plan key* computed from the row alone (item id, image URI, caption,
targets, colour map, seed, the configuration and the model hash; plus the
``image_sha256`` or ``image_etag`` catalogue column when the manifest has one),
and rows whose plan key (:func:`diffcolor.common.keys.plan_key`) the done-index lists as done are skipped without any
storage request. The worker then checks the item's full cache key, which hashes
the image bytes, before any GPU work, so a stale index never causes wrong output,
only a cheap check.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from diffcolor.archive import storage
from diffcolor.common.ids import normalize_item_id
from diffcolor.common.items import ItemRequest
from diffcolor.common.keys import plan_key

INDEX_SCHEMA = pa.schema([("item_id", pa.string()), ("plan_key", pa.string()), ("status", pa.string()), ("version", pa.int64())])


def item_prefix(output: str, item_id: str) -> str:
    """Where an item's objects live under a collection's output root.

    Every id that reaches storage passes here, so every one goes through the
    item-id rule (:func:`diffcolor.common.ids.normalize_item_id`): an unsafe id
    (``../..``, a separator, a device name) raises UnsafeItemIdError, and nothing
    is ever read or written outside ``OUTPUT/items/``.
    """
    return storage.join(output, "items", normalize_item_id(item_id))


def run_prefix(output: str, run_id: str) -> str:
    """Where a run's results and report live."""
    return storage.join(output, "runs", run_id)


def index_uri(output: str) -> str:
    return storage.join(output, "index", "items.parquet")


def read_done_index(output: str) -> dict[str, str]:
    """item id -> plan key of the items the index lists as done (empty when there is no index)."""
    uri = index_uri(output)
    if not storage.exists(uri):
        return {}
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["item_id", "plan_key", "status"])
    done = table.filter(pa.compute.equal(table["status"], "done"))
    return dict(zip(done["item_id"].to_pylist(), done["plan_key"].to_pylist()))


@dataclass
class PlannedItem:
    """One manifest row and what the run does with it."""

    request: ItemRequest
    plan_key: str
    skip: bool  # True: the done-index says this exact work is done


def plan_items(requests: Iterable[ItemRequest], done: dict[str, str], *, config_hash: str, model_hash: str,
               force: bool = False) -> Iterator[PlannedItem]:
    """Marks each request skip or do, streaming (never holds the manifest in memory).

    ``force`` re-does items whose work the index lists as done.
    """
    for request in requests:
        key = plan_key(request, config_hash, model_hash)
        yield PlannedItem(request=request, plan_key=key, skip=not force and done.get(request.item_id) == key)


def update_done_index(output: str, entries: Iterable[tuple[str, str, str, int | None]]) -> int:
    """Merges ``(item_id, plan_key, status, version)`` entries into the done-index; returns its size.

    The newest entry for an item wins. Two runs finishing at once may each
    overwrite the other's entries; that costs the next run a per-item check,
    never a wrong skip, since the worker verifies the full cache key.
    """
    latest: dict[str, tuple[str, str, int | None]] = {}
    uri = index_uri(output)
    if storage.exists(uri):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        for item_id, key, status, version in zip(*(table[c].to_pylist() for c in INDEX_SCHEMA.names)):
            latest[item_id] = (key, status, version)
    for item_id, key, status, version in entries:
        latest[item_id] = (key, status, version)
    table = pa.table(
        {
            "item_id": list(latest),
            "plan_key": [v[0] for v in latest.values()],
            "status": [v[1] for v in latest.values()],
            "version": [v[2] for v in latest.values()],
        },
        schema=INDEX_SCHEMA,
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(uri, buffer.getvalue())
    return table.num_rows

