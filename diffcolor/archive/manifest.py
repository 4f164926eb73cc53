"""Manifests: the Parquet table that says which photographs a run colourises, and how.

One row per item. Required columns: ``item_id``, ``image_uri``, ``caption``;
optional known columns: ``target_prompts``, ``color_map``, ``seed``,
``collection``, ``ground_truth_uri``; every other column is a catalogue field
(accession number, creator, rights, ...) carried through as text. The schema,
the id rule and the conventions are documented in ``manifests/README.md``.

A manifest is validated before any GPU work (spec sections 4 and 9): every
problem is reported with its row and column, and the run does not start.
Rows are numbered from 1: row 1 is the first data row (a spreadsheet shows it
on line 2, under the header). Validation and reading stream the Parquet file in
record batches, so a million-row manifest is checked in bounded memory (only
the set of ids is held).

Builders turn a folder of images with a captions CSV/JSON, a catalogue CSV
export, or a IIIF Presentation 3 manifest into a manifest table. All I/O goes
through :mod:`diffcolor.archive.storage`, by fsspec URI.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, time
from html.parser import HTMLParser
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from diffcolor.archive import storage
from diffcolor.common.errors import InputUnavailableError, PermanentError, PromptError, StorageError
from diffcolor.pipeline import ItemRequest

REQUIRED_COLUMNS = ("item_id", "image_uri", "caption")
OPTIONAL_COLUMNS = ("target_prompts", "color_map", "seed", "collection", "ground_truth_uri")
KNOWN_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string()),  # unique, a safe path component after NFC + strip
        pa.field("image_uri", pa.string()),  # fsspec URI; relative: against the manifest's folder
        pa.field("caption", pa.string()),  # the catalogue caption: DiffColor's context prompt
        pa.field("target_prompts", pa.list_(pa.string())),  # free target prompts, one version each
        pa.field("color_map", pa.map_(pa.string(), pa.string())),  # caption word -> colour, one more version
        pa.field("seed", pa.int64()),  # null: DEFAULT_SEED
        pa.field("collection", pa.string()),  # carried into the catalogue fields
        pa.field("ground_truth_uri", pa.string()),  # a colour ground truth, for evaluation only
    ],
    metadata={"diffcolor.manifest": "1"},
)

DEFAULT_SEED = 0  # ours: a null or absent seed means 0, as `diffcolor colorize` defaults to
MAX_SEED = 2**63 - 1  # int64, non-negative
MAX_ITEM_ID_BYTES = 200  # UTF-8 bytes; under the 255-byte file-name limit of common file systems
MAX_PROBLEMS = 1000  # problems listed in full; the rest are counted in one final problem
ROW_GROUP_ROWS = 65_536  # rows per Parquet row group written, so readers stream in small pieces
IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".webp")  # images.py's allowlist

_ID_PUNCTUATION = frozenset("-_.~")
_WINDOWS_DEVICE_NAMES = frozenset(
    ["con", "prn", "aux", "nul"] + [f"com{i}" for i in range(1, 10)] + [f"lpt{i}" for i in range(1, 10)]
)
_PLAIN_ID = re.compile(r"[A-Za-z0-9_~-](?:[A-Za-z0-9._~-]{0,198}[A-Za-z0-9_~-])?")  # ASCII ids that pass every rule
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


# ---------------------------------------------------------------------------
# Problems and the error that carries them


@dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong with a manifest. ``row`` is 1-based (row 1 = first data row); None: the whole file."""

    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class ManifestError(PermanentError):
    """A manifest (or a builder's input) is invalid; ``problems`` lists every problem found."""

    error_class = "bad_manifest"

    def __init__(self, problems: list[ManifestProblem], uri: str | None = None):
        self.problems = list(problems)
        self.uri = uri
        name = f"manifest {uri!r}" if uri else "manifest"
        count = problem_count(self.problems)
        if count == 1:
            summary = f"{name} has 1 problem: {self.problems[0]}"
        else:
            summary = f"{name} has {count} problems; first: {self.problems[0] if self.problems else '-'}"
        super().__init__(summary)

    def __reduce__(self):
        # Exceptions pickle their args by default; ours are (problems, uri), so
        # a ManifestError survives crossing a process boundary (workers, Ray).
        return (type(self), (self.problems, self.uri))


def problem_count(problems: list[ManifestProblem]) -> int:
    """How many problems ``problems`` stands for, counting a final "... and N more problems"."""
    if problems:
        more = re.fullmatch(r"\.\.\. and (\d+) more problems", problems[-1].message)
        if more and problems[-1].row is None:
            return len(problems) - 1 + int(more.group(1))
    return len(problems)


class _Problems:
    """Collects problems up to MAX_PROBLEMS and counts the rest."""

    def __init__(self, limit: int = MAX_PROBLEMS):
        self.limit = limit
        self.items: list[ManifestProblem] = []
        self.more = 0

    def add(self, row: int | None, column: str | None, message: str) -> None:
        if len(self.items) < self.limit:
            self.items.append(ManifestProblem(row, column, message))
        else:
            self.more += 1

    def result(self, by_row: bool = False) -> list[ManifestProblem]:
        items = sorted(self.items, key=lambda p: (p.row is not None, p.row or 0)) if by_row else list(self.items)
        if self.more:
            items.append(ManifestProblem(None, None, f"... and {self.more} more problems"))
        return items


