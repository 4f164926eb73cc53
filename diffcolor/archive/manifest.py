"""Manifests: the Parquet table that says which photographs a run colourises, and how.

One row per item. Required columns: ``item_id``, ``image_uri``, ``caption``;
optional known columns: ``target_prompts``, ``color_map``, ``seed``,
``collection``, ``ground_truth_uri``; every other column is a catalogue field
(accession number, creator, rights, ...) carried through as text. A column
name matches ignoring case, spaces and hyphens, and a few other spellings
stand for a known column (:data:`COLUMN_ALIASES`: ``colour_map``,
``target_prompt``, ...); a manifest with two spellings of one column is
refused, and a name close to a known one is a warning (:func:`near_misses`).
The schema, the id rule and the conventions are documented in
``manifests/README.md``.

A manifest is validated before any GPU work (docs/DESIGN.md §4.1 and §9): every
problem is reported with its row and column, and the run does not start.
Rows are numbered from 1: row 1 is the first data row (a spreadsheet shows it
on line 2, under the header). Validation and reading stream the Parquet file in
record batches, so a million-row manifest is checked in bounded memory (only
the set of ids is held).

The builders of :mod:`diffcolor.archive.builders` turn a folder of images, a
catalogue CSV export or a IIIF Presentation 3 manifest into a manifest table.
All I/O goes through :mod:`diffcolor.archive.storage`, by fsspec URI.
"""

from __future__ import annotations

import difflib
import io
import json
import os
import posixpath
import re
import stat
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffcolor.archive import outside, storage
from diffcolor.archive.outside import is_http
from diffcolor.common.captions import PromptLimit, build_target_prompt, prompt_length_problems, rewrite_caption
from diffcolor.common.errors import (
    InputUnavailableError,
    PermanentError,
    PromptError,
    StorageError,
)
from diffcolor.common.ids import (
    UnsafeItemIdError,
    item_id_problem,
    normalize_item_id,
)
from diffcolor.common.items import ItemRequest
from diffcolor.common.redact import CREDENTIALS_ADVICE, has_userinfo, redact
from diffcolor.common.text import BIDI_CONTROLS, escape_controls, unsafe_character

REQUIRED_COLUMNS = ("item_id", "image_uri", "caption")
OPTIONAL_COLUMNS = ("target_prompts", "color_map", "seed", "collection", "ground_truth_uri")
KNOWN_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
# Other spellings of the known columns, each read as its canonical column: the project's British spelling,
# and the names the results records use (``target_prompt``, ``source_uri``). Compared after column_key.
COLUMN_ALIASES = {
    "colour_map": "color_map",
    "color_words": "color_map",
    "colour_words": "color_map",
    "target_prompt": "target_prompts",
    "targets": "target_prompts",
    "source_uri": "image_uri",
}
NEAR_MISS_CUTOFF = 0.85  # ours, difflib's ratio: 'captoin' (0.86), 'colormap', 'target_promt' near; 'image_id' (0.82) not

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
MAX_PROBLEMS = 1000  # problems listed in full; the rest are counted in one final problem
ROW_GROUP_ROWS = 65_536  # rows per Parquet row group written, so readers stream in small pieces

URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # "s3://", "file://", ...: a URI, not a path
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
        message = escape_controls(self.message)  # one line, and nothing a file holds drives the terminal
        return f"{', '.join(where)}: {message}" if where else message


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


class Problems:
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


@dataclass
class ManifestChecks:
    """What a check of a manifest looks at beyond its own cells, and the warnings it found.

    ``sources``: "none" (a run's check: a missing image fails its item, not the
    run), "local" (every local ``image_uri`` and ``ground_truth_uri`` is an
    existing, regular, readable file) or "all" (also every remote one: a store
    asked through :mod:`diffcolor.archive.storage`, an http(s) URL sent a HEAD
    through the SSRF-checked :func:`diffcolor.archive.outside.fetch`).
    ``strict``: a column name near a known one (:func:`near_misses`) is a
    problem; else it is added to ``warnings``.
    """

    sources: str = "local"
    strict: bool = False
    warnings: list[ManifestProblem] = field(default_factory=list)

    def __post_init__(self):
        if self.sources not in ("none", "local", "all"):
            raise ValueError(f"sources must be 'none', 'local' or 'all', got {self.sources!r}")

    def check_column_names(self, names: Iterable[str], problems: Problems) -> None:
        """Near-miss column names of ``names``: problems when strict, else warnings."""
        for miss in near_misses(names):
            if self.strict:
                problems.add(miss.row, miss.column, miss.message)
            else:
                self.warnings.append(miss)


