"""IIIF in: a manifest table from a IIIF Presentation 3 manifest.

What real collections publish, and what each becomes in a row:

- a painting body that is an ``Image`` with an Image API 2 or 3 ``service``:
  the image is requested from the service at full size
  (``SERVICE/full/max/0/default.jpg`` for version 3,
  ``SERVICE/full/full/0/default.jpg`` for version 2), or at the largest size
  the service allows when it declares ``maxWidth``/``maxHeight``/``maxArea``
  (in the manifest or in a cached ``info.json`` given by the caller);
  a body whose ``id`` is the service base itself is handled the same way;
- a ``SpecificResource`` body: its source image, with the selector's region
  and rotation put into the Image API request; refused, with the reason, when
  the source has no Image API service or the selector is not one we can turn
  into a request (an SVG outline, a point);
- a ``Choice`` body: its first image item; the row's ``iiif_note`` says so;
- the caption is composed from what the manifest says about the content: the
  manifest ``label`` (or a ``Title`` metadata entry), then the canvas
  ``summary``, the canvas ``label`` when it describes content rather than a
  place in a book ("f. 1r", "p. 2", "Front cover" do not), or a canvas
  ``Description``/``Title`` metadata entry; else the manifest ``summary`` or
  ``Description``. Language maps give the chosen language, else "none", else
  English, else the first language.

A canvas that gives no row (no image, a refused body, no caption with a
content word) is left out and named, with the reason, in
:attr:`IiifImport.left_out` (the first 1000, then a count, as ``manifest
validate`` lists problems); the other canvases still make the table.
Nothing here fetches an image: URLs are only built. The manifest and an
``info.json`` given by URL are fetched through the storage layer, which never
reaches this host's own network unless the operator allows the host
(:mod:`diffcolor.archive.outside`).

A manifest comes from anyone, so every field read is type-checked: a field
of the wrong type or shape is ignored or gives a problem line, never a
traceback (JSON nested too deep to parse is one problem too). Text taken from
it (labels, summaries, metadata, rights, ids) has its control characters made
spaces and its bidi formatting characters removed
(:func:`diffcolor.common.text.clean_text`); an image URL holding either, white
space or credentials is refused.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Mapping
from urllib.parse import urlsplit

import pyarrow as pa

from diffcolor.archive import storage
from diffcolor.archive.builders import finish_table, unique_ids
from diffcolor.archive.manifest import (
    KNOWN_COLUMNS,
    ManifestChecks,
    ManifestError,
    ManifestProblem,
    Problems,
    canonical_column,
)
from diffcolor.common.captions import rewrite_caption
from diffcolor.common.errors import PromptError
from diffcolor.common.ids import safe_item_id
from diffcolor.common.redact import has_userinfo
from diffcolor.common.text import clean_text, unsafe_character

logger = logging.getLogger(__name__)

IIIF_COLUMNS = ("title", "canvas_label", "rights", "attribution", "iiif_manifest", "iiif_canvas", "iiif_note")
MAX_CAPTION_WORDS = 60  # ours: CLIP's text encoder reads 77 tokens; a catalogue essay is cut at a word boundary
IMAGE_SERVICE_TYPES = {"ImageService2": 2, "ImageService3": 3}
# Words of a canvas label that name a place in a book or a sequence, not what the image shows.
_PLACE_WORDS = frozenset(
    """p pp pg page pages seite seiten s f ff fol fols folio folios leaf leaves r v recto verso image images img
    front back inside outside cover covers blank title spine endpaper endpapers flyleaf flyleaves pastedown
    section sections vol vols volume no nr sheet side plate pl spread opening of and""".split())
_ROMAN = re.compile(r"m{0,4}(cm|cd|d?c{0,3})(xc|xl|l?x{0,3})(ix|iv|v?i{0,3})[rv]?", re.IGNORECASE)
_FOLIO = re.compile(r"\d+[a-z]?|\d+[rv]|[a-z]\d+[rv]?", re.IGNORECASE)  # 12, 12a, 1r, a4v


@dataclass(frozen=True)
class IiifImport:
    """The table built from a IIIF manifest and the canvases that gave no row (one problem each)."""

    table: pa.Table
    left_out: list[ManifestProblem] = field(default_factory=list)


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


def _text(value: Any) -> str | None:
    """A string field of the manifest, cleaned (:func:`clean_text`) and stripped; None for anything else."""
    if not isinstance(value, str):
        return None
    return clean_text(value).strip() or None


def _shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters (whatever its size or depth)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a {type(value).__name__} nested too deep to show>"
    text = clean_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dimension(value: Any) -> int | None:
    """A positive pixel count, or None (a string, a bool, a negative or huge number are none)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or not 0 < value < 2**31:
        return None
    return int(value)