# ---------------------------------------------------------------------------
# Item ids


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

    Nothing else is rewritten: raises ManifestError when the result is not a
    safe path component (see :func:`item_id_problem`), e.g. for ``../../etc``.
    """
    if not isinstance(raw, str):
        raise ManifestError([ManifestProblem(None, "item_id", f"item_id must be text, got {type(raw).__name__} {raw!r}")])
    item_id = unicodedata.normalize("NFC", raw).strip()
    reason = item_id_problem(item_id)
    if reason is not None:
        raise ManifestError([ManifestProblem(None, "item_id", f"unsafe item_id {raw!r}: {reason}")])
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


def _unique_ids(candidates: list[str]) -> list[str]:
    """Makes ids unique (case-insensitively) by appending -2, -3, ... to later repeats, in order."""
    taken: set[str] = set()
    result = []
    for candidate in candidates:
        item_id, counter = candidate, 1
        while item_id.casefold() in taken:
            counter += 1
            item_id = f"{candidate}-{counter}"
        taken.add(item_id.casefold())
        result.append(item_id)
    return result


# ---------------------------------------------------------------------------
# Column types


def _type_test(name: str):
    # View types arrived in pyarrow 16; with an older pyarrow nothing is one.
    return getattr(pa.types, name, lambda data_type: False)


def _is_text(data_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(data_type):
        return _is_text(data_type.value_type)
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or _type_test("is_string_view")(data_type)


def _is_list(data_type: pa.DataType) -> bool:
    return (
        pa.types.is_list(data_type)
        or pa.types.is_large_list(data_type)
        or pa.types.is_fixed_size_list(data_type)
        or _type_test("is_list_view")(data_type)
        or _type_test("is_large_list_view")(data_type)
    )


def _color_map_kind(data_type: pa.DataType) -> str | None:
    """'map' (canonical), 'pairs' (list of key/value structs), 'json' (JSON object text), or None."""
    if pa.types.is_map(data_type) and _is_text(data_type.key_type) and _is_text(data_type.item_type):
        return "map"
    if _is_list(data_type) and pa.types.is_struct(data_type.value_type):
        struct = data_type.value_type
        names = {struct.field(i).name: struct.field(i).type for i in range(struct.num_fields)}
        if set(names) == {"key", "value"} and all(_is_text(t) for t in names.values()):
            return "pairs"
    if _is_text(data_type):
        return "json"
    return None


_EXPECTED = {
    "item_id": "string",
    "image_uri": "string",
    "caption": "string",
    "collection": "string",
    "ground_truth_uri": "string",
    "target_prompts": "list<string>",
    "color_map": "map<string, string> (or a list of key/value string structs, or JSON object text)",
    "seed": "an integer type (int64)",
}


def _known_type_ok(name: str, data_type: pa.DataType) -> bool:
    if pa.types.is_null(data_type):  # an all-null optional column
        return name in OPTIONAL_COLUMNS
    if name in ("item_id", "image_uri", "caption", "collection", "ground_truth_uri"):
        return _is_text(data_type)
    if name == "target_prompts":
        return _is_list(data_type) and _is_text(data_type.value_type)
    if name == "color_map":
        return _color_map_kind(data_type) is not None
    if name == "seed":
        return pa.types.is_integer(data_type)
    raise AssertionError(name)


def _catalogue_type_ok(data_type: pa.DataType) -> bool:
    return not (
        pa.types.is_binary(data_type)
        or pa.types.is_large_binary(data_type)
        or pa.types.is_fixed_size_binary(data_type)
        or _type_test("is_binary_view")(data_type)
    )


def _check_schema(schema: pa.Schema, problems: _Problems) -> set[str]:
    """Adds the file-level problems of ``schema``; returns the known columns whose values can be checked."""
    names = schema.names
    for name in sorted(set(names)):
        if names.count(name) > 1:
            problems.add(None, name, f"column appears {names.count(name)} times")
    if "" in names:
        problems.add(None, None, "a column has an empty name")
    for name in REQUIRED_COLUMNS:
        if name not in names:
            problems.add(None, name, f"required column missing (columns found: {', '.join(names) or 'none'})")
    checkable = set()
    for name in KNOWN_COLUMNS:
        if name not in names or names.count(name) > 1:
            continue
        data_type = schema.field(name).type
        if _known_type_ok(name, data_type):
            if not pa.types.is_null(data_type):
                checkable.add(name)
        elif pa.types.is_null(data_type):
            problems.add(None, name, f"has type null (no values at all); expected {_EXPECTED[name]}")
        else:
            problems.add(None, name, f"has type {data_type}; expected {_EXPECTED[name]}")
    for field in schema:
        if field.name not in KNOWN_COLUMNS and not _catalogue_type_ok(field.type):
            problems.add(None, field.name, f"catalogue column has type {field.type}; catalogue fields must be text, numbers, dates or lists")
    return checkable


# ---------------------------------------------------------------------------
# Values


def _color_map_pairs(value: Any, kind: str) -> list[tuple[Any, Any]] | str:
    """The (key, colour) pairs of one color_map cell; a message when the cell is malformed."""
    if kind == "map":
        return list(value)
    if kind == "pairs":
        return [(pair.get("key") if pair else None, pair.get("value") if pair else None) for pair in value]
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        return f"color_map is not valid JSON ({error.msg} at character {error.pos})"
    if not isinstance(parsed, dict):
        return 'color_map must be a JSON object of strings, like {"dog": "brown"}'
    return list(parsed.items())


class _RowChecker:
    """The row-level checks, fed batch by batch; holds the ids seen so far (casefolded -> row)."""

    def __init__(self, checkable: set[str], schema: pa.Schema, problems: _Problems):
        self.checkable = checkable
        self.color_map_kind = _color_map_kind(schema.field("color_map").type) if "color_map" in checkable else None
        self.problems = problems
        self.ids: dict[str, int] = {}
        self._stage2 = None

    def _caption_words(self):
        # The caption rules are stage 2's (rewrite_caption, build_target_prompt),
        # imported when first needed: torch comes with them.
        if self._stage2 is None:
            from diffcolor.method import stage2

            self._stage2 = stage2
        return self._stage2

    def check(self, columns: dict[str, list], first_row: int, count: int) -> None:
        add = self.problems.add
        for index in range(count):
            row = first_row + index
            # 1. item_id: present, safe, unique.
            if "item_id" in columns:
                raw = columns["item_id"][index]
                item_id = unicodedata.normalize("NFC", raw).strip() if raw is not None else ""
                if not item_id:
                    add(row, "item_id", "empty item_id")
                else:
                    reason = item_id_problem(item_id)
                    if reason is not None:
                        add(row, "item_id", f"unsafe item_id {raw!r}: {reason}")
                    key = item_id.casefold()
                    first = self.ids.get(key)
                    if first is None:
                        self.ids[key] = row
                    else:
                        add(row, "item_id", f"duplicate item_id {item_id!r}: row {first} has the same id (letter case ignored)")
            # 2. image_uri.
            if "image_uri" in columns:
                uri = columns["image_uri"][index]
                if uri is None or not uri.strip():
                    add(row, "image_uri", "empty image_uri")
            # 3. caption: non-empty, with a content word (stage 2 needs one).
            caption = None
            if "caption" in columns:
                text = columns["caption"][index]
                if text is None or not text.strip():
                    add(row, "caption", "empty caption")
                else:
                    try:
                        caption = self._caption_words().rewrite_caption(text.strip())
                    except PromptError as error:
                        add(row, "caption", str(error))
            # 4. target_prompts: each entry non-empty.
            if "target_prompts" in columns:
                for number, prompt in enumerate(columns["target_prompts"][index] or (), start=1):
                    if prompt is None or not prompt.strip():
                        add(row, "target_prompts", f"target prompt {number} is empty")
            # 5. color_map: well-formed, non-empty words and colours, keys that are content words of the caption.
            if "color_map" in columns and columns["color_map"][index] is not None:
                self._check_color_map(row, columns["color_map"][index], caption)
            # 6. seed: null (the default) or 0 .. 2**63-1.
            if "seed" in columns:
                seed = columns["seed"][index]
                if seed is not None and not 0 <= seed <= MAX_SEED:
                    add(row, "seed", f"seed {seed} is out of range; use 0 to {MAX_SEED}, or null for the default ({DEFAULT_SEED})")
            # 7. ground_truth_uri: null, or a non-empty URI.
            if "ground_truth_uri" in columns:
                uri = columns["ground_truth_uri"][index]
                if uri is not None and not uri.strip():
                    add(row, "ground_truth_uri", "empty ground_truth_uri; use null when there is none")

    def _check_color_map(self, row: int, value: Any, caption) -> None:
        pairs = _color_map_pairs(value, self.color_map_kind)
        if isinstance(pairs, str):
            self.problems.add(row, "color_map", pairs)
            return
        seen: set[str] = set()
        clean: dict[str, str] = {}
        for key, colour in pairs:
            if not isinstance(key, str) or not key.strip():
                self.problems.add(row, "color_map", f"empty word in color_map (colour {colour!r})")
                continue
            if not isinstance(colour, str) or not colour.strip():
                self.problems.add(row, "color_map", f"empty colour for {key!r} in color_map")
                continue
            folded = key.strip().lower()
            if folded in seen:
                self.problems.add(row, "color_map", f"word {key!r} appears twice in color_map")
                continue
            seen.add(folded)
            clean[key] = colour
        if caption is not None and clean:
            try:
                self._caption_words().build_target_prompt(caption, clean)
            except PromptError as error:
                self.problems.add(row, "color_map", str(error))


def _column_values(batch: pa.RecordBatch, name: str) -> list:
    return batch.column(batch.schema.get_field_index(name)).to_pylist()


def _validate(schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> tuple[list[ManifestProblem], dict[str, int]]:
    """Every problem of a manifest given as its schema and record batches; also the ids seen."""
    problems = _Problems()
    checkable = _check_schema(schema, problems)
    checker = _RowChecker(checkable, schema, problems)
    first_row = 1
    for batch in batches:
        columns = {name: _column_values(batch, name) for name in checkable}
        checker.check(columns, first_row, batch.num_rows)
        first_row += batch.num_rows
    return problems.result(), checker.ids


# ---------------------------------------------------------------------------
# Reading


@contextmanager
def _open_parquet(uri: str) -> Iterator[pq.ParquetFile]:
    """The Parquet file at ``uri``, opened through the storage layer's filesystem for streaming reads."""
    fs, path = storage.filesystem(uri)
    try:
        handle = fs.open(path, "rb")
    except (FileNotFoundError, IsADirectoryError) as error:
        raise InputUnavailableError(f"manifest '{uri}' does not exist") from error
    except PermissionError as error:
        raise InputUnavailableError(f"manifest '{uri}' cannot be read: permission denied") from error
    except OSError as error:
        raise StorageError(f"opening manifest '{uri}' failed: {error}") from error
    with handle:
        try:
            parquet = pq.ParquetFile(handle)
        except pa.ArrowInvalid as error:
            raise ManifestError([ManifestProblem(None, None, f"not a readable Parquet file: {error}")], uri) from error
        yield parquet


