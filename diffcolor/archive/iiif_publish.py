"""IIIF out: a Presentation 3 manifest of a collection's current colour versions.

One canvas per item with a done version, in item-id order. The version is the
one ``approved.json`` in the item's folder names (``{"version": N}``; curator
approvals), else the one ``result.json`` names. Its canvas paints a ``Choice``
of the original (when it can be published: the record's ``source_uri`` inside
the output root, or an ``http(s)`` URL) and the colourised access copy,
labelled as an AI colourisation; a smoke-run version (random weights) is
labelled as such. The canvas ``metadata`` carries the prompt as the curator
wrote it (``target_prompt``; the caption for a primary colourisation; never
the model's token-level prompt), the model id and the IPTC digital source type;
``rights`` and ``requiredStatement`` come from the catalogue fields.

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

from diffcolor.archive import storage
from diffcolor.archive.items import ItemLayout
from diffcolor.common.errors import PermanentError

# IPTC NewsCodes, digital source type: media made by a trained model from a human-made source.
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
APPROVED_FILE = "approved.json"
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


def _current_record(output: str, layout: ItemLayout) -> tuple[dict | None, str | None]:
    """(record of the version to publish, None) or (None, why not); OutsideRootError for a link out of ``output``."""
    layout = ItemLayout(storage.confine(output, layout.prefix))
    approved = storage.confine(output, storage.join(layout.prefix, APPROVED_FILE))
    if storage.exists(approved):
        pointer = storage.read_json(approved)
        version = pointer.get("version") if isinstance(pointer, dict) else None
        if isinstance(pointer, dict) and "version" in pointer and version is None:
            return None, f"its published version was withdrawn (a curator rejected it; {APPROVED_FILE})"
        if not isinstance(version, int) or isinstance(version, bool):
            return None, f"{APPROVED_FILE} names no version (expected {{\"version\": N}}, got {pointer!r})"
        if not storage.exists(storage.confine(output, layout.record(version))):
            return None, f"{APPROVED_FILE} names version {version}, which has no record"
        record = storage.read_json(layout.record(version))
    elif storage.exists(storage.confine(output, layout.result)):
        record = storage.read_json(layout.result)
    else:
        return None, "no result.json"
    if record.get("status") != "done" or not (record.get("outputs") or {}).get("access"):
        return None, f"no done version (status {record.get('status')!r})"
    return record, None


def _text(value) -> dict:
    return {"none": [str(value)]}


def _canvas(record: dict, access: str, base_url: str, output: str):
    """The canvas of one item's version whose access copy is ``access`` (iiif-prezi3 models)."""
    from iiif_prezi3 import (
        Annotation,
        AnnotationBody,
        AnnotationPage,
        Canvas,
        Choice,
        KeyValueString,
    )

    item_id, version = record["item_id"], int(record["version"])
    canvas_id = f"{base_url.rstrip('/')}/iiif/canvas/{quote(item_id, safe='~-._')}"
    source = record.get("source") or {}
    width, height = int(source.get("width") or 1), int(source.get("height") or 1)
    catalogue = record.get("catalogue") or {}
    smoke = bool(record.get("smoke_run"))
    # 1. The bodies: the original (when publishable), then the colour access copy.
    colour_label = "AI colourisation (DiffColor)" + (" - SMOKE RUN: random weights, not a colourisation" if smoke else "")
    bodies = []
    original = _url(base_url, output, record.get("source_uri") or "")
    if original:
        bodies.append(AnnotationBody(id=original, type="Image", format=storage.content_type(original).split(";")[0],
                                     width=width, height=height, label={"en": ["Original"]}))
    access_url = _url(base_url, output, access)
    bodies.append(AnnotationBody(id=access_url, type="Image", format=storage.content_type(access).split(";")[0],
                                 width=width, height=height, label={"en": [colour_label]}))
    body = Choice(items=bodies) if len(bodies) > 1 else bodies[0]
    annotation = Annotation(id=f"{canvas_id}/annotation/v{version:04d}", motivation="painting", body=body,
                            target=canvas_id)
    # 2. What was made, and how: the curator's prompt, the model, the digital source type.
    prompt = record.get("target_prompt") or record.get("caption")
    metadata = [
        KeyValueString(label={"en": ["Colourisation"]}, value={"en": [colour_label]}),
        KeyValueString(label={"en": ["Prompt"]}, value=_text(prompt)),
        KeyValueString(label={"en": ["Model"]}, value=_text(record.get("model_id"))),
        KeyValueString(label={"en": ["Digital source type"]}, value=_text(DIGITAL_SOURCE_TYPE)),
        KeyValueString(label={"en": ["Version"]}, value=_text(f"v{version:04d}")),
    ]
    for name in ("title", "creator", "date"):
        if catalogue.get(name):
            metadata.append(KeyValueString(label={"en": [name.capitalize()]}, value=_text(catalogue[name])))
    rights = str(catalogue.get("rights") or "").strip()
    if rights and not _RIGHTS_URI.fullmatch(rights):  # not a URI Presentation 3 accepts: kept as text
        metadata.append(KeyValueString(label={"en": ["Rights"]}, value=_text(rights)))
    statement = "; ".join(str(catalogue[name]) for name in ("title", "creator", "attribution") if catalogue.get(name))
    extra = {}
    if rights and _RIGHTS_URI.fullmatch(rights):
        extra["rights"] = rights
    if statement:
        extra["requiredStatement"] = KeyValueString(label={"en": ["Attribution"]}, value=_text(statement))
    label = catalogue.get("title") or record.get("caption") or item_id
    return Canvas(id=canvas_id, label=_text(f"{label} ({'smoke run' if smoke else 'AI colourisation'})"),
                  width=width, height=height, metadata=metadata,
                  items=[AnnotationPage(id=f"{canvas_id}/page/1", items=[annotation])], **extra)


