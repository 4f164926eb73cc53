"""The version record: its type and the one declaration of each field and metric.

Every item version (and every skip and failure) is described by one record
(docs/DESIGN.md §10.3): a JSON object in the item's folder, a row of the run's
``results.parquet`` and ``results.csv``, a row of the run report, a card in the
review app. :class:`VersionRecord` is its type; a field annotated with a
:class:`Field` is a column of the results table, and its declaration says
everything the readers need:

- the column's Arrow type, from the Python type (``float`` is ``float64``,
  ``dict[str, str]`` a map of strings, ``X | None`` the same, nullable);
- its unit and what it means (the run report and the review app explain it);
- ``label`` and ``digits``: how it is shown (``plain_label`` where only ASCII
  will do: terminal lines, Prefect artifacts);
- where it is shown: ``filterable`` (a range filter of the review app and two
  query parameters of its API, ``min_NAME`` and ``max_NAME``), ``statistic``
  (the report's per-run distribution), ``report_row`` (each item row of the
  report), ``summary`` (the one-line summaries: ``diffcolor colorize``'s output,
  the run's Prefect artifact, the review app's collection cards).

Fields annotated with a bare type are kept in the record (and in the results
table's ``record_json``) without a column of their own.

So adding a metric is one annotated line here; the results schema, the CSV, the
report, the review filters and the API are derived from :data:`FIELDS` when
they are used. Code that must add a field at run time (tests, an extension)
replaces :data:`FIELDS` with a longer tuple (:func:`declare`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

import pyarrow as pa


@dataclass(frozen=True)
class Field:
    """One column of the results table, declared once (module docstring)."""

    explanation: str = ""
    unit: str = ""
    label: str = ""  # on pages; the name when empty
    plain_label: str = ""  # ASCII, for terminals and Prefect artifacts; the label when empty
    digits: int | None = None  # decimals shown; None: as it is
    filterable: bool = False
    statistic: bool = False
    report_row: bool = False
    summary: bool = False
    name: str = ""  # filled in from the annotation
    type: pa.DataType | None = None  # filled in from the annotation

    @property
    def shown_label(self) -> str:
        return self.label or self.name

    @property
    def ascii_label(self) -> str:
        return self.plain_label or self.shown_label

    @property
    def is_map(self) -> bool:
        return pa.types.is_map(self.type)

    @property
    def is_number(self) -> bool:
        return pa.types.is_integer(self.type) or pa.types.is_floating(self.type)

    def format(self, value: Any) -> str:
        """``value`` in plain text: ``digits`` decimals, ``-`` for a missing or NaN one (pages use ``number``)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if self.digits is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{value:.{self.digits}f}"
        return str(value)

    def describe(self) -> str:
        """The explanation with its unit, as the report and the API say it."""
        return f"{self.explanation} ({self.unit})" if self.unit and self.explanation else self.explanation or self.unit


def _metric(explanation: str, unit: str, label: str, digits: int, **where: bool) -> Field:
    return Field(explanation=explanation, unit=unit, label=label, digits=digits, **where)