# ---------------------------------------------------------------------------
# Column names: one spelling per column


def column_key(name: str) -> str:
    """``name`` as column names compare: lower case, runs of spaces and hyphens made ``_`` (``Item ID``: ``item_id``)."""
    return re.sub(r"[\s-]+", "_", name.strip().lower())


def canonical_column(name: str) -> str | None:
    """The known column that ``name`` spells (``Colour Map``: ``color_map``), or None for a catalogue field."""
    key = column_key(name)
    return key if key in KNOWN_COLUMNS else COLUMN_ALIASES.get(key)


def column_spellings(names: Iterable[str]) -> tuple[dict[str, str], list[ManifestProblem]]:
    """(each name that spells a known column -> that column), and a problem per known column spelt twice.

    Two names of one column (``color_map`` and ``colour_map``, ``caption`` and
    ``Caption``) would leave it unclear which one holds the values: refused,
    naming both, and neither is mapped.
    """
    spellings: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        canonical = canonical_column(name)
        if canonical is not None:
            spellings.setdefault(canonical, []).append(name)
    mapping, problems = {}, []
    for canonical, found in spellings.items():
        if len(found) == 1:
            mapping[found[0]] = canonical
        else:
            shown = ", ".join(repr(name) for name in found[:-1]) + f" and {found[-1]!r}"
            problems.append(ManifestProblem(None, None, f"columns {shown} are {len(found)} spellings of one column, "
                                                        f"{canonical!r}; keep one"))
    return mapping, problems


def near_misses(names: Iterable[str]) -> list[ManifestProblem]:
    """A problem naming each column that is not a known one but close to one (``captoin``: ``caption``).

    Close: a :func:`difflib.get_close_matches` ratio of at least
    NEAR_MISS_CUTOFF to a known column or an alias. A name that extends a
    known one (``caption_fr``, ``collection_id``) is a catalogue field of its
    own, and so is every name near none (``creator``, ``rights``).
    """
    candidates = [*KNOWN_COLUMNS, *COLUMN_ALIASES]
    found = []
    for name in dict.fromkeys(names):
        key = column_key(name)
        if not key or canonical_column(name) is not None:
            continue
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=NEAR_MISS_CUTOFF)
        if close and not key.startswith(close[0] + "_"):
            meant = COLUMN_ALIASES.get(close[0], close[0])
            found.append(ManifestProblem(None, name, f"not a known column, so read as a catalogue field; did you "
                                                     f"mean {meant!r}?"))
    return found


def _renamed_schema(schema: pa.Schema, renamed: dict[str, str]) -> pa.Schema:
    return pa.schema([field.with_name(renamed.get(field.name, field.name)) for field in schema], metadata=schema.metadata)


def _renamed_batch(batch: pa.RecordBatch, renamed: dict[str, str]) -> pa.RecordBatch:
    return batch.rename_columns([renamed.get(name, name) for name in batch.schema.names]) if renamed else batch


def _as_spelt(problems: list[ManifestProblem], renamed: dict[str, str]) -> list[ManifestProblem]:
    """``problems`` naming each column as the manifest spells it (``colour_map``, not ``color_map``)."""
    spelt = {canonical: name for name, canonical in renamed.items()}
    return [ManifestProblem(p.row, spelt.get(p.column, p.column), p.message) for p in problems]


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
    "target_prompts": "list<string> (or string: one prompt per row)",
    "color_map": "map<string, string> (or a list of key/value string structs, or JSON object text)",
    "seed": "an integer type (int64)",
}


def _known_type_ok(name: str, data_type: pa.DataType) -> bool:
    if pa.types.is_null(data_type):  # an all-null optional column
        return name in OPTIONAL_COLUMNS
    if name in ("item_id", "image_uri", "caption", "collection", "ground_truth_uri"):
        return _is_text(data_type)
    if name == "target_prompts":
        return (_is_list(data_type) and _is_text(data_type.value_type)) or _is_text(data_type)
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


