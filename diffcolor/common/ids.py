"""The item-id rule: an id is a safe path component, everywhere an id enters.

Item ids name folders under the output root (``OUTPUT/items/ITEM_ID/``), so an
id must never climb out of it, hide, or be refused by a file system. Ids
coming from a manifest, the command line, a targets file or a form are all
normalised (NFC, surrounding whitespace stripped) and checked by the same
rule; nothing else is rewritten, so an archive's own identifiers survive.
Builders that derive ids from file names or URLs use :func:`safe_item_id`.
"""

from __future__ import annotations

import re
import unicodedata

from diffcolor.common.errors import PermanentError

MAX_ITEM_ID_BYTES = 200  # UTF-8 bytes; under the 255-byte file-name limit of common file systems

_ID_PUNCTUATION = frozenset("-_.~")
_WINDOWS_DEVICE_NAMES = frozenset(
    ["con", "prn", "aux", "nul"] + [f"com{i}" for i in range(1, 10)] + [f"lpt{i}" for i in range(1, 10)]
)
_PLAIN_ID = re.compile(r"[A-Za-z0-9_~-](?:[A-Za-z0-9._~-]{0,198}[A-Za-z0-9_~-])?")  # ASCII ids that pass every rule


class UnsafeItemIdError(PermanentError):
    """An item id that is not a safe path component (``../../etc``, ``CON``, an empty id, ...)."""

    error_class = "bad_item_id"


def item_id_problem(item_id: str) -> str | None:
    """Why ``item_id`` (already NFC-normalised and stripped) is not a safe path component; None when it is.

    The rule: non-empty; at most 200 UTF-8 bytes; only letters, combining
    marks, decimal digits (any script) and ``- _ . ~``; no leading ``.`` (so
    neither ``.`` nor ``..``), no trailing ``.``; not a Windows device name
    (``CON``, ``NUL``, ``COM1``, ... with or without an extension).
    """
    if _PLAIN_ID.fullmatch(item_id) and item_id.split(".", 1)[0].lower() not in _WINDOWS_DEVICE_NAMES:
        return None  # the common case, decided without a per-character loop
    if not item_id:
        return "is empty"
    for separator in ("/", "\\"):
        if separator in item_id:
            return f"contains {separator!r}, a path separator"
    for char in item_id:
        if unicodedata.category(char) in ("Cc", "Cs", "Co", "Cn") or char == "\x00":
            return f"contains the control character U+{ord(char):04X}"
    if item_id.startswith("."):
        return "starts with '.' (a hidden file, or '.'/'..' folder)"
    if item_id.endswith("."):
        return "ends with '.', which Windows drops from file names"
    for char in item_id:
        if not _is_id_char(char):
            return f"contains {char!r}; allowed are letters, digits, '-', '_', '.' and '~'"
    if item_id.split(".", 1)[0].lower() in _WINDOWS_DEVICE_NAMES:
        return "is a reserved device name on Windows"
    size = len(item_id.encode("utf-8"))
    if size > MAX_ITEM_ID_BYTES:
        return f"is {size} bytes long in UTF-8; the limit is {MAX_ITEM_ID_BYTES}"
    return None


def _is_id_char(char: str) -> bool:
    if char in _ID_PUNCTUATION:
        return True
    category = unicodedata.category(char)
    return category[0] in "LM" or category == "Nd"


def normalize_item_id(raw: str) -> str:
    """The item id of ``raw``: NFC-normalised and stripped of surrounding whitespace.

    Nothing else is rewritten: raises UnsafeItemIdError, naming the id and the
    reason, when the result is not a safe path component (see
    :func:`item_id_problem`), e.g. for ``../../etc``.
    """
    if not isinstance(raw, str):
        raise UnsafeItemIdError(f"item_id must be text, got {type(raw).__name__} {raw!r}")
    item_id = unicodedata.normalize("NFC", raw).strip()
    reason = item_id_problem(item_id)
    if reason is not None:
        raise UnsafeItemIdError(f"unsafe item_id {raw!r}: {reason}")
    return item_id


def safe_item_id(name: str) -> str:
    """A safe item id derived from a file name or URL segment (builders only; validation never rewrites).

    NFC; each run of characters outside the id alphabet becomes ``-``; leading
    and trailing ``-`` and ``.`` are dropped; cut to 200 UTF-8 bytes; a Windows
    device name gets a ``_`` appended; nothing left gives ``item``.
    E.g. ``"Scan 0001 (recto)"`` -> ``"Scan-0001-recto"``.
    """
    text = unicodedata.normalize("NFC", name)
    text = "".join(char if _is_id_char(char) else " " for char in text)
    text = re.sub(r"\s+", "-", text.strip())
    text = text.strip("-.")
    encoded = text.encode("utf-8")[:MAX_ITEM_ID_BYTES]
    text = encoded.decode("utf-8", errors="ignore").strip("-.")
    if not text:
        text = "item"
    if text.split(".", 1)[0].lower() in _WINDOWS_DEVICE_NAMES:
        text = text + "_"
    return text
