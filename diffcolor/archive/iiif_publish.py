"""IIIF out: a Presentation 3 manifest of a collection's approved colour versions.

One canvas per published item, in item-id order. By default an item is
published with the version a curator approved (``approved.json`` in the item's
folder, ``{"version": N}``); items without an approval are left out (named in
``left_out``). With ``unreviewed`` the others are added with their latest done
version, unless a curator rejected that version, labelled "not reviewed" in
their label and metadata. Each canvas paints a ``Choice`` of the original (when
it can be published: the record's ``source_uri`` inside the output root, or an
``http(s)`` URL) and the colourised access copy, labelled as an AI
colourisation; a smoke-run version (random weights) is labelled as such.

Every image body states its own file's width and height, read from the file's
header (an access copy is smaller than the master the record describes); an
original at an http(s) URL, which is not fetched, gets the size the record
measured when the run read it. The canvas has the original's size when it is
published, else the access copy's.

The canvas ``metadata`` carries the review state, the prompt as the curator
wrote it (``target_prompt``; the caption for a primary colourisation; never the
model's token-level prompt), the model id, the IPTC digital source type and the
catalogue's title, creator, date and accession number (``accession_number`` or
``accession``). ``rights`` is the catalogue's ``rights`` when it is a URI
Presentation 3 accepts (else kept as metadata text); ``requiredStatement``
("Attribution") is built from the rights and credit fields alone (``credit_line``,
``credit``, ``attribution``, a textual ``rights``), and left out when there are
none: a title is not an attribution.

Image URLs are the base URL joined with each file's path relative to the
output root, so serving the output folder at the base URL serves the images.
The manifest is built with the iiif-prezi3 models (it validates as it is
built) and written through :mod:`diffcolor.archive.storage`. Every file of
the output is read through :func:`diffcolor.archive.storage.confine`: an item
folder, record or access copy that a symbolic link leads outside the output is
left out (named in ``left_out``), and the default manifest location is
refused when it leads outside.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from urllib.parse import quote

from PIL import Image

from diffcolor.archive import storage
from diffcolor.archive.decisions import read_decisions
from diffcolor.archive.layout import APPROVED, IIIF, IIIF_MANIFEST, ItemLayout, OutputLayout, item_id_from
from diffcolor.common.errors import PermanentError
from diffcolor.common.ids import UnsafeItemIdError

# IPTC NewsCodes, digital source type: media made by a trained model from a human-made source.
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
# Catalogue fields (names compared in lower case, spaces and hyphens as underscores).
CREDIT_FIELDS = ("credit_line", "credit", "attribution", "rights")  # what requiredStatement is built from
ACCESSION_FIELDS = ("accession_number", "accession")
NOT_REVIEWED = "not reviewed by a curator"
_RIGHTS_URI = re.compile(r"https?://(creativecommons\.org|rightsstatements\.org)/\S+")  # what Presentation 3 allows


class PublishError(PermanentError):
    """The collection cannot be published as asked (no base URL, nothing done)."""

    error_class = "bad_publish"


@dataclass(frozen=True)
class Publication:
    """The manifest as JSON, the items on it, and the items left out (with why)."""

    manifest: dict
    items: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def _url(base_url: str, output: str, uri: str) -> str | None:
    """``uri``'s public URL: base URL + its path relative to ``output``; an http(s) URL as it is; else None."""
    if re.match(r"https?://", uri):
        return uri
    root = output.rstrip("/") + "/"
    if not uri.startswith(root):
        return None
    return base_url.rstrip("/") + "/" + quote(uri[len(root):], safe="/~-._")