def _list(value: Any) -> list:
    """``value`` if it is a JSON array, ``[value]`` for an object, else ``[]`` (IIIF allows one item for a list)."""
    if isinstance(value, list):
        return value
    return [value] if isinstance(value, dict) else []


def language_text(value: Any, language: str | None = None, separator: str = " ") -> str | None:
    """The text of a IIIF language map in ``language`` (or ``language-*``), else "none", else "en", else the first.

    A plain string or number is taken as it is; HTML values are reduced to
    their text; several values are joined with ``separator``.
    """
    if value is None:
        return None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        values = [value]
    elif isinstance(value, dict) and value:
        languages = [str(lang) for lang in value]
        wanted = [language] if language else []
        chosen = next((lang for want in wanted for lang in languages if lang.lower() == want.lower()), None) \
            or next((lang for want in wanted for lang in languages if lang.lower().startswith(want.lower() + "-")), None) \
            or next((lang for lang in languages if lang == "none"), None) \
            or next((lang for lang in languages if lang == "en"), None) \
            or next((lang for lang in languages if lang.lower().startswith("en-")), None) \
            or languages[0]
        values = value[chosen] if isinstance(value[chosen], list) else [value[chosen]]
    else:
        return None
    texts = []
    for text in values:
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            continue
        text = clean_text(str(text)).strip()
        if text.startswith("<") and text.endswith(">"):  # IIIF: such a value is HTML
            parser = _TextOnly()
            parser.feed(text)
            parser.close()
            text = clean_text("".join(parser.parts))
        text = re.sub(r"\s+", " ", text).strip()
        if text:
            texts.append(text)
    return separator.join(texts) or None


def is_place_label(label: str) -> bool:
    """Whether a canvas label only places the image in a sequence ("f. 1r", "p. 2", "Front cover", "Seite 1.")."""
    words = re.findall(r"[^\W_]+", label)
    return all(word.lower() in _PLACE_WORDS or _FOLIO.fullmatch(word) or _ROMAN.fullmatch(word) for word in words)


# ---------------------------------------------------------------------------
# Image URLs from painting bodies


class RefusedBody(Exception):
    """A painting body we cannot turn into one image URL; the message says why (a canvas problem, not an error)."""


