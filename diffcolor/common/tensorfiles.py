"""The header of a safetensors file, read without loading a tensor (and without torch).

A safetensors file is an 8-byte little-endian header length, a JSON header
(each tensor's dtype, shape and byte range, plus an optional ``__metadata__``
object of strings), then the raw tensor bytes. Colour states, loop
checkpoints and eval features keep their description as JSON text in that
metadata, so the archive, the method and the tools read it here, the one
place that parses the header. Nothing is ever unpickled.
"""

from __future__ import annotations

import json

HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header
# Colour states and loop checkpoints keep their JSON description in the header metadata under this key.
DESCRIPTION_KEY = "diffcolor"


def read_header(data: bytes) -> dict:
    """The JSON header of the safetensors bytes ``data``.

    Raises ValueError when ``data`` is too short or its header is not a JSON object.
    """
    if len(data) < HEADER_LENGTH_BYTES:
        raise ValueError(f"not a safetensors file: {len(data)} bytes, shorter than its header length field")
    length = int.from_bytes(data[:HEADER_LENGTH_BYTES], "little")
    if length > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + length > len(data):
        raise ValueError(f"not a safetensors file: header length {length} does not fit its {len(data)} bytes")
    try:
        header = json.loads(data[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not a safetensors file: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: its header is not a JSON object")
    return header


def read_metadata(data: bytes) -> dict[str, str]:
    """The string metadata (``__metadata__``) of the safetensors bytes ``data``; empty when it has none.

    Raises ValueError as :func:`read_header` does.
    """
    metadata = read_header(data).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("not a safetensors file: its __metadata__ is not an object")
    return metadata


def read_description(data: bytes) -> dict:
    """The JSON description our files keep in their header metadata under :data:`DESCRIPTION_KEY`.

    Raises ValueError when ``data`` is no safetensors file, or has no such description.
    """
    text = read_metadata(data).get(DESCRIPTION_KEY)
    if not isinstance(text, str):
        raise ValueError(f"the safetensors header has no {DESCRIPTION_KEY!r} description")
    try:
        description = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"the {DESCRIPTION_KEY!r} description is not JSON ({error})") from None
    if not isinstance(description, dict):
        raise ValueError(f"the {DESCRIPTION_KEY!r} description is not a JSON object")
    return description