def _current_record(output: str, layout: ItemLayout, item_id: str,
                    unreviewed: bool) -> tuple[dict | None, str | None, dict | None]:
    """(record of the version to publish, None, approval) or (None, why not, None).

    ``approval``: the ``approved.json`` pointer of an approved version, None for
    an unreviewed one. OutsideRootError for a link out of ``output``.
    """
    layout = ItemLayout(storage.confine(output, layout.prefix))
    approved = storage.confine(output, layout.approved)
    pointer = storage.read_json(approved) if storage.exists(approved) else None
    version = pointer.get("version") if isinstance(pointer, dict) else None
    if pointer is not None and not (isinstance(pointer, dict) and "version" in pointer and version is None):
        if not isinstance(version, int) or isinstance(version, bool):
            return None, f"{APPROVED} names no version (expected {{\"version\": N}}, got {pointer!r})", None
        if not storage.exists(storage.confine(output, layout.record(version))):
            return None, f"{APPROVED} names version {version}, which has no record", None
        record = storage.read_json(layout.record(version))
        if record.get("status") != "done" or not (record.get("outputs") or {}).get("access"):
            return None, f"its approved version {version} is not a done version", None
        return record, None, pointer
    withdrawn = pointer is not None  # a curator rejected the version that was published
    if not unreviewed:
        return None, ("its published version was withdrawn (a curator rejected it)" if withdrawn else
                      "no version is approved (--unreviewed adds the latest done version, marked not reviewed)"), None
    record = _latest_done(output, layout)
    if record is None:
        return None, "no done version", None
    rejected = {entry.get("version"): entry.get("decision") for entry in read_decisions(output, item_id)}
    if rejected.get(record["version"]) == "rejected":
        return None, f"a curator rejected its latest version {record['version']}", None
    return record, None, None


def _latest_done(output: str, layout: ItemLayout) -> dict | None:
    """The item's latest done version with an access copy: ``result.json`` when it is one, else its version records."""
    def usable(record) -> bool:
        return isinstance(record, dict) and record.get("status") == "done" and isinstance(record.get("version"), int) \
            and bool((record.get("outputs") or {}).get("access"))

    if storage.exists(storage.confine(output, layout.result)):
        record = storage.read_json(layout.result)
        if usable(record):
            return record
    for uri in reversed(layout.version_records()):
        record = storage.read_json(storage.confine(output, uri))
        if usable(record):
            return record
    return None


def _field(catalogue: dict, names: tuple[str, ...]) -> list[str]:
    """The non-empty values of the catalogue fields ``names`` (in that order; names compared loosely)."""
    loose = {re.sub(r"[\s-]+", "_", str(key).strip().lower()): value for key, value in catalogue.items()}
    values = [str(loose[name]).strip() for name in names if loose.get(name) not in (None, "")]
    return [value for value in values if value]


def image_size(uri: str) -> tuple[int, int] | None:
    """The width and height an image file's header states, as shown, or None when it cannot be read as an image.

    Opened through the file's store, so only the header's first blocks are read, not the whole file. An EXIF
    orientation that turns the picture by a quarter (5 to 8) swaps the two, as browsers and viewers show it.
    """
    try:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as file, Image.open(file) as image:
            width, height = image.size
            turned = int(image.getexif().get(0x0112, 1) or 1) in (5, 6, 7, 8)
    except Exception:  # not an image, unreadable, a decompression bomb: the caller leaves the body out
        return None
    if width <= 0 or height <= 0:
        return None
    return (int(height), int(width)) if turned else (int(width), int(height))


def _text(value) -> dict:
    return {"none": [str(value)]}