def _check_schema(schema: pa.Schema, problems: Problems, spelt: list[str] | None = None) -> set[str]:
    """Adds the file-level problems of ``schema``; returns the known columns whose values can be checked.

    ``spelt``: the column names as the manifest spells them, for the message of a missing column.
    """
    names = schema.names
    for name in sorted(set(names)):
        if names.count(name) > 1:
            problems.add(None, name, f"column appears {names.count(name)} times")
    if "" in names:
        problems.add(None, None, "a column has an empty name")
    for name in REQUIRED_COLUMNS:
        if name not in names:
            problems.add(None, name, f"required column missing (columns found: {', '.join(spelt or names) or 'none'})")
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


def prompt_list(value: Any) -> list:
    """A ``target_prompts`` cell as a list: a list as it is, a text as its one prompt, null as none."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


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

    def __init__(self, checkable: set[str], schema: pa.Schema, problems: Problems, limit: PromptLimit | None = None):
        self.checkable = checkable
        self.limit = limit
        self.color_map_kind = _color_map_kind(schema.field("color_map").type) if "color_map" in checkable else None
        self.problems = problems
        self.ids: dict[str, int] = {}
        self.captions: dict[str, Any] = {}  # caption -> rewrite_caption's result or its PromptError

    def _rewritten(self, text: str) -> Any:
        """rewrite_caption(text), or the PromptError it raised; remembered, since archives repeat captions."""
        found = self.captions.get(text)
        if found is None:
            if len(self.captions) >= 65_536:  # bounded memory on a manifest of a million distinct captions
                self.captions.clear()
            try:
                found = rewrite_caption(text)
            except PromptError as error:
                found = error
            self.captions[text] = found
        return found

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
                elif "@" in uri and has_userinfo(uri):  # both of userinfo_span's rules need an "@"
                    add(row, "image_uri", f"'{redact(uri)}' carries credentials; {CREDENTIALS_ADVICE}")
            # 3. caption: non-empty, with a content word (stage 2 needs one).
            caption = None
            if "caption" in columns:
                text = columns["caption"][index]
                if text is None or not text.strip():
                    add(row, "caption", "empty caption")
                else:
                    caption = self._rewritten(text.strip())
                    if isinstance(caption, PromptError):
                        add(row, "caption", str(caption))
                        caption = None
            # 4. target_prompts: each entry non-empty.
            if "target_prompts" in columns:
                for number, prompt in enumerate(prompt_list(columns["target_prompts"][index]), start=1):
                    if prompt is None or not prompt.strip():
                        add(row, "target_prompts", f"target prompt {number} is empty")
            # 5. color_map: well-formed, non-empty words and colours, keys that are content words of the caption.
            if "color_map" in columns and columns["color_map"][index] is not None:
                self._check_color_map(row, columns["color_map"][index], caption)
            # 5b. with the model's tokenizer: every model prompt fits the text encoder (nothing cut off silently).
            if self.limit is not None and caption is not None:
                color_map = columns["color_map"][index] if "color_map" in columns else None
                pairs = _color_map_pairs(color_map, self.color_map_kind) if color_map is not None else []
                targets = [t.strip() for t in prompt_list(columns["target_prompts"][index] if "target_prompts" in columns
                                                          else None) if t and t.strip()]
                mapping = {k: v for k, v in pairs if isinstance(k, str) and isinstance(v, str)} if isinstance(pairs, list) else {}
                for column, problem in prompt_length_problems(self.limit, caption, mapping, targets):
                    add(row, column, problem)
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
                elif uri is not None and has_userinfo(uri):
                    add(row, "ground_truth_uri", f"'{redact(uri)}' carries credentials; {CREDENTIALS_ADVICE}")

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
                build_target_prompt(caption, clean)
            except PromptError as error:
                self.problems.add(row, "color_map", str(error))


# Control characters but tab, LF and CR, and the bidi formatting characters (diffcolor.common.text), in RE2 syntax.
_UNSAFE_RE2 = "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f" + "".join(
    f"\\x{{{ord(char):04x}}}" for char in BIDI_CONTROLS) + "]"


def text_columns(schema: pa.Schema) -> list[str]:
    """The columns of ``schema`` whose values are text or lists of text (each name once)."""
    return [field.name for field in schema if schema.names.count(field.name) == 1
            and (_is_text(field.type) or (_is_list(field.type) and _is_text(field.type.value_type)))]


def _check_characters(batch: pa.RecordBatch, names: list[str], first_row: int, problems: Problems) -> None:
    """A problem, with its row and column, for every cell of a text column with a control or bidi character.

    The cells are searched by Arrow (RE2), so a clean million-row manifest costs no Python loop per cell.
    """
    for name in names:
        column = batch.column(batch.schema.get_field_index(name))
        rows = None
        if _is_list(column.type):
            rows = pc.list_parent_indices(column).to_pylist()
            column = pc.list_flatten(column)
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        column = column.cast(pa.large_string())
        found = pc.indices_nonzero(pc.fill_null(pc.match_substring_regex(column, _UNSAFE_RE2), False)).to_pylist()
        for index in found:
            text = column[index].as_py()
            row = first_row + (rows[index] if rows is not None else index)
            problems.add(row, name, f"{unsafe_character(text)} in {text[:60]!r}; remove it (captions and "
                                    "catalogue text may hold no control or bidi formatting characters)")


def _column_values(batch: pa.RecordBatch, name: str) -> list:
    return batch.column(batch.schema.get_field_index(name)).to_pylist()


# ---------------------------------------------------------------------------
# Sources: the images (and ground truths) a manifest names


SOURCE_COLUMNS = {"image_uri": "image", "ground_truth_uri": "ground truth"}  # column -> what its problem calls it
SOURCE_CHECK_SECONDS = 15.0  # ours: one HEAD or one store request, a check and not a read; 16 at a time
SOURCE_CHECK_WORKERS = 16  # ours: remote checks in flight at once (each waits on the network, not the CPU)
_LOCAL_SCHEMES = ("file://", "local://", "memory://")  # checked always: this machine's files (memory: this process)


def _is_local_source(uri: str) -> bool:
    return not URI_SCHEME.match(uri) or uri.lower().startswith(_LOCAL_SCHEMES)


def _local_source_problem(uri: str) -> str | None:
    """Why the local source ``uri`` cannot be read: missing, not a regular file, or not readable; None when it can."""
    if URI_SCHEME.match(uri):
        fs, path = storage.filesystem(uri)
        if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):  # memory://
            return None if fs.isfile(path) else f"'{uri}' does not exist"
    else:
        path = uri
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return f"'{path}' does not exist"
    except PermissionError:
        return f"'{path}' cannot be reached: permission denied"
    except (OSError, ValueError) as error:  # a name too long, a NUL in it
        return f"'{path}' cannot be checked ({getattr(error, 'strerror', None) or error})"
    if not stat.S_ISREG(mode):
        return f"'{path}' is {storage.file_kind(mode)}, not a regular file"
    if not os.access(path, os.R_OK):
        return f"'{path}' cannot be read: permission denied"
    return None


def _remote_source_problem(uri: str) -> str | None:
    """Why the remote source ``uri`` cannot be read, asking its store (http(s): a HEAD, SSRF-checked); None when it can."""
    try:
        if is_http(uri):
            outside.fetch(uri, method="HEAD", seconds=SOURCE_CHECK_SECONDS)
            return None
        fs, path = storage.filesystem(uri)
        fs.invalidate_cache(path)
        try:
            info = fs.info(path)
        except Exception as error:  # made one of DiffColor's errors, with the URI redacted
            raise storage.backend_error(uri, "checking", error, fs) from error
    except (PermanentError, StorageError) as error:  # missing, denied, refused (SSRF), unreachable
        return str(error)
    except ImportError as error:  # a store whose fsspec package is not installed (gcsfs, adlfs)
        return f"'{redact(uri)}' cannot be checked: {error}"
    if info.get("type") != "file":
        return f"'{redact(uri)}' is a folder, not an object"
    return None


def _each(check: Callable[[str], str | None], uris: list[str], chunk: int = 512) -> list[str | None]:
    """``check`` of each of ``uris``, in order, SOURCE_CHECK_WORKERS threads each taking ``chunk`` at a time."""
    if len(uris) <= chunk:
        return [check(uri) for uri in uris]
    chunks = [uris[start:start + chunk] for start in range(0, len(uris), chunk)]
    with ThreadPoolExecutor(min(SOURCE_CHECK_WORKERS, len(chunks))) as pool:
        return [problem for done in pool.map(lambda part: [check(uri) for uri in part], chunks) for problem in done]


def source_problems(sources: list[tuple[int, str, str, str]], remote: bool) -> list[ManifestProblem]:
    """A problem for each source that cannot be read, in row order: ``sources`` are (row, item id, column, URI).

    Local files are checked always (existing, regular, readable); remote ones
    (``s3://``, ``http(s)://``, ...) only with ``remote``. Both are checked
    SOURCE_CHECK_WORKERS at a time (a network file system answers a stat
    slowly too). A URI carrying credentials or a control character is not
    checked (it is a problem of its own).
    """
    sources = [entry for entry in sources
               if not ("@" in entry[3] and has_userinfo(entry[3])) and unsafe_character(entry[3]) is None]
    local = [entry for entry in sources if _is_local_source(entry[3])]
    found = list(zip(local, _each(_local_source_problem, [entry[3] for entry in local])))
    if remote:
        far = [entry for entry in sources if not _is_local_source(entry[3])]
        found += zip(far, _each(_remote_source_problem, [entry[3] for entry in far], chunk=1))
    found.sort(key=lambda pair: pair[0][0])
    return [ManifestProblem(row, column, f"item {item_id!r}: {SOURCE_COLUMNS[column]} {problem}")
            for (row, item_id, column, _), problem in found if problem is not None]


def source_cells(columns: dict[str, list], first_row: int, count: int,
                 base_uri: str | None) -> list[tuple[int, str, str, str]]:
    """(row, item id, column, URI) of each non-empty source cell of ``columns`` (name -> values), for :func:`source_problems`.

    Relative URIs resolve against ``base_uri`` (none: taken as they are).
    """
    resolve = uri_resolver(base_uri) if base_uri else str.strip
    ids = columns.get("item_id") or [None] * count
    found = []
    for name in SOURCE_COLUMNS:
        for index, value in enumerate(columns.get(name) or ()):
            if isinstance(value, str) and value.strip():
                found.append((first_row + index, (ids[index] or "").strip(), name, resolve(value)))
    return found


def _validate(schema: pa.Schema, batches: Iterable[pa.RecordBatch], limit: PromptLimit | None = None, *,
              checks: ManifestChecks | None = None, base_uri: str | None = None) -> tuple[list[ManifestProblem], dict[str, int]]:
    """Every problem of a manifest given as its schema and record batches; also the ids seen.

    Columns are read under their canonical names (:func:`column_spellings`);
    problems name them as the manifest spells them. With ``checks``: near-miss
    column names and the sources too (relative ones against ``base_uri``).
    """
    # 1. Column names: one spelling each, then the near misses.
    problems = Problems()
    spellings, twice = column_spellings(schema.names)
    for problem in twice:
        problems.add(problem.row, problem.column, problem.message)
    if checks is not None:
        checks.check_column_names(schema.names, problems)
    renamed = {name: canonical for name, canonical in spellings.items() if name != canonical}
    spelt, schema = schema.names, _renamed_schema(schema, renamed)

    # 2. The schema, then the rows batch by batch.
    checkable = _check_schema(schema, problems, spelt)
    checker = _RowChecker(checkable, schema, problems, limit)
    texts = text_columns(schema)
    sources = checks is not None and checks.sources != "none"
    first_row = 1
    for batch in batches:
        batch = _renamed_batch(batch, renamed)
        columns = {name: _column_values(batch, name) for name in checkable}
        checker.check(columns, first_row, batch.num_rows)
        _check_characters(batch, [name for name in texts if name in batch.schema.names], first_row, problems)
        if sources:
            for problem in source_problems(source_cells(columns, first_row, batch.num_rows, base_uri),
                                           remote=checks.sources == "all"):
                problems.add(problem.row, problem.column, problem.message)
        first_row += batch.num_rows
    return _as_spelt(problems.result(by_row=sources), renamed), checker.ids


# ---------------------------------------------------------------------------
# Reading


class ManifestFile:
    """A manifest read once (:func:`read_manifest`): its URI and its bytes.

    Every function here that takes a manifest URI also takes one of these, and
    then parses the bytes held instead of reading storage again; a validation
    that found no problem is remembered (:attr:`ids`), so that a run validates
    its manifest once, whoever asks (the command line, then the flow).
    """

    def __init__(self, uri: str, data: bytes):
        self.uri, self.data = uri, data
        self.ids: dict[str, int] | None = None  # the (case-folded) ids, once a validation found no problem

    def __repr__(self) -> str:
        return f"ManifestFile({redact(self.uri)!r}, {len(self.data)} bytes)"


def read_manifest(uri: str) -> ManifestFile:
    """The manifest at ``uri`` read whole, once (InputUnavailableError when it is missing)."""
    with _open_source(uri) as handle:
        try:
            return ManifestFile(uri, handle.read())
        except OSError as error:
            raise StorageError(f"reading manifest '{uri}' failed: {error}") from error


def _uri(manifest: str | ManifestFile) -> str:
    return manifest.uri if isinstance(manifest, ManifestFile) else manifest


def _open_source(uri: str):
    """The manifest's bytes as a file object: the one place a manifest is read from storage.

    An http(s) URL is fetched whole, through the storage layer's checked fetch.
    """
    try:
        if is_http(uri):
            return io.BytesIO(storage.read_bytes(uri))
        fs, path = storage.filesystem(uri)
        return fs.open(path, "rb")
    except (FileNotFoundError, IsADirectoryError) as error:
        raise InputUnavailableError(f"manifest '{uri}' does not exist") from error
    except PermissionError as error:
        raise InputUnavailableError(f"manifest '{uri}' cannot be read: permission denied") from error
    except OSError as error:
        raise StorageError(f"opening manifest '{uri}' failed: {error}") from error


@contextmanager
def _open_parquet(manifest: str | ManifestFile) -> Iterator[pq.ParquetFile]:
    """The manifest as a Parquet file: the bytes of a ManifestFile, else streamed from storage."""
    uri = _uri(manifest)
    handle = io.BytesIO(manifest.data) if isinstance(manifest, ManifestFile) else _open_source(uri)
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


def count_rows(uri: str | ManifestFile) -> int:
    """The number of rows of the manifest at ``uri``, from its Parquet footer (no data read)."""
    with _open_parquet(uri) as parquet:
        return parquet.metadata.num_rows


def validate_manifest(uri: str | ManifestFile, *, batch_size: int = 65_536, prompt_limit: PromptLimit | None = None,
                      checks: ManifestChecks | None = None) -> list[ManifestProblem]:
    """Every problem of the manifest at ``uri`` (empty when valid), streaming it in record batches.

    Checks: required columns present; each known column's type; item_id
    present, safe (:func:`item_id_problem`) and unique (letter case ignored,
    the repeat names the first row); image_uri and caption non-empty; captions
    with a content word; target prompts non-empty; colour maps well-formed,
    with non-empty words and colours, each word a content word of the caption;
    seed null or in 0..2**63-1; ground_truth_uri null or non-empty; no
    credentials in image_uri or ground_truth_uri; no control (but tab and
    newlines) or bidi formatting character in any text column, catalogue
    fields included (:mod:`diffcolor.common.text`). With
    ``prompt_limit`` (the model's tokenizer, :func:`diffcolor.method.diffusion.prompt_limit`)
    also that each row's model prompts fit its text encoder
    (:func:`~diffcolor.common.captions.prompt_length_problems`). With
    ``checks`` (``manifest validate``; a run gives none): the sources it asks
    for, and column names near a known one (:class:`ManifestChecks`). At most
    1000 problems are listed, then one "... and N more problems".
    Raises InputUnavailableError when the file is missing.
    """
    try:
        return _scan(uri, batch_size, prompt_limit, checks)[0]
    except ManifestError as error:  # not a Parquet file, or a corrupt one
        return error.problems


def _scan(uri: str | ManifestFile, batch_size: int, limit: PromptLimit | None = None,
          checks: ManifestChecks | None = None) -> tuple[list[ManifestProblem], dict[str, int]]:
    """The manifest's problems and ids; a ManifestFile found valid remembers its ids (read once, checked once)."""
    if isinstance(uri, ManifestFile) and uri.ids is not None and limit is None and checks is None:
        return [], uri.ids
    with _open_parquet(uri) as parquet:
        schema = parquet.schema_arrow
        checked = [name for name in schema.names if canonical_column(name) and schema.names.count(name) == 1]
        checked += [name for name in text_columns(schema) if name not in checked]
        problems, ids = _validate(schema, _batches(parquet, _uri(uri), batch_size, checked), limit, checks=checks,
                                  base_uri=_uri(uri))
    if isinstance(uri, ManifestFile) and not problems:
        uri.ids = ids
    return problems, ids


def validate_table(table: pa.Table) -> list[ManifestProblem]:
    """Every problem of an in-memory manifest table (same checks as :func:`validate_manifest`)."""
    return _validate(table.schema, table.to_batches())[0]


def resolve_uri(value: str, manifest_uri: str) -> str:
    """``value`` as given when it is a URI or an absolute path, else resolved against the manifest's folder.

    ``demo/camera.png`` in ``manifests/demo.parquet`` is
    ``/abs/path/manifests/demo/camera.png``; in ``s3://b/m/x.parquet`` it is
    ``s3://b/m/demo/camera.png``. ``..`` segments are folded.
    """
    return uri_resolver(manifest_uri)(value)


def uri_resolver(manifest_uri: str) -> Callable[[str], str]:
    """:func:`resolve_uri` against ``manifest_uri``, its folder worked out once (a million rows resolve fast)."""
    match = URI_SCHEME.match(manifest_uri)
    if match:
        scheme, folder = match.group(0), posixpath.dirname(manifest_uri[match.end():])

        def against(value: str) -> str:
            return scheme + posixpath.normpath(posixpath.join(folder, value))
    else:
        folder = os.path.dirname(os.path.abspath(manifest_uri))

        def against(value: str) -> str:
            return os.path.normpath(os.path.join(folder, value))

    def resolve(value: str) -> str:
        value = value.strip()
        if URI_SCHEME.match(value) or os.path.isabs(value) or _WINDOWS_DRIVE.match(value):
            return value
        return against(value)

    return resolve


def catalogue_text(value: Any) -> str:
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
    uri: str | ManifestFile,
    *,
    batch_size: int = 1024,
    items: set[str] | None = None,
    force: bool = False,
    check: bool = True,
) -> Iterator[ItemRequest]:
    """The manifest's rows as ItemRequests, streamed in record batches of ``batch_size`` rows.

    With ``check`` (the default) the manifest is validated first, in a
    separate streaming pass (none for a :class:`ManifestFile` already found
    valid), and ManifestError is raised here, before anything is yielded, when
    it has any problem or when ``items`` names an id that is not in the
    manifest. ``check=False`` is for callers that have just validated the same file.

    Each request has the normalised item id; ``source_uri`` (and a
    ``ground_truth_uri``) resolved with :func:`resolve_uri`; the caption and
    targets stripped; ``color_map`` as a dict; ``seed`` (null or absent:
    DEFAULT_SEED); ``catalogue``: every other non-null column as text, plus
    ``collection`` and ``ground_truth_uri`` when set. ``items`` restricts to
    those ids (normalised the same way).
    """
    try:
        wanted = {normalize_item_id(item) for item in items} if items is not None else None
    except UnsafeItemIdError as error:
        raise ManifestError([ManifestProblem(None, "item_id", str(error))], _uri(uri)) from None
    if check:
        problems, ids = _scan(uri, 65_536)
        if wanted is not None:
            missing = sorted(item for item in wanted if item.casefold() not in ids)
            problems += [ManifestProblem(None, "item_id", f"requested item {item!r} is not in the manifest") for item in missing]
        if problems:
            raise ManifestError(problems, _uri(uri))
    folded = {item.casefold() for item in wanted} if wanted is not None else None
    return _iter_items(uri, batch_size, folded, force)


def _iter_items(manifest: str | ManifestFile, batch_size: int, wanted: set[str] | None,
                force: bool) -> Iterator[ItemRequest]:
    uri = _uri(manifest)
    with _open_parquet(manifest) as parquet:
        renamed = {name: canonical for name, canonical in column_spellings(parquet.schema_arrow.names)[0].items()
                   if name != canonical}
        schema = _renamed_schema(parquet.schema_arrow, renamed)
        kind = _color_map_kind(schema.field("color_map").type) if "color_map" in schema.names else None
        for batch in _batches(parquet, uri, batch_size, None):
            batch = _renamed_batch(batch, renamed)
            columns = {name: _column_values(batch, name) for name in batch.schema.names}
            names = list(columns)
            for values in zip(*columns.values()):
                row = dict(zip(names, values))
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
        name: catalogue_text(value)
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
        targets=tuple(prompt.strip() for prompt in prompt_list(row.get("target_prompts"))),
        color_map=color_map,
        seed=DEFAULT_SEED if seed is None else int(seed),
        catalogue=catalogue,
        force=force,
    )


# ---------------------------------------------------------------------------
# Writing


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
