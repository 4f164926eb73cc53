"""The hashes that decide what is already done (docs/DESIGN.md §4.6, "Idempotency").

- the **cache key** of an item: image bytes, caption, targets, colour map,
  seed, configuration and model hash; a record with the same key is the same
  work, so a rerun skips it;
- the **state key**: only what the fit depends on (not the targets or the
  render), so new targets reuse a stored colour state;
- the **plan key**: the cache key's content computable from a manifest row
  alone (the image's URI, not its bytes), so planning a nightly run touches no
  item's objects; the worker still checks the full cache key before any GPU
  work.

Every key is the sha256 of a JSON list (keys sorted, non-JSON values as text),
so a key never depends on dict order or on the Python process.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
from operator import attrgetter
from typing import Sequence

from diffcolor.common.items import ItemRequest


_JSON = json.JSONEncoder(sort_keys=True, default=str)  # json.dumps(value, sort_keys=True, default=str) builds one a call
_STRING = json.encoder.encode_basestring_ascii  # how _JSON writes a str


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def hash_json(value) -> str:
    """The sha256 of ``value`` as canonical JSON (sorted keys; other types as their text)."""
    return sha256_hex(_JSON.encode(value).encode())


def config_hash(config_dict: dict) -> str:
    """Hash of a pipeline configuration (``PipelineConfig.to_dict()``)."""
    return hash_json(config_dict)


def cache_key(source_sha256: str, request: ItemRequest, config_dict: dict, model_hash: str) -> str:
    """The item's cache key: image bytes, caption, targets, colour map, seed, configuration, models."""
    return hash_json(
        [source_sha256, request.caption, list(request.targets), dict(sorted(request.color_map.items())),
         int(request.seed), config_dict, model_hash, bool(request.force)]
    )


def state_key(source_sha256: str, caption: str, seed: int, config_dict: dict, model_hash: str) -> str:
    """Identifies a colour state: what the fit depends on (model resolution, stage 1, alignment, stage 2)."""
    fit = {key: config_dict[key] for key in ("model_pixels", "stage1", "align", "stage2")}
    return hash_json([source_sha256, caption, int(seed), fit, model_hash])


def plan_key(request: ItemRequest, config_hash: str, model_hash: str) -> str:
    """The cheap per-row key: no image bytes read (the ``image_sha256``/``image_etag`` catalogue column counts)."""
    catalogue = request.catalogue or {}
    return hash_json([
        request.item_id, request.source_uri, request.caption, list(request.targets),
        dict(sorted(request.color_map.items())), int(request.seed), bool(request.force),
        catalogue.get("image_sha256"), catalogue.get("image_etag"), config_hash, model_hash,
    ])


def plan_keys(requests: Sequence[ItemRequest], config_hash: str, model_hash: str) -> list[str]:
    """:func:`plan_key` of each of ``requests``, byte for byte, computed column by column.

    A plan key is the sha256 of a JSON list; the JSON text of a list is its
    elements' texts joined by ``", "`` in brackets. So each field is encoded
    for the whole batch at once (a string by the encoder's own C function, the
    rare other value by the encoder itself), the rows are joined by C-level
    ``map``, and the constant tail (configuration and model hash) is encoded
    once. Only the sha256 is per row.
    """
    def text(values: list) -> list[str]:
        try:
            return list(map(_STRING, values))  # all str: the common case, one C-level pass
        except TypeError:  # a None or another type somewhere: as the encoder writes each
            return [_STRING(value) if isinstance(value, str) else "null" if value is None else _JSON.encode(value)
                    for value in values]

    def field(name: str) -> list:
        return list(map(attrgetter(name), requests))

    catalogues = [request.catalogue or {} for request in requests]
    columns = [
        text(field("item_id")), text(field("source_uri")), text(field("caption")),
        ["[]" if not value else _JSON.encode(list(value)) for value in field("targets")],
        ["{}" if not value else _JSON.encode(dict(sorted(value.items()))) for value in field("color_map")],
        [str(int(seed)) for seed in field("seed")],
        ["true" if force else "false" for force in field("force")],
        text([catalogue.get("image_sha256") for catalogue in catalogues]),
        text([catalogue.get("image_etag") for catalogue in catalogues]),
    ]
    tail = (", " + _JSON.encode([config_hash, model_hash])[1:]).encode()
    return [hashlib.sha256(b"[" + row.encode() + tail).hexdigest() for row in map(", ".join, zip(*columns))]


def render_key(source_sha256: str, state_key: str | None, prompt: str, render_dict: dict, seed: int) -> str:
    """Identifies a render from a stored colour state: the state, the prompt, the render settings, the seed."""
    return hash_json([source_sha256, state_key, prompt, render_dict, seed])


def version_key(item_cache_key: str, index: int, target: str | None, color_map: dict | None) -> str:
    """Identifies one version's work within an item's request: the item's cache key and which target it renders."""
    return hash_json([item_cache_key, int(index), target, dict(sorted((color_map or {}).items()))])
