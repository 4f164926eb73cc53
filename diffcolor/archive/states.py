"""Colour-state files: the one object a new-prompt render needs, its readable copy, and its diffusers LoRA.

A colour state (docs/DESIGN.md §3.4) is made by the method as one
safetensors object whose header metadata holds its JSON description under
the ``diffcolor`` key. The archive stores it as bytes under the item's state
folder (``PREFIX/state``):

    lora/pytorch_lora_weights.safetensors  the adapter as a diffusers LoRA file (LoRA mode only)
    color-state.safetensors                the state itself: the commit point
    state.json                             the description again, for people and tools

in that order. The LoRA file comes first and the state object, published
whole, second: a reader that sees a state sees its LoRA (``load_lora_weights``
on the ``lora`` folder loads it). The state's description names, in its
``manifest``, the LoRA's path relative to the state folder and its sha256
(:mod:`diffcolor.method.state`), so a LoRA that is not the state's (a re-fit
that stopped after writing its LoRA, before its state) is detected by
:func:`read_state_lora` instead of being used. A full fine-tune's state has no
LoRA file (its manifest says ``full-unet``). Reading the description needs the
header only, not the tensors.
"""

from __future__ import annotations

from diffcolor.archive import storage
from diffcolor.archive.layout import STATE_DESCRIPTION, STATE_FILE
from diffcolor.common.errors import InputUnavailableError, StateError
from diffcolor.common.keys import sha256_hex
from diffcolor.common.tensorfiles import read_description


def state_description(data: bytes, name: str = "colour state") -> dict:
    """The JSON description in a colour state's header. Raises StateError naming ``name`` when it has none."""
    try:
        return read_description(data)
    except ValueError as error:
        raise StateError(f"{name} has no readable description: {error}") from None


def lora_manifest(description: dict, name: str = "colour state") -> dict | None:
    """The LoRA file a state's description names: ``{"path", "sha256", ...}``; None when it names none.

    None for a full fine-tune (layout ``full-unet``) and for a state made
    before manifests. Raises StateError naming ``name`` when the manifest names
    a LoRA without a sha256, or a path that is not a plain relative path inside
    the state folder.
    """
    manifest = description.get("manifest")
    if manifest is None:
        return None
    adapter = manifest.get("adapter") if isinstance(manifest, dict) else None
    if not isinstance(adapter, dict):
        raise StateError(f"{name}: its manifest has no adapter block")
    if adapter.get("path") is None:
        return None
    path, sha256 = adapter["path"], adapter.get("sha256")
    parts = path.split("/") if isinstance(path, str) else []
    if not parts or any(part in ("", ".", "..") or "\\" in part for part in parts):
        raise StateError(f"{name}: its manifest's LoRA path {path!r} is not a relative path inside the state folder")
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise StateError(f"{name}: its manifest names the LoRA {path!r} without a sha256")
    return adapter


def publish_state(folder: str, data: bytes, lora: bytes | None = None) -> str:
    """Publishes a colour state under the storage folder ``folder``; returns the state's URI.

    ``lora`` is the state's diffusers LoRA file (from
    :func:`diffcolor.method.state.export_state`): it is published first, at the
    path the state's manifest names, then the state object (the commit
    point), then ``state.json``. A LoRA file an earlier state named that this
    one does not (a LoRA fit replaced by a full one) is removed afterwards.
    A state whose manifest names no LoRA (a full fine-tune, or a state made
    before manifests) is published without one.

    Raises StateError, before anything is written, when ``data`` carries no
    description, or ``lora`` does not match the manifest: given when it
    names none, missing when it names one, or of another sha256.
    """
    # 1. Check the state and its LoRA against each other before writing anything.
    uri = storage.join(folder, STATE_FILE)
    description = state_description(data, f"colour state for '{uri}'")
    named = lora_manifest(description, f"colour state for '{uri}'")
    if lora is None and named is not None:
        raise StateError(f"colour state for '{uri}' names the LoRA {named['path']!r}, which was not given to publish")
    if lora is not None:
        if named is None:
            raise StateError(f"colour state for '{uri}' names no LoRA file, but one was given to publish with it")
        if sha256_hex(lora) != named["sha256"]:
            raise StateError(f"the LoRA given for '{uri}' has sha256 {sha256_hex(lora)}, its state names "
                             f"{named['sha256']}")
    previous = _previous_lora_path(folder)

    # 2. The LoRA, then the state (the commit point), then its readable copy.
    written = None
    if lora is not None:
        written = named["path"]
        storage.write_bytes(storage.join(folder, written), lora)
    storage.write_bytes(uri, data)
    storage.write_json(storage.join(folder, STATE_DESCRIPTION), description)

    # 3. A LoRA the previous state named and this one does not is no longer any state's.
    if previous is not None and previous != (named or {}).get("path"):
        storage.remove(storage.join(folder, previous))
    return uri