def _canvas(record: dict, access: str, access_size: tuple[int, int], base_url: str, output: str,
            approval: dict | None):
    """The canvas of one item's version whose access copy is ``access`` (iiif-prezi3 models).

    ``approval``: the item's ``approved.json`` when this version is approved, None when it is not reviewed.
    """
    from iiif_prezi3 import (
        Annotation,
        AnnotationBody,
        AnnotationPage,
        Canvas,
        Choice,
        KeyValueString,
    )

    item_id, version = record["item_id"], int(record["version"])
    canvas_id = f"{base_url.rstrip('/')}/{IIIF}/canvas/{quote(item_id, safe='~-._')}"
    catalogue = record.get("catalogue") or {}
    smoke = bool(record.get("smoke_run"))
    # 1. The bodies: the original (when publishable), then the colour access copy, each with its own file's size.
    colour_label = "AI colourisation (DiffColor)" + (" - SMOKE RUN: random weights, not a colourisation" if smoke else "")
    if approval is None:
        colour_label += f" - {NOT_REVIEWED}"
    bodies, sizes = [], []
    source_uri = record.get("source_uri") or ""
    original = _url(base_url, output, source_uri)
    if original:
        if re.match(r"https?://", source_uri):  # not fetched: the size the run measured when it read this file
            source = record.get("source") or {}
            size = (int(source["width"]), int(source["height"])) if source.get("width") and source.get("height") \
                else None
        else:
            size = image_size(storage.confine(output, source_uri))
        if size is not None:
            bodies.append(AnnotationBody(id=original, type="Image", format=storage.content_type(original).split(";")[0],
                                         width=size[0], height=size[1], label={"en": ["Original"]}))
            sizes.append(size)
    access_url = _url(base_url, output, access)
    bodies.append(AnnotationBody(id=access_url, type="Image", format=storage.content_type(access).split(";")[0],
                                 width=access_size[0], height=access_size[1], label={"en": [colour_label]}))
    sizes.append(access_size)
    width, height = sizes[0]
    body = Choice(items=bodies) if len(bodies) > 1 else bodies[0]
    annotation = Annotation(id=f"{canvas_id}/annotation/v{version:04d}", motivation="painting", body=body,
                            target=canvas_id)
    # 2. What was made, and how: the review state, the curator's prompt, the model, the digital source type.
    prompt = record.get("target_prompt") or record.get("caption")
    review = (f"approved by a curator on {str(approval.get('decided_at') or '')[:10] or 'an unrecorded date'}"
              if approval is not None else NOT_REVIEWED)
    metadata = [
        KeyValueString(label={"en": ["Colourisation"]}, value={"en": [colour_label]}),
        KeyValueString(label={"en": ["Review"]}, value={"en": [review]}),
        KeyValueString(label={"en": ["Prompt"]}, value=_text(prompt)),
        KeyValueString(label={"en": ["Model"]}, value=_text(record.get("model_id"))),
        KeyValueString(label={"en": ["Digital source type"]}, value=_text(DIGITAL_SOURCE_TYPE)),
        KeyValueString(label={"en": ["Version"]}, value=_text(f"v{version:04d}")),
    ]
    for name in ("title", "creator", "date"):
        for value in _field(catalogue, (name,))[:1]:
            metadata.append(KeyValueString(label={"en": [name.capitalize()]}, value=_text(value)))
    for value in _field(catalogue, ACCESSION_FIELDS)[:1]:
        metadata.append(KeyValueString(label={"en": ["Accession number"]}, value=_text(value)))
    rights = next(iter(_field(catalogue, ("rights",))), "")
    rights_uri = bool(rights) and _RIGHTS_URI.fullmatch(rights) is not None
    if rights and not rights_uri:  # not a URI Presentation 3 accepts: kept as text
        metadata.append(KeyValueString(label={"en": ["Rights"]}, value=_text(rights)))
    # Attribution from the credit and rights fields only (a rights URI is the rights property, not a statement).
    credits = [value for value in _field(catalogue, CREDIT_FIELDS) if not _RIGHTS_URI.fullmatch(value)]
    statement = "; ".join(dict.fromkeys(credits))
    extra = {}
    if rights_uri:
        extra["rights"] = rights
    if statement:
        extra["requiredStatement"] = KeyValueString(label={"en": ["Attribution"]}, value=_text(statement))
    label = next(iter(_field(catalogue, ("title",))), None) or record.get("caption") or item_id
    kind = "smoke run" if smoke else "AI colourisation"
    return Canvas(id=canvas_id, label=_text(f"{label} ({kind}{', ' + NOT_REVIEWED if approval is None else ''})"),
                  width=width, height=height, metadata=metadata,
                  items=[AnnotationPage(id=f"{canvas_id}/page/1", items=[annotation])], **extra)