def _batches(parquet: pq.ParquetFile, uri: str, batch_size: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    try:
        yield from parquet.iter_batches(batch_size=batch_size, columns=columns)
    except pa.ArrowInvalid as error:
        raise ManifestError([ManifestProblem(None, None, f"the Parquet file is corrupt: {error}")], uri) from error


def count_rows(uri: str) -> int:
    """The number of rows of the manifest at ``uri``, from its Parquet footer (no data read)."""
    with _open_parquet(uri) as parquet:
        return parquet.metadata.num_rows


def validate_manifest(uri: str, *, batch_size: int = 65_536) -> list[ManifestProblem]:
    """Every problem of the manifest at ``uri`` (empty when valid), streaming it in record batches.

    Checks: required columns present; each known column's type; item_id
    present, safe (:func:`item_id_problem`) and unique (letter case ignored,
    the repeat names the first row); image_uri and caption non-empty; captions
    with a content word; target prompts non-empty; colour maps well-formed,
    with non-empty words and colours, each word a content word of the caption;
    seed null or in 0..2**63-1; ground_truth_uri null or non-empty. At most
    1000 problems are listed, then one "... and N more problems".
    Raises InputUnavailableError when the file is missing.
    """
    try:
        return _scan(uri, batch_size)[0]
    except ManifestError as error:  # not a Parquet file, or a corrupt one
        return error.problems


def _scan(uri: str, batch_size: int) -> tuple[list[ManifestProblem], dict[str, int]]:
    with _open_parquet(uri) as parquet:
        schema = parquet.schema_arrow
        checked = [name for name in KNOWN_COLUMNS if schema.names.count(name) == 1]
        return _validate(schema, _batches(parquet, uri, batch_size, checked))


def validate_table(table: pa.Table) -> list[ManifestProblem]:
    """Every problem of an in-memory manifest table (same checks as :func:`validate_manifest`)."""
    return _validate(table.schema, table.to_batches())[0]


def resolve_uri(value: str, manifest_uri: str) -> str:
    """``value`` as given when it is a URI or an absolute path, else resolved against the manifest's folder.

    ``demo/camera.png`` in ``manifests/demo.parquet`` is
    ``/abs/path/manifests/demo/camera.png``; in ``s3://b/m/x.parquet`` it is
    ``s3://b/m/demo/camera.png``. ``..`` segments are folded.
    """
    value = value.strip()
    if _SCHEME.match(value) or os.path.isabs(value) or _WINDOWS_DRIVE.match(value):
        return value
    match = _SCHEME.match(manifest_uri)
    if match:
        scheme, rest = match.group(0), manifest_uri[match.end():]
        folder = posixpath.dirname(rest)
        return scheme + posixpath.normpath(posixpath.join(folder, value))
    folder = os.path.dirname(os.path.abspath(manifest_uri))
    return os.path.normpath(os.path.join(folder, value))


def _catalogue_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def read_items(
    uri: str,
    *,
    batch_size: int = 1024,
    items: set[str] | None = None,
    force: bool = False,
    check: bool = True,
) -> Iterator[ItemRequest]:
    """The manifest's rows as ItemRequests, streamed in record batches of ``batch_size`` rows.

    With ``check`` (the default) the manifest is validated first, in a
    separate streaming pass, and ManifestError is raised here, before anything
    is yielded, when it has any problem or when ``items`` names an id that is
    not in the manifest. ``check=False`` is for callers that have just
    validated the same file.

    Each request has the normalised item id; ``source_uri`` (and a
    ``ground_truth_uri``) resolved with :func:`resolve_uri`; the caption and
    targets stripped; ``color_map`` as a dict; ``seed`` (null or absent:
    DEFAULT_SEED); ``catalogue``: every other non-null column as text, plus
    ``collection`` and ``ground_truth_uri`` when set. ``items`` restricts to
    those ids (normalised the same way).
    """
    wanted = {normalize_item_id(item) for item in items} if items is not None else None
    if check:
        problems, ids = _scan(uri, 65_536)
        if wanted is not None:
            missing = sorted(item for item in wanted if item.casefold() not in ids)
            problems += [ManifestProblem(None, "item_id", f"requested item {item!r} is not in the manifest") for item in missing]
        if problems:
            raise ManifestError(problems, uri)
    folded = {item.casefold() for item in wanted} if wanted is not None else None
    return _iter_items(uri, batch_size, folded, force)


def _iter_items(uri: str, batch_size: int, wanted: set[str] | None, force: bool) -> Iterator[ItemRequest]:
    with _open_parquet(uri) as parquet:
        schema = parquet.schema_arrow
        kind = _color_map_kind(schema.field("color_map").type) if "color_map" in schema.names else None
        for batch in _batches(parquet, uri, batch_size, None):
            columns = {name: _column_values(batch, name) for name in batch.schema.names}
            for index in range(batch.num_rows):
                row = {name: values[index] for name, values in columns.items()}
                item_id = unicodedata.normalize("NFC", row["item_id"]).strip()
                if wanted is not None and item_id.casefold() not in wanted:
                    continue
                yield _item_request(row, item_id, uri, kind, force)


def _item_request(row: dict[str, Any], item_id: str, uri: str, kind: str | None, force: bool) -> ItemRequest:
    color_map: dict[str, str] = {}
    if row.get("color_map") is not None:
        pairs = _color_map_pairs(row["color_map"], kind)
        if isinstance(pairs, str):  # only when read without check
            raise ManifestError([ManifestProblem(None, "color_map", f"item {item_id!r}: {pairs}")], uri)
        color_map = {key.strip(): colour.strip() for key, colour in pairs}
    catalogue = {
        name: _catalogue_text(value)
        for name, value in row.items()
        if name not in KNOWN_COLUMNS and value is not None
    }
    if row.get("collection") is not None:
        catalogue["collection"] = row["collection"]
    if row.get("ground_truth_uri") is not None:
        catalogue["ground_truth_uri"] = resolve_uri(row["ground_truth_uri"], uri)
    seed = row.get("seed")
    return ItemRequest(
        item_id=item_id,
        source_uri=resolve_uri(row["image_uri"], uri),
        caption=row["caption"].strip(),
        targets=tuple(prompt.strip() for prompt in row.get("target_prompts") or ()),
        color_map=color_map,
        seed=DEFAULT_SEED if seed is None else int(seed),
        catalogue=catalogue,
        force=force,
    )


# ---------------------------------------------------------------------------
# Writing and the shared row format of the builders


def write_manifest(table: pa.Table, uri: str) -> None:
    """Validates ``table`` and publishes it as Parquet at ``uri`` (atomically, through storage).

    Raises ManifestError, writing nothing, when the table has any problem.
    """
    problems = validate_table(table)
    if problems:
        raise ManifestError(problems, uri)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_ROWS, compression="zstd")
    storage.write_bytes(uri, buffer.getvalue())


