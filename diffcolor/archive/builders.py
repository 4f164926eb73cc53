"""Builders: a manifest table from what an archive already has.

- a folder of images with a captions CSV or JSON (:func:`build_from_folder`);
- a catalogue CSV export (:func:`build_from_csv`);
- a IIIF Presentation 3 manifest (:func:`diffcolor.archive.iiif.build_from_iiif`, which uses the helpers here).

Each returns a validated table in the canonical schema
(:data:`diffcolor.archive.manifest.MANIFEST_SCHEMA`) or raises ManifestError
listing every problem, named by the input's own rows (a CSV line, an image
file, a IIIF canvas). Ids come from the input when it has them (never
rewritten), else from file names or canvas ids made safe
(:func:`diffcolor.common.ids.safe_item_id`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from typing import Any

import pyarrow as pa

from diffcolor.archive import storage
from diffcolor.archive.manifest import (
    KNOWN_COLUMNS,
    REQUIRED_COLUMNS,
    URI_SCHEME,
    ManifestChecks,
    ManifestError,
    ManifestProblem,
    Problems,
    catalogue_text,
    column_key,
    column_spellings,
    manifest_table,
    resolve_uri,
    source_cells,
    source_problems,
    validate_table,
)
from diffcolor.common.ids import safe_item_id

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".webp")  # the image files' allowlist


# ---------------------------------------------------------------------------
# The shared row format of the builders


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


def _map_headers(headers: list[str], problems: Problems, aliases: dict[str, str]) -> dict[str, str]:
    """Header -> column name: known columns and their spellings (:func:`~diffcolor.archive.manifest.canonical_column`,
    two spellings of one column refused), then the builder's own ``aliases`` where unambiguous."""
    mapping: dict[str, str] = {}
    for header in headers:
        if not header.strip():
            problems.add(None, None, "a column has an empty header")
        elif headers.count(header) > 1:
            problems.add(None, header, f"column appears {headers.count(header)} times")
        key = column_key(header)
        mapping[header] = key if key in aliases.values() and key not in KNOWN_COLUMNS else header.strip()
    spellings, twice = column_spellings(headers)
    for problem in twice:
        problems.add(problem.row, problem.column, problem.message)
    mapping.update(spellings)
    present = set(mapping.values())
    for canonical in set(aliases.values()):
        if canonical in present:
            continue
        candidates = [header for header in headers if aliases.get(column_key(header)) == canonical]
        if len(candidates) == 1:
            mapping[candidates[0]] = canonical
    return mapping


def _parse_record(record: dict[str, Any], row: int | None, base_uri: str, problems: Problems) -> dict[str, Any]:
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
            parsed[name] = value if isinstance(value, str) else catalogue_text(value)
        elif name in ("image_uri", "ground_truth_uri"):
            text = value if isinstance(value, str) else catalogue_text(value)
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
            parsed[name] = catalogue_text(value)
    return parsed


def _read_csv(uri: str, problems: Problems, aliases: dict[str, str]) -> tuple[list[str], list[dict[str, str] | None]]:
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


def finish_table(rows: list[dict[str, Any]], row_numbers: list[int | None], labels: list[str | None],
                 catalogue_columns: list[str], problems: Problems, uri: str,
                 checks: ManifestChecks | None = None) -> pa.Table:
    """The table of ``rows``, validated, with the sources ``checks`` asks for (none without);
    its problems named by the builder input's own row (and label)."""
    table = manifest_table(rows, catalogue_columns)
    found = validate_table(table)
    if checks is not None and checks.sources != "none":
        columns = {name: table.column(name).to_pylist() for name in ("item_id", "image_uri", "ground_truth_uri")}
        found += source_problems(source_cells(columns, 1, table.num_rows, None), remote=checks.sources == "all")
    for problem in found:
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