def _previous_lora_path(folder: str) -> str | None:
    """The LoRA path the stored ``state.json`` names, if any (only to clean up after a replacement)."""
    readable = storage.join(folder, STATE_DESCRIPTION)
    if not storage.exists(readable):
        return None
    try:
        named = lora_manifest(storage.read_json(readable), readable)
    except (ValueError, StateError):  # an unreadable copy names nothing we could safely remove
        return None
    return None if named is None else named["path"]


def read_state(folder: str) -> bytes:
    """The state bytes under ``folder``. Raises StateError when there is none."""
    uri = storage.join(folder, STATE_FILE)
    try:
        return storage.read_bytes(uri)
    except InputUnavailableError as error:
        raise StateError(f"no colour state at '{uri}'") from error


def read_state_lora(folder: str, data: bytes | None = None) -> tuple[str, bytes] | None:
    """The diffusers LoRA file of the colour state under ``folder``, checked: its URI and bytes.

    ``data`` is the state's bytes when the caller holds them (else they are
    read). Returns None when the state has no LoRA file (a full fine-tune, or a
    state made before manifests). Raises StateError when there is no state,
    or the LoRA its manifest names is missing or has another sha256 (not this
    state's LoRA: a re-fit stopped between its two writes; fit the item again).
    """
    state_uri = storage.join(folder, STATE_FILE)
    description = state_description(read_state(folder) if data is None else data, f"colour state '{state_uri}'")
    named = lora_manifest(description, f"colour state '{state_uri}'")
    if named is None:
        return None
    uri = storage.join(folder, named["path"])
    try:
        lora = storage.read_bytes(uri)
    except InputUnavailableError as error:
        raise StateError(f"colour state '{state_uri}' names the LoRA '{uri}', which is missing") from error
    if sha256_hex(lora) != named["sha256"]:
        raise StateError(f"LoRA '{uri}' has sha256 {sha256_hex(lora)}, but its colour state names {named['sha256']}: "
                         "it is not this state's LoRA (a re-fit stopped between writing its LoRA and its state)")
    return uri, lora


def restore_state_lora(folder: str, data: bytes, lora: bytes) -> str:
    """Writes the LoRA file the state ``data`` under ``folder`` names, from ``lora``; returns its URI.

    For a stored state whose LoRA is missing or not its own (a re-fit stopped
    between its two writes): the state's adapter gives the same LoRA bytes
    again. Raises StateError, writing nothing, when ``lora`` is not the one
    the manifest names.
    """
    state_uri = storage.join(folder, STATE_FILE)
    named = lora_manifest(state_description(data, f"colour state '{state_uri}'"), f"colour state '{state_uri}'")
    if named is None or sha256_hex(lora) != named["sha256"]:
        raise StateError(f"the LoRA given for '{state_uri}' is not the one its manifest names")
    uri = storage.join(folder, named["path"])
    storage.write_bytes(uri, lora)
    return uri


def has_state(folder: str) -> bool:
    """Whether a colour state is stored under ``folder``."""
    return storage.exists(storage.join(folder, STATE_FILE))
