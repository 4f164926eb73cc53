"""Colour-state files: the one object a new-prompt render needs, and its readable copy.

A colour state (spec section 3, stage 2) is made by the method as one
safetensors object whose header metadata holds its JSON description under
the ``diffcolor`` key. The archive stores it as bytes: published whole under
``PREFIX/state/color-state.safetensors`` (so a reader sees the old state or
the new one), then ``state.json`` beside it, the description again, for people
and tools. Reading the description needs the header only, not the tensors.
"""

from __future__ import annotations

from diffcolor.archive import storage
from diffcolor.archive.items import STATE_FILE
from diffcolor.common.errors import InputUnavailableError, StateError
from diffcolor.common.tensorfiles import read_description

DESCRIPTION_FILE = "state.json"


def state_description(data: bytes, name: str = "colour state") -> dict:
    """The JSON description in a colour state's header. Raises StateError naming ``name`` when it has none."""
    try:
        return read_description(data)
    except ValueError as error:
        raise StateError(f"{name} has no readable description: {error}") from None


def publish_state(folder: str, data: bytes) -> str:
    """Publishes the state bytes under the storage folder ``folder``, then ``state.json``; returns the state's URI.

    Raises StateError when ``data`` carries no description (nothing is written).
    """
    uri = storage.join(folder, STATE_FILE)
    description = state_description(data, f"colour state for '{uri}'")
    storage.write_bytes(uri, data)
    storage.write_json(storage.join(folder, DESCRIPTION_FILE), description)
    return uri


def read_state(folder: str) -> bytes:
    """The state bytes under ``folder``. Raises StateError when there is none."""
    uri = storage.join(folder, STATE_FILE)
    try:
        return storage.read_bytes(uri)
    except InputUnavailableError as error:
        raise StateError(f"no colour state at '{uri}'") from error


def has_state(folder: str) -> bool:
    """Whether a colour state is stored under ``folder``."""
    return storage.exists(storage.join(folder, STATE_FILE))