def build_from_folder(folder: str, captions: str | None = None, *, checks: ManifestChecks | None = None) -> pa.Table:
    """A manifest of the images directly in ``folder`` (allowlisted extensions, sorted by file name).

    Each item id is derived from the file name's stem with :func:`safe_item_id`
    unless the captions file gives an ``item_id``; ``image_uri`` is the file's
    absolute URI. ``captions`` is a CSV (columns ``filename`` or ``item_id``,
    ``caption``, and optionally ``item_id``, ``target_prompts``, ``color_map``,
    ``seed``, ``collection`` and catalogue columns) or a JSON file (an object
    of file name to caption, or a list of objects with the same keys as the
    CSV columns). Raises ManifestError listing every image without a caption,
    every caption row that names no image, two images with the same id, and
    every invalid value. ``checks``: which sources are checked and how near-miss
    column names count (default :class:`ManifestChecks`: local sources, warnings).
    """
    checks = ManifestChecks() if checks is None else checks
    problems = Problems()
    # 1. The images.
    root = folder if URI_SCHEME.match(folder) else os.path.abspath(folder)
    images = [uri for uri in storage.list_files(root) if posixpath.splitext(uri)[1].lower() in IMAGE_EXTENSIONS]
    if not images:
        raise ManifestError([ManifestProblem(None, None, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{folder}'")], folder)
    names = [posixpath.basename(uri) for uri in images]

    # 2. The captions, keyed by file name or item id.
    if captions is None:
        raise ManifestError([ManifestProblem(None, "caption", f"image '{name}' has no caption (no captions file given)") for name in names], folder)
    records, key_column, catalogue_columns = _read_captions(captions, problems)
    checks.check_column_names(catalogue_columns, problems)

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
    return finish_table(rows, row_numbers, labels, catalogue_columns, problems, captions, checks)


def _read_captions(uri: str, problems: Problems) -> tuple[list[tuple[int | None, dict[str, Any]]], str, list[str]]:
    """(row number, record) pairs of a captions CSV/JSON, the key column ('filename' or 'item_id'), catalogue columns."""
    extension = posixpath.splitext(uri)[1].lower()
    if extension == ".json":
        try:
            document = json.loads(storage.read_bytes(uri).decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            reason = "nests too deep" if isinstance(error, RecursionError) else f"is not UTF-8 JSON ({error})"
            raise ManifestError([ManifestProblem(None, None, f"the captions file {reason}")], uri) from None
        if isinstance(document, dict):
            return ([(None, {"filename": name, "caption": caption}) for name, caption in document.items()],
                    "filename", [])
        if not isinstance(document, list) or not all(isinstance(entry, dict) for entry in document):
            raise ManifestError([ManifestProblem(None, None, "a captions JSON must be an object (file name -> caption) or a list of objects")], uri)
        spellings, twice = column_spellings(key for entry in document for key in entry)
        for problem in twice:
            problems.add(problem.row, problem.column, problem.message)
        document = [{spellings.get(key, key): value for key, value in entry.items()} for entry in document]
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


def build_from_csv(csv_uri: str, *, checks: ManifestChecks | None = None) -> pa.Table:
    """A manifest from a catalogue CSV export with ``item_id``, ``image_uri`` and ``caption`` columns.

    Headers match the known columns ignoring case, spaces and hyphens
    (``Item ID`` is ``item_id``); where a known column is absent, one
    unambiguous alias stands in (``id``/``identifier`` for item_id;
    ``image``/``image_url``/``url``/``file``/``filename``/``path`` for
    image_uri; ``description`` for caption); two spellings of one known
    column (``color_map`` and ``colour_map``) are refused. ``target_prompts`` is
    ``|``-separated text, ``color_map`` JSON object text, ``seed`` an integer;
    relative image URIs resolve against the CSV's folder; every other column is
    a catalogue field. Ids are not rewritten. ``checks`` as for
    :func:`build_from_folder`. Raises ManifestError listing every problem with
    its row (row 1 = first data row).
    """
    checks = ManifestChecks() if checks is None else checks
    problems = Problems()
    columns, records = _read_csv(csv_uri, problems, _ALIASES)
    checks.check_column_names([name for name in columns if name not in KNOWN_COLUMNS], problems)
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
    return finish_table(rows, row_numbers, [None] * len(rows), catalogue, problems, csv_uri, checks)


def unique_ids(candidates: list[str]) -> list[str]:
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