def manifest_table(rows: list[dict[str, Any]], catalogue_columns: list[str]) -> pa.Table:
    """A manifest table in the canonical schema from rows of Python values (not validated).

    Columns: every MANIFEST_SCHEMA column (null where a row lacks it), then
    ``catalogue_columns`` as strings. ``color_map`` values are dicts,
    ``target_prompts`` lists of strings.
    """
    schema = pa.schema(list(MANIFEST_SCHEMA) + [pa.field(name, pa.string()) for name in catalogue_columns],
                       metadata=MANIFEST_SCHEMA.metadata)
    columns = []
    for field in schema:
        values = [row.get(field.name) for row in rows]
        if field.name == "color_map":
            values = [list(value.items()) if value is not None else None for value in values]
        columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


_ALIASES = {
    "id": "item_id",
    "identifier": "item_id",
    "image": "image_uri",
    "image_url": "image_uri",
    "url": "image_uri",
    "file": "image_uri",
    "filename": "image_uri",
    "path": "image_uri",
    "description": "caption",
}


def _header_key(header: str) -> str:
    return re.sub(r"[\s-]+", "_", header.strip().lower())


def _map_headers(headers: list[str], problems: _Problems, aliases: dict[str, str]) -> dict[str, str]:
    """Header -> column name: known columns matched ignoring case, spaces and hyphens; aliases where unambiguous."""
    mapping: dict[str, str] = {}
    for header in headers:
        if not header.strip():
            problems.add(None, None, "a column has an empty header")
        elif headers.count(header) > 1:
            problems.add(None, header, f"column appears {headers.count(header)} times")
        key = _header_key(header)
        mapping[header] = key if key in KNOWN_COLUMNS or key in aliases.values() else header.strip()
    present = set(mapping.values())
    for canonical in set(aliases.values()):
        if canonical in present:
            continue
        candidates = [header for header in headers if aliases.get(_header_key(header)) == canonical]
        if len(candidates) == 1:
            mapping[candidates[0]] = canonical
    return mapping