def publish_iiif(output: str, base_url: str, manifest_uri: str | None = None, *, label: str | None = None,
                 unreviewed: bool = False) -> Publication:
    """Writes the IIIF Presentation 3 manifest of ``output``'s approved colour versions; returns what it wrote.

    ``output`` is a collection's output root (any storage URI), ``base_url`` the
    http(s) URL it is served at, ``manifest_uri`` where to write the manifest
    (default ``OUTPUT/iiif/manifest.json``). ``unreviewed`` adds the latest done
    version of the items without an approval, marked as not reviewed. Items
    not published are named, with why, in :attr:`Publication.left_out`. Raises
    PublishError when ``base_url`` is not an http(s) URL or no item can be
    published; pydantic's ValidationError if a record gives a value IIIF refuses.
    """
    from iiif_prezi3 import Manifest

    # 1. Check the inputs.
    if not re.match(r"https?://[^/\s]+", base_url or ""):
        raise PublishError(f"--base-url must be an http(s) URL, got {base_url!r}")
    output = storage.absolute(output).rstrip("/")
    manifest_uri = storage.absolute(manifest_uri) if manifest_uri else OutputLayout(output).iiif_manifest
    if manifest_uri.startswith(output + "/"):  # a manifest in the output stays in it; one named elsewhere is the caller's
        manifest_uri = storage.confine(output, manifest_uri)

    # 2. Each item's current version, as a canvas.
    canvases, items, left_out = [], [], []
    for prefix in storage.list_folders(OutputLayout(output).items):
        item_id = item_id_from(prefix)
        layout = ItemLayout(prefix)
        try:
            record, why, approval = _current_record(output, layout, item_id, unreviewed)
            # The access copy where the layout puts it: the record's absolute URI names where the output was
            # written, which is not where it is once copied or synced elsewhere.
            access = (layout.output(int(record["version"]), record["outputs"]["access"].rsplit("/", 1)[-1])
                      if record else None)
            if record is not None and not storage.exists(storage.confine(output, access)):
                record, why = None, f"its access copy '{access}' is missing"
            access_size = image_size(storage.confine(output, access)) if record is not None else None
            if record is not None and access_size is None:
                record, why = None, f"its access copy '{access}' is not a readable image"
        except (storage.OutsideRootError, UnsafeItemIdError) as error:
            record, why = None, str(error)
        if record is None:
            left_out.append(f"item '{item_id}': {why}")
            continue
        canvases.append(_canvas(record, access, access_size, base_url, output, approval))
        items.append(item_id)
    if not canvases:
        what = "a done version" if unreviewed else "an approved version (--unreviewed adds the latest done versions)"
        raise PublishError(f"no item under '{output}/items' has {what} to publish" +
                           (f" ({'; '.join(left_out[:5])}{'; ...' if len(left_out) > 5 else ''})" if left_out else ""))

    # 3. The manifest, validated by the models, written through storage.
    manifest_id = _url(base_url, output, manifest_uri) or f"{base_url.rstrip('/')}/{IIIF}/{IIIF_MANIFEST}"
    manifest = Manifest(
        id=manifest_id, label={"en": [label or f"{output.rsplit('/', 1)[-1]}: AI colourisations"]},
        summary={"en": ["Black-and-white photographs with colour versions made by an AI model (DiffColor). "
                        "The colour is an interpretation, not a record of the original scene." +
                        (f" Versions marked '{NOT_REVIEWED}' have not been approved." if unreviewed else "")]},
        items=canvases)
    document = json.loads(manifest.json())
    storage.write_bytes(manifest_uri, json.dumps(document, indent=2, ensure_ascii=False).encode("utf-8"))
    return Publication(document, items, left_out)