class VersionRecord(TypedDict, total=False):
    """One record (module docstring); the fields in the results table's column order."""

    item_id: Annotated[str, Field("the item's id, from the manifest")]
    version: Annotated[int | None, Field("the version number (v0001 is 1); none for a failure", label="v")]
    status: Annotated[str, Field("done, skipped_done, failed or not_grayscale")]
    error_class: Annotated[str | None, Field("what kind of failure (docs/DESIGN.md §9)")]
    error_message: Annotated[str | None, Field("why the item failed, in one line")]
    cache_key: Annotated[str | None, Field("the key of this exact work: source, request, settings and model")]
    source_uri: Annotated[str, Field("where the source was read (credentials redacted)")]
    source_sha256: Annotated[str | None, Field("sha256 of the source's bytes")]
    outputs: Annotated[dict[str, str], Field("the version's files by role: master, access, state, ...")]
    output_sha256: Annotated[dict[str, str], Field("sha256 of each output, by role")]
    clip_score: Annotated[float | None, _metric(
        "CLIP similarity of the image and its prompt as the curator wrote it: higher follows the prompt better; "
        "compare items of one run, not across models", "cosine similarity x100", "CLIP", 1,
        filterable=True, statistic=True, report_row=True, summary=True)]
    colorfulness: Annotated[float | None, _metric(
        "Hasler-Suesstrunk colourfulness: 0 for gray, about 15 to 35 for a muted colour photograph, "
        "100 for a very colourful one", "M, 0 to about 100", "colourfulness", 1,
        filterable=True, statistic=True, report_row=True, summary=True)]
    max_delta_l: Annotated[float | None, _metric(
        "largest change of lightness between the source and the colourised master; "
        "the photograph's tones are kept when it stays below 1", "CIE L*, 0 to 100", "max ΔL*", 2,
        plain_label="max dL*", filterable=True, statistic=True, report_row=True, summary=True)]
    mean_delta_l: Annotated[float | None, _metric(
        "mean change of lightness between the source and the colourised master", "CIE L*, 0 to 100",
        "mean ΔL*", 3, plain_label="mean dL*")]
    ssim_l: Annotated[float | None, _metric(
        "structural similarity of the master's lightness to the source's", "0 to 1", "SSIM L*", 3)]
    gamut_clipped_fraction: Annotated[float | None, _metric(
        "share of pixels whose colour had to be visibly pulled into sRGB to keep their lightness (more than "
        "a just-noticeable 2.3 ΔE*ab lost where sRGB holds that much colour: black and white count as none)",
        "fraction of pixels",
        "gamut-clipped", 3, filterable=True, statistic=True, report_row=True)]
    alignment_confidence: Annotated[float | None, _metric(
        "how sure the spatial alignment is that the generated colours sit on the right pixels of the source; "
        "low values mean colours may bleed across edges", "0 to 1", "alignment", 2,
        filterable=True, statistic=True, report_row=True)]
    seconds: Annotated[dict[str, float], Field("wall-clock seconds by phase: read, stage1, align, ...", "s")]
    device_seconds: Annotated[float | None, _metric(
        "the item's share of GPU (or CPU) time in this run", "s", "device seconds", 1, statistic=True)]
    finetune_steps_run: Annotated[int, Field("fine-tune steps this run took for the item (0 when reused)", "steps",
                                             label="fine-tune steps", summary=True)]
    peak_memory_bytes: Annotated[int | None, Field("peak memory while the item ran (see peak_memory_kind)", "bytes")]
    seed: Annotated[int, Field("the random seed")]
    model_id: Annotated[str | None, Field("the base model")]
    model_hash: Annotated[str | None, Field("hash of the model's weights")]
    software_version: Annotated[str, Field("the diffcolor version that made the record")]
    preset: Annotated[str, Field("the settings preset")]
    caption: Annotated[str, Field("the caption as the curator wrote it")]
    target_prompt: Annotated[str | None, Field("the prompt as the curator wrote it, or the caption with the colour "
                                               "map")]
    model_prompt: Annotated[str | None, Field("what the text encoder was given (identifier tokens in uncoloured "
                                              "slots)")]
    prompt_alignment: Annotated[str | None, Field("color_map, aligned, unaligned or caption")]
    prompt_warning: Annotated[str | None, Field("why a free prompt could not be aligned, when it could not")]
    smoke_run: Annotated[bool | None, Field("made with random weights (a smoke run): not a colourisation")]
    created_at: Annotated[str, Field("when the record was made (UTC, ISO 8601)")]
    decision: Annotated[str | None, Field("approved or rejected: a curator's decision (review runs only)")]
    decided_by: Annotated[str | None, Field("the curator who decided")]
    decided_at: Annotated[str | None, Field("when the decision was made")]
    decision_note: Annotated[str | None, Field("the curator's note")]
    run_config: Annotated[str | None, Field("the run configuration the record was made under "
                                            "(runs/RUN_ID/config.json); none for runs that wrote none")]
    # kept in the record (and record_json), no column of their own
    clip_model_id: str | None
    weight_sha256: dict[str, str]
    weight_dtype: str | None
    software: str
    catalogue: dict[str, Any]
    version_key: str | None
    previous_version: int | None
    kind: str  # primary or render
    rewritten_caption: str
    color_map: dict[str, str] | None
    alpha: float | None
    eta: float | None  # alpha, in records written before its rename
    source: dict[str, Any] | None
    content_credentials: dict[str, Any]
    output_width: int
    output_height: int
    output_bit_depth: int
    peak_memory_kind: str  # device or host_rss
    placement: dict[str, Any]  # where the item ran (flows.worker)
    plan_key: str | None  # the collection flow's plan key of the item


RECORD_JSON = "record_json"  # the results table's last column: the whole record, for fields without a column