def _parse_record(record: dict[str, Any], row: int | None, base_uri: str, problems: _Problems) -> dict[str, Any]:
    """One builder row from a CSV record (all text) or a JSON object (native types); empty cells are null.

    ``target_prompts``: a list, or text split on ``|``; ``color_map``: an
    object, or JSON object text; ``seed``: an integer or integer text;
    relative ``image_uri``/``ground_truth_uri``: against ``base_uri``'s folder.
    Other keys are catalogue fields, as text.
    """
    parsed: dict[str, Any] = {}
    for name, value in record.items():
        if value is None or (isinstance(value, str) and not value.strip() and name not in REQUIRED_COLUMNS):
            continue
        if name in ("item_id", "caption", "collection"):
            parsed[name] = value if isinstance(value, str) else _catalogue_text(value)
        elif name in ("image_uri", "ground_truth_uri"):
            text = value if isinstance(value, str) else _catalogue_text(value)
            parsed[name] = resolve_uri(text, base_uri) if text.strip() else text
        elif name == "target_prompts":
            if isinstance(value, str):
                parsed[name] = [part.strip() for part in value.split("|")]
            elif isinstance(value, list) and all(isinstance(part, str) for part in value):
                parsed[name] = value
            else:
                problems.add(row, name, f"target_prompts must be text separated by '|' or a list of strings, got {value!r}")
        elif name == "color_map":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as error:
                    problems.add(row, name, f"color_map is not valid JSON ({error.msg} at character {error.pos}): {value!r}")
                    continue
            if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                parsed[name] = value
            else:
                problems.add(row, name, f'color_map must be a JSON object of strings, like {{"dog": "brown"}}; got {value!r}')
        elif name == "seed":
            try:
                if isinstance(value, bool) or isinstance(value, float):
                    raise ValueError
                seed = int(value.strip()) if isinstance(value, str) else int(value)
            except (TypeError, ValueError):
                problems.add(row, name, f"seed must be an integer, got {value!r}")
                continue
            parsed[name] = seed
        else:
            parsed[name] = _catalogue_text(value)
    return parsed