def _services(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return [service for service in _list(resource.get("service")) if isinstance(service, dict)]


def _service_version(service: dict[str, Any]) -> int | None:
    """2 or 3 for an Image API service block (by type, context or profile); None for any other service."""
    kind = service.get("type") or service.get("@type")
    if isinstance(kind, str) and kind in IMAGE_SERVICE_TYPES:
        return IMAGE_SERVICE_TYPES[kind]
    hints = " ".join(value for key in ("@context", "profile") for value in _list_of_text(service.get(key)))
    for version in (3, 2):
        if f"iiif.io/api/image/{version}" in hints:
            return version
    return None


def _list_of_text(value: Any) -> list[str]:
    return [item for item in (value if isinstance(value, list) else [value]) if isinstance(item, str)]


def _service_id(service: dict[str, Any]) -> str | None:
    identifier = _text(service.get("id")) or _text(service.get("@id"))
    return identifier.rstrip("/") if identifier else None


def _image_service(resource: dict[str, Any], image_info: Mapping[str, dict]) -> tuple[str, int, dict] | None:
    """(service base, Image API version, what is known of it) for an image resource; None when it has no service.

    A body whose ``id`` is a service base (or its ``info.json``) with no
    service block counts when ``image_info`` has that service.
    """
    for service in _services(resource):
        version, base = _service_version(service), _service_id(service)
        if version and base:
            return base, version, {**service, **(image_info.get(base) or {})}
    body_id = (_text(resource.get("id")) or _text(resource.get("@id")) or "").rstrip("/").removesuffix("/info.json")
    info = image_info.get(body_id) if body_id else None
    if info is not None:
        version = _service_version(info) or 3
        return body_id, version, info
    return None


def _limited_size(width: int | None, height: int | None, known: dict, version: int) -> str:
    """The size segment: full size, or the largest size within ``maxWidth``/``maxHeight``/``maxArea``."""
    full = "max" if version >= 3 else "full"
    width, height = _dimension(width), _dimension(height)
    max_width, max_height = _dimension(known.get("maxWidth")), _dimension(known.get("maxHeight"))
    max_area = known.get("maxArea") if _dimension(known.get("maxArea")) else None
    if max_width and not max_height:
        max_height = max_width  # Image API 3, section 5.3: maxHeight defaults to maxWidth
    if not (max_width or max_height or max_area):
        return full
    if not (width and height):  # the full size is unknown: a best fit within the box (no area bound possible)
        return f"!{max_width},{max_height}" if max_width and max_height else full
    scale = min(1.0, (max_width or width) / width, (max_height or height) / height,
                math.sqrt(max_area / (width * height)) if max_area else 1.0)
    if scale >= 1.0:
        return full
    return f"{max(1, math.floor(width * scale))},{max(1, math.floor(height * scale))}"


_REGION = re.compile(r"full|square|\d+,\d+,\d+,\d+|pct:[\d.]+,[\d.]+,[\d.]+,[\d.]+")
_ROTATION = re.compile(r"!?\d+(\.\d+)?")
_SIZE = re.compile(r"\^?(max|full|\d+,|,\d+|\d+,\d+|!\d+,\d+|pct:[\d.]+)")
_QUALITY = re.compile(r"[a-z]{1,20}")
_FORMAT = re.compile(r"[a-z0-9]{1,10}")


def _selector_request(selectors: list[Any]) -> dict[str, str]:
    """Image API parameters (region, rotation, size, quality, format) from a SpecificResource's selectors."""
    request: dict[str, str] = {}
    for selector in selectors:
        kind = selector.get("type") if isinstance(selector, dict) else None
        if kind == "ImageApiSelector":
            for key in ("region", "size", "rotation", "quality", "format"):
                value = selector.get(key)
                if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                    request[key] = str(value)
                elif value is not None:
                    raise RefusedBody(f"its selector's {key} {_shown(value)} is not text")
        elif kind == "FragmentSelector" and isinstance(selector.get("value"), str) \
                and selector["value"].startswith("xywh="):
            value = selector["value"][5:]
            request["region"] = "pct:" + value[8:] if value.startswith("percent:") else value.removeprefix("pixel:")
        else:
            raise RefusedBody(f"its selector {_shown(kind if isinstance(kind, str) else selector)} cannot be "
                              "requested from an Image API (only ImageApiSelector and FragmentSelector xywh= can)")
    for key, pattern, what in (("region", _REGION, "region"), ("rotation", _ROTATION, "rotation"),
                               ("size", _SIZE, "size"), ("quality", _QUALITY, "quality"), ("format", _FORMAT, "format")):
        if key in request and not pattern.fullmatch(request[key]):
            raise RefusedBody(f"its {what} {_shown(request[key])} is not an Image API {what}")
    return request


def image_url(body: dict[str, Any], image_info: Mapping[str, dict] | None = None) -> tuple[str, str | None]:
    """:func:`_image_url`, refusing anything but an http(s) URL: a IIIF manifest, which may come from anyone,
    names published images, never a file of the machine that imports it (``file:///...``, a bare path, ``s3://``)."""
    url, note = _image_url(body, image_info)
    if not re.match(r"https?://[^/\s]", url, re.IGNORECASE):
        raise RefusedBody(f"its image {_shown(url)} is not an http(s) URL: a IIIF manifest only names published images")
    if unsafe_character(url) or re.search(r"\s", url):
        raise RefusedBody(f"its image URL {_shown(url)} holds white space or control characters")
    if has_userinfo(url):
        raise RefusedBody("its image URL carries credentials (user-info before '@'); a published image needs none")
    return url, note


def _image_url(body: dict[str, Any], image_info: Mapping[str, dict] | None = None) -> tuple[str, str | None]:
    """The URL of the full image a painting body shows, and a note for the row (or None).

    ``body`` is an Image, a SpecificResource over an Image, or a Choice of
    those (its first item). ``image_info`` maps a service base to its cached
    ``info.json`` (width, height and size limits). Raises RefusedBody, with
    the reason, when no single image URL can stand for the body.
    """
    image_info = image_info or {}
    note = None
    # 1. A Choice: its first item.
    if body.get("type") == "Choice":
        options = [item for item in _list(body.get("items")) if isinstance(item, dict)]
        if not options:
            raise RefusedBody("its Choice has no items")
        labels = [language_text(item.get("label")) or _text(item.get("id")) or "?" for item in options]
        note = f"Choice of {len(options)}: took the first ({labels[0]})" + (
            f"; left {', '.join(map(str, labels[1:]))}" if len(options) > 1 else "")
        body = options[0]
    # 2. A SpecificResource: its source and the request its selectors make.
    request: dict[str, str] = {}
    if body.get("type") == "SpecificResource":
        source = body.get("source")
        if not isinstance(source, dict):
            raise RefusedBody(f"its SpecificResource source is a reference ({_shown(source)}), not an embedded Image")
        selectors = body.get("selector") or []
        request = _selector_request(selectors if isinstance(selectors, list) else [selectors])
        body = source
    kind = body.get("type") or body.get("@type")
    if not isinstance(kind, str) or kind not in ("Image", "dctypes:Image"):
        shown = (_text(kind) or "untyped")[:40] if isinstance(kind, str) or not kind else _shown(kind)
        raise RefusedBody(f"its body is {shown}, not an Image")
    # 3. The URL: from the Image API service when there is one, else the body's own id.
    service = _image_service(body, image_info)
    if service is None:
        if request:
            raise RefusedBody(f"it selects {', '.join(f'{k} {v!r}' for k, v in request.items())} of "
                              f"{_shown(body.get('id'))}, which has no Image API service to request that from")
        if not isinstance(body.get("id"), str) or not body["id"].strip():
            raise RefusedBody(f"its Image has no id (a URL string), got {_shown(body.get('id'))}")
        return body["id"].strip(), note
    base, version, known = service
    width = _dimension(known.get("width")) or _dimension(body.get("width"))
    height = _dimension(known.get("height")) or _dimension(body.get("height"))
    region = request.get("region", "full")
    if re.fullmatch(r"\d+,\d+,\d+,\d+", region):
        width, height = (int(part) for part in region.split(",")[2:])
    elif region != "full":
        width = height = None  # square, pct: the requested pixels are not known here
    size = request.get("size") or _limited_size(width, height, known, version)
    quality, extension = request.get("quality", "default"), request.get("format", "jpg")
    return f"{base}/{region}/{size}/{request.get('rotation', '0')}/{quality}.{extension}", note


# ---------------------------------------------------------------------------
# Captions and catalogue fields


def _column_name(label: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_")


def _metadata(resource: dict[str, Any], language: str | None) -> dict[str, str]:
    """A resource's ``metadata`` pairs, keyed by their label made a column name (English label when given)."""
    fields = {}
    for entry in _list(resource.get("metadata")):
        if not isinstance(entry, dict):
            continue
        label = language_text(entry.get("label"), "en")
        value = language_text(entry.get("value"), language, separator="; ")
        if label and value is not None:
            fields[_column_name(label) or "metadata"] = value
    return fields


def _catalogue_fields(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata as catalogue fields: a name taken by a known column (any spelling: ``colour_map``) or a IIIF
    column gets a ``metadata_`` prefix, so that a publisher's label never sets a prompt, a colour map or a seed."""
    return {(f"metadata_{name}" if canonical_column(name) or name in IIIF_COLUMNS else name): value
            for name, value in metadata.items()}


def compose_caption(title: str | None, about_canvas: str | None, about_manifest: str | None) -> str | None:
    """``title: about_canvas`` (else ``title: about_manifest``), without repeating a part; cut to MAX_CAPTION_WORDS."""
    detail = about_canvas or about_manifest
    parts = [part for part in (title, detail) if part]
    if len(parts) == 2 and (parts[0].lower() in parts[1].lower() or parts[1].lower() in parts[0].lower()):
        parts = [max(parts, key=len)]
    if not parts:
        return None
    caption = ": ".join([*(part.rstrip(" :;,.") for part in parts[:-1]), parts[-1].rstrip(" :;,")])
    words = caption.split(" ")
    return " ".join(words[:MAX_CAPTION_WORDS]) if len(words) > MAX_CAPTION_WORDS else caption


def _canvas_caption(canvas: dict[str, Any], manifest: dict[str, Any], language: str | None) -> tuple[str | None, str | None]:
    """(caption, canvas label) of a canvas, composed as the module docstring says."""
    manifest_meta, canvas_meta = _metadata(manifest, language), _metadata(canvas, language)
    title = language_text(manifest.get("label"), language) or manifest_meta.get("title")
    canvas_label = language_text(canvas.get("label"), language)
    descriptive_label = canvas_label if canvas_label and not is_place_label(canvas_label) else None
    about_canvas = language_text(canvas.get("summary"), language) or descriptive_label \
        or canvas_meta.get("description") or canvas_meta.get("title")
    about_manifest = language_text(manifest.get("summary"), language) or manifest_meta.get("description")
    return compose_caption(title, about_canvas, about_manifest), canvas_label


def _canvas_item_id(canvas: dict[str, Any], label: str | None, number: int) -> str:
    """The canvas id's last path segment without ``.json``, else its label, made safe."""
    try:
        segment = urlsplit(_text(canvas.get("id")) or "").path.rstrip("/").rsplit("/", 1)[-1]
    except ValueError:  # not a URL (an unclosed "[", say): the label or the number names it
        segment = ""
    segment = re.sub(r"\.json$", "", segment, flags=re.IGNORECASE)
    for candidate in (segment, label):
        if candidate and safe_item_id(candidate) != "item":
            return safe_item_id(candidate)
    return f"canvas-{number}"


# ---------------------------------------------------------------------------
# The entry point


def _painting_bodies(canvas: dict[str, Any], problems: Problems) -> list[dict[str, Any]]:
    """The bodies of a canvas's painting annotations, in order."""
    bodies = []
    for page in _list(canvas.get("items")):
        if not isinstance(page, dict):
            continue
        if "items" not in page and page.get("id"):
            problems.add(None, None, f"canvas {_shown(canvas.get('id'))}: annotation page {_shown(page['id'])} is "
                                     "referenced, not embedded; embed it")
            continue
        for annotation in _list(page.get("items")):
            motivation = annotation.get("motivation") if isinstance(annotation, dict) else None
            if "painting" not in _list_of_text(motivation):
                continue
            bodies.extend(item for item in _list(annotation.get("body")) if isinstance(item, dict))
    return bodies


def _parse_json(data: bytes, uri: str, what: str) -> Any:
    """The JSON of ``data``; a ManifestError with one problem for bytes that are not UTF-8 JSON or nest too deep."""
    import json

    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        problem = f"{what} is not UTF-8 text (byte {error.start})"
    except json.JSONDecodeError as error:
        problem = f"{what} is not JSON ({error.msg} at line {error.lineno})"
    except RecursionError:
        problem = f"{what} nests its JSON too deep to read"
    raise ManifestError([ManifestProblem(None, None, problem)], uri)


def _read_document(source: str) -> dict[str, Any]:
    """The manifest's JSON, checked to be a Presentation 3 Manifest."""
    document = _parse_json(storage.read_bytes(source), source, "the IIIF manifest")
    if not isinstance(document, dict):
        raise ManifestError([ManifestProblem(None, None, "not a IIIF manifest (not a JSON object)")], source)
    if document.get("@type") == "sc:Manifest" or "sequences" in document:
        raise ManifestError([ManifestProblem(None, None, "a IIIF Presentation 2 manifest; only Presentation 3 is supported")], source)
    if document.get("type") != "Manifest":
        raise ManifestError([ManifestProblem(None, None, f"not a IIIF Presentation 3 Manifest (type {_shown(document.get('type'))})")], source)
    if not isinstance(document.get("items", []), list):
        raise ManifestError([ManifestProblem(None, None, f"the manifest's items must be a list of canvases, got "
                                                         f"{_shown(document.get('items'))}")], source)
    return document


def read_info_json(uri: str) -> dict[str, dict]:
    """A cached Image API ``info.json`` (a file or a URL) as ``{service base: info}``, for ``image_info``.

    Raises ManifestError with one problem for anything but a JSON object with
    a string ``id`` (or ``@id``); size fields of the wrong type are ignored
    where they are used.
    """
    info = _parse_json(storage.read_bytes(uri), uri, "the info.json")
    if not isinstance(info, dict):
        raise ManifestError([ManifestProblem(None, None, f"the info.json is not a JSON object (got {type(info).__name__})")], uri)
    base = (_text(info.get("id")) or _text(info.get("@id")) or "").rstrip("/")
    if not base:
        raise ManifestError([ManifestProblem(None, None, "an info.json without an id or @id (a URL string)")], uri)
    return {base: info}


def _required_statement(resource: dict[str, Any], language: str | None) -> str | None:
    statement = resource.get("requiredStatement")
    return language_text(statement.get("value"), language) if isinstance(statement, dict) else None


def read_iiif(source: str, *, language: str | None = None, image_info: Mapping[str, dict] | None = None,
              checks: ManifestChecks | None = None) -> IiifImport:
    """The manifest table of a IIIF Presentation 3 manifest (a file or URI), and the canvases left out.

    One row per painting body that resolves to an image (see the module
    docstring), in canvas order. ``item_id``: the canvas id's last path
    segment without ``.json`` (else its label) made safe, ``-1``, ``-2``, ...
    when a canvas paints several images, ``-2``, ``-3`` on a later repeat.
    Catalogue fields: ``title`` (manifest label), ``canvas_label``,
    ``rights``, ``attribution`` (the requiredStatement's value),
    ``iiif_manifest``, ``iiif_canvas``, ``iiif_note`` and the ``metadata``
    pairs (canvas over manifest). ``language``: the language to take from
    language maps (default: "none", else "en", else the first given).
    ``checks``: as for :func:`diffcolor.archive.builders.build_from_csv` (the
    image URLs are remote: checked only with ``sources="all"``).

    Raises ManifestError when the document is not a Presentation 3 Manifest,
    when an annotation page is referenced rather than embedded, or when no
    canvas gives a row (every canvas's reason listed).
    """
    document = _read_document(source)
    try:
        return _read_iiif(document, source, language, dict(image_info or {}), ManifestChecks() if checks is None else checks)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as error:
        # Every field is type-checked where it is read; this is the net under that: a problem line, never a traceback.
        raise ManifestError([ManifestProblem(None, None, f"the IIIF manifest has a field of an unexpected type or "
                                                         f"shape ({type(error).__name__}: {_shown(str(error), 120)})")],
                            source) from None


def _read_iiif(document: dict[str, Any], source: str, language: str | None,
               image_info: dict[str, dict], checks: ManifestChecks) -> IiifImport:
    problems = Problems()
    image_info = {base: info for base, info in image_info.items() if isinstance(info, dict)}
    # 1. What the manifest says for every canvas.
    manifest_fields = {
        "title": language_text(document.get("label"), language),
        "rights": _text(document.get("rights")),
        "attribution": _required_statement(document, language),
        "iiif_manifest": _text(document.get("id")),
        **_catalogue_fields(_metadata(document, language)),
    }

    # 2. One row per painting image; a canvas that gives none is left out with its reason (the first
    #    MAX_PROBLEMS of them listed, the rest counted, as `manifest validate` does).
    rows, candidates, left_out = [], [], Problems()
    for number, canvas in enumerate(_list(document.get("items")), start=1):
        if not isinstance(canvas, dict) or canvas.get("type") != "Canvas":
            continue
        name = f"canvas {number} {_shown(_text(canvas.get('id')), 200)}"
        caption, canvas_label = _canvas_caption(canvas, document, language)
        reasons, images = [], []
        for body in _painting_bodies(canvas, problems):
            try:
                images.append(image_url(body, image_info))
            except RefusedBody as refused:
                reasons.append(str(refused))
        if not images:
            left_out.add(None, "image_uri", f"{name} left out: {'; '.join(reasons[:5]) or 'it paints nothing'}")
            continue
        try:
            rewrite_caption(caption or "")
        except PromptError:
            left_out.add(None, "caption", f"{name} left out: no caption with a content word "
                                          f"(label {_shown(canvas_label)}, manifest label {_shown(manifest_fields['title'])})")
            continue
        fields = {
            **manifest_fields,
            "canvas_label": canvas_label,
            "iiif_canvas": _text(canvas.get("id")),
            "rights": _text(canvas.get("rights")) or manifest_fields["rights"],
            "attribution": _required_statement(canvas, language) or manifest_fields["attribution"],
            **_catalogue_fields(_metadata(canvas, language)),
        }
        base = _canvas_item_id(canvas, canvas_label, number)
        for index, (uri, note) in enumerate(images, start=1):
            candidates.append(f"{base}-{index}" if len(images) > 1 else base)
            notes = "; ".join(part for part in (note, *(f"left out a body: {r}" for r in reasons[:5]),
                                                (f"left out {len(reasons) - 5} more bodies" if len(reasons) > 5 else None))
                              if part) or None
            rows.append({"image_uri": uri, "caption": caption, **{k: v for k, v in fields.items() if v is not None},
                         **({"iiif_note": notes} if notes else {})})
    left_out = left_out.result()
    if problems.items:
        raise ManifestError(problems.result(), source)
    if not rows:
        raise ManifestError(left_out or [ManifestProblem(None, None, "the manifest has no canvases")], source)
    for row, item_id in zip(rows, unique_ids(candidates)):
        row["item_id"] = item_id

    # 3. The table, validated.
    catalogue = [name for name in IIIF_COLUMNS if any(name in row for row in rows)]
    catalogue += list(dict.fromkeys(name for row in rows for name in row if name not in KNOWN_COLUMNS and name not in IIIF_COLUMNS))
    labels = [f"canvas {_shown(row.get('iiif_canvas'), 200)}" for row in rows]
    named = Problems()  # column names near a known one, with checks.strict
    checks.check_column_names([name for name in catalogue if name not in IIIF_COLUMNS], named)
    table = finish_table(rows, list(range(1, len(rows) + 1)), labels, catalogue, named, source, checks)
    for problem in left_out:
        logger.warning("%s: %s", source, problem)
    return IiifImport(table, left_out)


def build_from_iiif(source: str, *, language: str | None = None, image_info: Mapping[str, dict] | None = None,
                    checks: ManifestChecks | None = None) -> pa.Table:
    """The table of :func:`read_iiif`; canvases left out are logged as warnings (``read_iiif`` returns them)."""
    return read_iiif(source, language=language, image_info=image_info, checks=checks).table