def _arrow(hint: Any, name: str) -> pa.DataType:
    """The Arrow type of a field's Python type (``X | None`` as ``X``)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        [hint] = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is dict:
        key, value = typing.get_args(hint)
        return pa.map_(_arrow(key, name), _arrow(value, name))
    scalars = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    if hint not in scalars:
        raise TypeError(f"record field {name!r}: no column type for {hint!r}")
    return scalars[hint]


def _declared() -> tuple[Field, ...]:
    found = []
    for name, hint in typing.get_type_hints(VersionRecord, include_extras=True).items():
        if typing.get_origin(hint) is Annotated:
            kind, *extras = typing.get_args(hint)
            [declared] = [extra for extra in extras if isinstance(extra, Field)]
            found.append(_checked(dataclasses.replace(declared, name=name, type=_arrow(kind, name))))
    return tuple(found)


def _checked(declared: Field) -> Field:
    if declared.filterable and not declared.is_number:
        raise TypeError(f"record field {declared.name!r}: curators filter by numeric ranges, not {declared.type}")
    return declared


FIELDS: tuple[Field, ...] = _declared()  # the results table's columns, in order (record_json follows)


def declare(field: Field, *, type: pa.DataType | None = None, name: str | None = None) -> tuple[Field, ...]:
    """:data:`FIELDS` with ``field`` added (to assign to it, e.g. with pytest's monkeypatch)."""
    field = dataclasses.replace(field, name=name or field.name, type=type or field.type)
    if not field.name or field.type is None or field.name in names() or field.name == RECORD_JSON:
        raise ValueError(f"a new field needs a fresh name and a type, got {field.name!r}")
    return (*FIELDS, _checked(field))


def names() -> list[str]:
    return [field.name for field in FIELDS]


def field(name: str) -> Field:
    """The declaration of ``name``; KeyError for an undeclared one."""
    for declared in FIELDS:
        if declared.name == name:
            return declared
    raise KeyError(name)


def metrics() -> list[Field]:
    """The measured fields (floating point, explained, shown somewhere): what the pages explain."""
    return [declared for declared in FIELDS if pa.types.is_floating(declared.type) and declared.explanation
            and (declared.filterable or declared.statistic or declared.report_row or declared.summary)]


def filterable() -> list[Field]:
    return [declared for declared in FIELDS if declared.filterable]


def statistics() -> list[Field]:
    return [declared for declared in FIELDS if declared.statistic]


def report_row() -> list[Field]:
    return [declared for declared in FIELDS if declared.report_row]


def summary() -> list[Field]:
    return [declared for declared in FIELDS if declared.summary]


def explanations() -> dict[str, str]:
    """What each metric means, with its unit, by name."""
    return {declared.name: declared.describe() for declared in metrics()}


def results_schema() -> pa.Schema:
    """The results table's schema: one column per declared field, then ``record_json``."""
    return pa.schema([pa.field(declared.name, declared.type) for declared in FIELDS] + [(RECORD_JSON, pa.string())])


_COLUMNS: tuple[tuple[Field, ...], list[tuple[str, bool]]] = ((), [])


def _columns() -> list[tuple[str, bool]]:
    """``(name, is_map)`` of each column, worked out once per :data:`FIELDS` (a row per record of a large run)."""
    global _COLUMNS
    if _COLUMNS[0] is not FIELDS:
        _COLUMNS = (FIELDS, [(declared.name, declared.is_map) for declared in FIELDS])
    return _COLUMNS[1]


def to_row(record: VersionRecord | dict, *, record_json: str | None = None) -> dict:
    """``record`` as a row of :func:`results_schema` (maps as key-value pairs, absent fields null).

    ``record_json`` is the whole record as JSON text; by default ``json.dumps``
    of it (the results writer passes its own strict encoding).
    """
    row: dict[str, Any] = {}
    for name, is_map in _columns():
        value = record.get(name)
        row[name] = list((value or {}).items()) if is_map else value
    row[RECORD_JSON] = json.dumps(record, default=str) if record_json is None else record_json
    return row


def from_row(row: dict) -> VersionRecord:
    """The record a results row holds: its ``record_json`` when it has one, else its columns (maps as dicts).

    A row of an older table lacks newer columns: those fields read as None.
    """
    if row.get(RECORD_JSON):
        record = json.loads(row[RECORD_JSON])
        for declared in FIELDS:
            record.setdefault(declared.name, None)
        return record
    record = {}
    for declared in FIELDS:
        value = row.get(declared.name)
        record[declared.name] = dict(value or []) if declared.is_map else value
    return record


def summary_line(record: VersionRecord | dict) -> str:
    """The summary fields of ``record`` in one ASCII line: "max dL* 0.41, colourfulness 21.3, CLIP 24.0, ..."."""
    return ", ".join(f"{declared.ascii_label} {declared.format(record.get(declared.name))}" for declared in summary())


def with_columns(table: pa.Table) -> pa.Table:
    """``table`` with every column of :func:`results_schema` it lacks added as nulls (an older results table)."""
    for column in results_schema():
        if column.name not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table