def _read_csv(uri: str, problems: _Problems, aliases: dict[str, str]) -> tuple[list[str], list[dict[str, str] | None]]:
    """Column names and records (None for a record with no value at all) of a UTF-8 CSV (a BOM is allowed)."""
    text = storage.read_bytes(uri).decode("utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    headers = next(reader, None)
    if headers is None:
        raise ManifestError([ManifestProblem(None, None, "the CSV file is empty")], uri)
    mapping = _map_headers(headers, problems, aliases)
    records: list[dict[str, str] | None] = []
    for number, cells in enumerate(reader, start=1):
        if not any(cell.strip() for cell in cells):
            records.append(None)
            continue
        if len(cells) > len(headers):
            problems.add(number, None, f"{len(cells)} cells but only {len(headers)} column headers")
        records.append({mapping[header]: cells[i] if i < len(cells) else "" for i, header in enumerate(headers)})
    columns = list(dict.fromkeys(mapping[header] for header in headers))
    return columns, records


def _finish(rows: list[dict[str, Any]], row_numbers: list[int | None], labels: list[str | None],
            catalogue_columns: list[str], problems: _Problems, uri: str) -> pa.Table:
    """The table of ``rows``, validated; its problems named by the builder input's own row (and label)."""
    table = manifest_table(rows, catalogue_columns)
    for problem in validate_table(table):
        if problem.row is None:
            problems.add(None, problem.column, problem.message)
            continue
        label = labels[problem.row - 1]
        message = re.sub(r"row (\d+) has", lambda m: _input_row(int(m.group(1)), row_numbers, labels) + " has", problem.message)
        problems.add(row_numbers[problem.row - 1], problem.column, f"{message} ({label})" if label else message)
    result = problems.result(by_row=True)
    if result:
        raise ManifestError(result, uri)
    return table


def _input_row(table_row: int, row_numbers: list[int | None], labels: list[str | None]) -> str:
    """How a builder names a table row to its user: the input's row number, else the image or canvas."""
    number = row_numbers[table_row - 1]
    return f"row {number}" if number is not None else labels[table_row - 1] or f"item {table_row}"


# ---------------------------------------------------------------------------
# Builders


def build_from_folder(folder: str, captions: str | None = None) -> pa.Table:
    """A manifest of the images directly in ``folder`` (allowlisted extensions, sorted by file name).

    Each item id is derived from the file name's stem with :func:`safe_item_id`
    unless the captions file gives an ``item_id``; ``image_uri`` is the file's
    absolute URI. ``captions`` is a CSV (columns ``filename`` or ``item_id``,
    ``caption``, and optionally ``item_id``, ``target_prompts``, ``color_map``,
    ``seed``, ``collection`` and catalogue columns) or a JSON file (an object
    of file name to caption, or a list of objects with the same keys as the
    CSV columns). Raises ManifestError listing every image without a caption,
    every caption row that names no image, two images with the same id, and
    every invalid value.
    """
    problems = _Problems()
    # 1. The images.
    root = folder if _SCHEME.match(folder) else os.path.abspath(folder)
    images = [uri for uri in storage.list_files(root) if posixpath.splitext(uri)[1].lower() in IMAGE_EXTENSIONS]
    if not images:
        raise ManifestError([ManifestProblem(None, None, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{folder}'")], folder)
    names = [posixpath.basename(uri) for uri in images]

    # 2. The captions, keyed by file name or item id.
    if captions is None:
        raise ManifestError([ManifestProblem(None, "caption", f"image '{name}' has no caption (no captions file given)") for name in names], folder)
    records, key_column, catalogue_columns = _read_captions(captions, problems)

    # 3. Item ids: derived from file names, or the captions file's item_id.
    derived = {name: safe_item_id(posixpath.splitext(name)[0]) for name in names}
    by_key: dict[str, tuple[int, dict[str, Any]]] = {}
    for number, record in records:
        key = record.get(key_column)
        if not isinstance(key, str) or not key.strip():
            problems.add(number, key_column, f"empty {key_column}")
        elif key.strip() in by_key:
            problems.add(number, key_column, f"{key_column} {key!r} repeats row {by_key[key.strip()][0]}")
        else:
            by_key[key.strip()] = (number, record)

    # 4. One row per image, in file-name order.
    rows, row_numbers, labels, used = [], [], [], set()
    for uri, name in zip(images, names):
        key = name if key_column == "filename" else derived[name]
        if key not in by_key:
            problems.add(None, "caption", f"image '{name}' has no caption in '{captions}'")
            continue
        number, record = by_key[key]
        used.add(key)
        fields = {k: v for k, v in record.items() if k != "filename"}
        if "image_uri" in fields:
            problems.add(number, "image_uri", "a captions file may not set image_uri; the image is the file")
        parsed = _parse_record(fields, number, captions, problems)
        parsed["item_id"] = parsed.get("item_id") or derived[name]
        parsed["image_uri"] = uri
        rows.append(parsed)
        row_numbers.append(number)
        labels.append(f"image '{name}'")
    for key, (number, _) in by_key.items():
        if key not in used:
            problems.add(number, key_column, f"{key_column} {key!r} names no image in '{folder}'")
    return _finish(rows, row_numbers, labels, catalogue_columns, problems, captions)


def _read_captions(uri: str, problems: _Problems) -> tuple[list[tuple[int | None, dict[str, Any]]], str, list[str]]:
    """(row number, record) pairs of a captions CSV/JSON, the key column ('filename' or 'item_id'), catalogue columns."""
    extension = posixpath.splitext(uri)[1].lower()
    if extension == ".json":
        document = json.loads(storage.read_bytes(uri).decode("utf-8-sig"))
        if isinstance(document, dict):
            return ([(None, {"filename": name, "caption": caption}) for name, caption in document.items()],
                    "filename", [])
        if not isinstance(document, list) or not all(isinstance(entry, dict) for entry in document):
            raise ManifestError([ManifestProblem(None, None, "a captions JSON must be an object (file name -> caption) or a list of objects")], uri)
        columns = list(dict.fromkeys(key for entry in document for key in entry))
        records = list(enumerate(document, start=1))
    elif extension == ".csv":
        columns, raw = _read_csv(uri, problems, {"id": "item_id", "file": "filename", "file_name": "filename"})
        records = [(number, record) for number, record in enumerate(raw, start=1) if record is not None]
    else:
        raise ManifestError([ManifestProblem(None, None, f"captions must be a .csv or .json file, got '{uri}'")], uri)
    key_column = "filename" if "filename" in columns else "item_id" if "item_id" in columns else None
    if key_column is None or "caption" not in columns:
        raise ManifestError([ManifestProblem(None, None, f"captions '{uri}' need a 'filename' or 'item_id' column and a 'caption' column (found: {', '.join(columns)})")], uri)
    catalogue = [name for name in columns if name not in KNOWN_COLUMNS and name != "filename"]
    return records, key_column, catalogue


def build_from_csv(csv_uri: str) -> pa.Table:
    """A manifest from a catalogue CSV export with ``item_id``, ``image_uri`` and ``caption`` columns.

    Headers match the known columns ignoring case, spaces and hyphens
    (``Item ID`` is ``item_id``); where a known column is absent, one
    unambiguous alias stands in (``id``/``identifier`` for item_id;
    ``image``/``image_url``/``url``/``file``/``filename``/``path`` for
    image_uri; ``description`` for caption). ``target_prompts`` is
    ``|``-separated text, ``color_map`` JSON object text, ``seed`` an integer;
    relative image URIs resolve against the CSV's folder; every other column is
    a catalogue field. Ids are not rewritten. Raises ManifestError listing
    every problem with its row (row 1 = first data row).
    """
    problems = _Problems()
    columns, records = _read_csv(csv_uri, problems, _ALIASES)
    for name in REQUIRED_COLUMNS:
        if name not in columns:
            problems.add(None, name, f"required column missing (columns found: {', '.join(columns)})")
    if any(problem.row is None for problem in problems.items):
        raise ManifestError(problems.result(), csv_uri)
    rows, row_numbers = [], []
    for number, record in enumerate(records, start=1):
        if record is None:  # a blank line: no item
            continue
        rows.append(_parse_record(record, number, csv_uri, problems))
        row_numbers.append(number)
    catalogue = [name for name in columns if name not in KNOWN_COLUMNS]
    return _finish(rows, row_numbers, [None] * len(rows), catalogue, problems, csv_uri)


class _TextOnly(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    def handle_starttag(self, tag: str, attrs) -> None:
        self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("p", "br", "div", "li"):  # block breaks separate words
            self.parts.append(" ")


def _language_text(value: Any, separator: str = " ") -> str | None:
    """The text of a IIIF language map: "en" (or "en-*"), else "none", else the first language; HTML stripped."""
    if value is None:
        return None
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, dict) and value:
        languages = list(value)
        chosen = next((lang for lang in languages if lang == "en"), None) \
            or next((lang for lang in languages if lang.lower().startswith("en-")), None) \
            or next((lang for lang in languages if lang == "none"), None) \
            or languages[0]
        values = value[chosen] if isinstance(value[chosen], list) else [value[chosen]]
    else:
        return None
    texts = []
    for text in values:
        if not isinstance(text, str):
            continue
        text = text.strip()
        if text.startswith("<") and text.endswith(">"):  # IIIF: such a value is HTML
            parser = _TextOnly()
            parser.feed(text)
            parser.close()
            text = "".join(parser.parts)
        text = re.sub(r"\s+", " ", text).strip()
        if text:
            texts.append(text)
    return separator.join(texts) or None


def _painting_images(canvas: dict[str, Any], problems: _Problems) -> list[str]:
    """The image URIs of a canvas's painting annotations, in order (the first item of a Choice)."""
    uris = []
    for page in canvas.get("items") or ():
        if not isinstance(page, dict):
            continue
        if "items" not in page and page.get("id"):
            problems.add(None, None, f"canvas '{canvas.get('id')}': annotation page '{page['id']}' is referenced, not embedded; embed it")
            continue
        for annotation in page.get("items") or ():
            motivation = annotation.get("motivation")
            motivations = motivation if isinstance(motivation, list) else [motivation]
            if "painting" not in motivations:
                continue
            bodies = annotation.get("body")
            bodies = bodies if isinstance(bodies, list) else [bodies]
            for body in bodies:
                if isinstance(body, dict) and body.get("type") == "Choice":
                    body = (body.get("items") or [None])[0]
                if isinstance(body, dict) and body.get("type") == "Image":
                    if body.get("id"):
                        uris.append(body["id"])
                    else:
                        problems.add(None, None, f"canvas '{canvas.get('id')}': a painting image has no id")
                    break
    return uris


def _column_name(label: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_")


IIIF_COLUMNS = ("title", "canvas_label", "rights", "attribution", "iiif_manifest", "iiif_canvas")


def _iiif_metadata(resource: dict[str, Any]) -> dict[str, str]:
    """A resource's ``metadata`` pairs as catalogue fields: label made a column name (prefixed on a clash)."""
    fields = {}
    for entry in resource.get("metadata") or ():
        label, value = _language_text(entry.get("label")), _language_text(entry.get("value"), separator="; ")
        if not label or value is None:
            continue
        name = _column_name(label) or "metadata"
        if name in KNOWN_COLUMNS or name in IIIF_COLUMNS:
            name = f"metadata_{name}"
        fields[name] = value
    return fields


def build_from_iiif(source: str) -> pa.Table:
    """A manifest from a IIIF Presentation 3 manifest (a file or URI; ``http(s)://`` needs aiohttp).

    One row per painting annotation with an Image body (a Choice gives its
    first item), in canvas order: ``image_uri`` is the body's ``id``;
    ``caption`` is the canvas ``summary``, else the canvas ``label``, else the
    manifest's ``summary``, else its ``label`` (language maps: "en", else
    "none", else the first language; several values joined with a space).
    ``item_id`` is the canvas id's last path segment made safe
    (:func:`safe_item_id`), with ``-1``, ``-2``, ... when a canvas paints
    several images, and ``-2``, ``-3``, ... on any later repeat. Catalogue
    fields: ``title`` (manifest label), ``canvas_label``, ``rights``,
    ``attribution`` (the requiredStatement's value), ``iiif_manifest``,
    ``iiif_canvas``, and the ``metadata`` pairs (canvas over manifest).
    Raises ManifestError on a Presentation 2 manifest or when no image is found.
    """
    problems = _Problems()
    # 1. Read the JSON and check it is a Presentation 3 Manifest.
    try:
        document = json.loads(storage.read_bytes(source).decode("utf-8-sig"))
    except ImportError as error:  # fsspec's http filesystem needs aiohttp
        raise InputUnavailableError(f"cannot fetch '{source}': {error}; download the manifest JSON and build from the file") from error
    except json.JSONDecodeError as error:
        raise ManifestError([ManifestProblem(None, None, f"not JSON ({error.msg} at line {error.lineno})")], source) from error
    if not isinstance(document, dict):
        raise ManifestError([ManifestProblem(None, None, "not a IIIF manifest (not a JSON object)")], source)
    if document.get("@type") == "sc:Manifest" or "sequences" in document:
        raise ManifestError([ManifestProblem(None, None, "a IIIF Presentation 2 manifest; only Presentation 3 is supported")], source)
    if document.get("type") != "Manifest":
        raise ManifestError([ManifestProblem(None, None, f"not a IIIF Presentation 3 Manifest (type {document.get('type')!r})")], source)

    # 2. Manifest-level fields, the fallback for every canvas.
    manifest_label = _language_text(document.get("label"))
    manifest_caption = _language_text(document.get("summary")) or manifest_label
    manifest_fields = {
        "title": manifest_label,
        "rights": document.get("rights"),
        "attribution": _language_text((document.get("requiredStatement") or {}).get("value")),
        "iiif_manifest": document.get("id"),
        **_iiif_metadata(document),
    }

    # 3. One row per painting image.
    rows, candidates = [], []
    for number, canvas in enumerate(document.get("items") or (), start=1):
        if not isinstance(canvas, dict) or canvas.get("type") != "Canvas":
            continue
        images = _painting_images(canvas, problems)
        canvas_label = _language_text(canvas.get("label"))
        caption = _language_text(canvas.get("summary")) or canvas_label or manifest_caption
        segment = urlsplit(str(canvas.get("id") or "")).path.rstrip("/").rsplit("/", 1)[-1]
        base = safe_item_id(segment) if segment else f"canvas-{number}"
        fields = dict(manifest_fields)
        fields.update({
            "canvas_label": canvas_label,
            "iiif_canvas": canvas.get("id"),
            "rights": canvas.get("rights") or manifest_fields["rights"],
            "attribution": _language_text((canvas.get("requiredStatement") or {}).get("value")) or manifest_fields["attribution"],
            **_iiif_metadata(canvas),
        })
        for index, uri in enumerate(images, start=1):
            candidates.append(f"{base}-{index}" if len(images) > 1 else base)
            rows.append({"image_uri": uri, "caption": caption, **{k: v for k, v in fields.items() if v is not None}})
    if not rows and not problems.items:
        problems.add(None, None, "no painting annotation with an Image body in the manifest")
    for row, item_id in zip(rows, _unique_ids(candidates)):
        row["item_id"] = item_id

    # 4. The table, validated.
    catalogue = [name for name in IIIF_COLUMNS if any(name in row for row in rows)]
    catalogue += list(dict.fromkeys(name for row in rows for name in row if name not in KNOWN_COLUMNS and name not in IIIF_COLUMNS))
    labels = [f"canvas '{row.get('iiif_canvas')}'" for row in rows]
    return _finish(rows, list(range(1, len(rows) + 1)), labels, catalogue, problems, source)


# ---------------------------------------------------------------------------
# Command line: `diffcolor manifest build|validate`


def cmd_manifest_build(args) -> int:
    """``diffcolor manifest build``: writes the manifest, or prints every problem and exits 1."""
    if args.captions and not args.from_folder:
        raise ValueError("--captions goes with --from-folder only")
    try:
        if args.from_folder:
            table = build_from_folder(args.from_folder, captions=args.captions)
        elif args.from_csv:
            table = build_from_csv(args.from_csv)
        else:
            table = build_from_iiif(args.from_iiif)
        write_manifest(table, args.out)
    except ManifestError as error:
        for problem in error.problems:
            print(problem)
        print(f"diffcolor: manifest not written: {problem_count(error.problems)} problem(s) in '{error.uri}'")
        return 1
    print(f"wrote {table.num_rows} items to {args.out}")
    return 0


def cmd_manifest_validate(args) -> int:
    """``diffcolor manifest validate``: exit 0 and one OK line, or one line per problem and exit 1."""
    problems = validate_manifest(args.file)
    if problems:
        for problem in problems:
            print(problem)
        print(f"{args.file}: INVALID, {problem_count(problems)} problem(s); nothing may run on this manifest")
        return 1
    print(f"{args.file}: OK, {count_rows(args.file)} items")
    return 0


def add_manifest_commands(commands) -> None:
    """Registers ``manifest build`` and ``manifest validate`` on the ``diffcolor`` subparsers object."""
    manifest = commands.add_parser("manifest", help="build or validate a Parquet manifest")
    actions = manifest.add_subparsers(dest="manifest_command", required=True)

    build = actions.add_parser("build", help="build a manifest from a folder, a CSV export or a IIIF manifest")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", metavar="DIR", help="a folder of images (needs --captions)")
    source.add_argument("--from-csv", metavar="CSV", help="a catalogue CSV export with item_id, image_uri, caption")
    source.add_argument("--from-iiif", metavar="FILE_OR_URL", help="a IIIF Presentation 3 manifest")
    build.add_argument("--captions", metavar="CSV_OR_JSON", help="captions for --from-folder: CSV or JSON")
    build.add_argument("-o", "--out", required=True, metavar="OUT.parquet", help="the manifest to write (path or URI)")
    build.set_defaults(handler=cmd_manifest_build)

    validate = actions.add_parser("validate", help="check a manifest; one line per problem, naming row and column")
    validate.add_argument("file", help="the manifest (path or URI)")
    validate.set_defaults(handler=cmd_manifest_validate)