def publish_iiif(output: str, base_url: str, manifest_uri: str | None = None, *, label: str | None = None) -> Publication:
    """Writes the IIIF Presentation 3 manifest of ``output``'s current colour versions; returns what it wrote.

    ``output`` is a collection's output root (any storage URI), ``base_url`` the
    http(s) URL it is served at, ``manifest_uri`` where to write the manifest
    (default ``OUTPUT/iiif/manifest.json``). Items without a done version are
    left out and named in :attr:`Publication.left_out`. Raises PublishError
    when ``base_url`` is not an http(s) URL or no item has a done version;
    pydantic's ValidationError if a record gives a value IIIF refuses.
    """
    from iiif_prezi3 import Manifest

    # 1. Check the inputs.
    if not re.match(r"https?://[^/\s]+", base_url or ""):
        raise PublishError(f"--base-url must be an http(s) URL, got {base_url!r}")
    output = storage.absolute(output).rstrip("/")
    manifest_uri = storage.absolute(manifest_uri) if manifest_uri else storage.join(output, "iiif", "manifest.json")
    if manifest_uri.startswith(output + "/"):  # a manifest in the output stays in it; one named elsewhere is the caller's
        manifest_uri = storage.confine(output, manifest_uri)

    # 2. Each item's current version, as a canvas.
    canvases, items, left_out = [], [], []
    for prefix in storage.list_folders(storage.join(output, "items")):
        item_id = prefix.rsplit("/", 1)[-1]
        layout = ItemLayout(prefix)
        try:
            record, why = _current_record(output, layout)
            # The access copy where the layout puts it: the record's absolute URI names where the output was
            # written, which is not where it is once copied or synced elsewhere.
            access = (layout.output(int(record["version"]), record["outputs"]["access"].rsplit("/", 1)[-1])
                      if record else None)
            if record is not None and not storage.exists(storage.confine(output, access)):
                record, why = None, f"its access copy '{access}' is missing"
        except storage.OutsideRootError as error:
            record, why = None, str(error)
        if record is None:
            left_out.append(f"item '{item_id}': {why}")
            continue
        canvases.append(_canvas(record, access, base_url, output))
        items.append(item_id)
    if not canvases:
        raise PublishError(f"no item under '{output}/items' has a done version to publish" +
                           (f" ({'; '.join(left_out)})" if left_out else ""))

    # 3. The manifest, validated by the models, written through storage.
    manifest_id = _url(base_url, output, manifest_uri) or f"{base_url.rstrip('/')}/iiif/manifest.json"
    manifest = Manifest(
        id=manifest_id, label={"en": [label or f"{output.rsplit('/', 1)[-1]}: AI colourisations"]},
        summary={"en": ["Black-and-white photographs with colour versions made by an AI model (DiffColor). "
                        "The colour is an interpretation, not a record of the original scene."]},
        items=canvases)
    document = json.loads(manifest.json())
    storage.write_bytes(manifest_uri, json.dumps(document, indent=2, ensure_ascii=False).encode("utf-8"))
    return Publication(document, items, left_out)
