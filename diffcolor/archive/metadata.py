"""Embedded provenance of the derivatives: an XMP packet built from an item's record.

docs/DESIGN.md §4.4, "Images out": every master and access copy says, inside the file,
that it is an AI-colourised composite (IPTC ``DigitalSourceType``
``compositeWithTrainedAlgorithmicMedia``), how it was made (prompts, model ids and
hashes, seed, software) and what it was made from (the source's sha256 and the
catalogue fields). The packet is built with ``xml.etree.ElementTree``, so every
value is escaped; characters XML 1.0 cannot hold (control characters, lone
surrogates) are dropped rather than allowed to break the write.

The input is a dict with the pipeline record's keys (missing or None ones are
left out):

=================  ==========================================================
record key         XMP property
=================  ==========================================================
(always)           ``Iptc4xmpExt:DigitalSourceType`` (the IPTC URI above)
software + version ``xmp:CreatorTool`` ("diffcolor-archive 0.1.0")
(derived)          ``dc:description`` (x-default): "AI-colourised derivative of
                   the black-and-white source ..." with the prompt; prefixed
                   "SMOKE RUN, not a colourisation" for the random tiny bundle
catalogue          ``dc:identifier`` <- ``accession_number``, ``dc:title`` (lang
                   alt) <- ``title``, ``dc:creator`` (seq) <- ``creator`` (a
                   string or a list of strings), ``dc:rights`` (lang alt) <-
                   ``rights``; and all catalogue fields as JSON text in
                   ``diffcolor:catalogue``
item_id, version   ``diffcolor:itemId``, ``diffcolor:version``
caption            ``diffcolor:caption``
rewritten_caption  ``diffcolor:rewrittenCaption`` (the model's c', identifier tokens included)
target_prompt      ``diffcolor:targetPrompt`` (as the curator wrote it; no identifier token)
model_prompt       ``diffcolor:modelPrompt`` (what the text encoder was given)
prompt_alignment   ``diffcolor:promptAlignment``
color_map          ``diffcolor:colorMap`` (JSON text)
eta, seed          ``diffcolor:eta``, ``diffcolor:seed``
model_id           ``diffcolor:modelId``
clip_model_id      ``diffcolor:clipModelId``
model_hash         ``diffcolor:modelHash``
weight_sha256      ``diffcolor:weightSha256`` (JSON text: file -> sha256)
software           ``diffcolor:softwareName``
software_version   ``diffcolor:softwareVersion``
source_sha256      ``diffcolor:sourceSha256``
preset             ``diffcolor:preset``
smoke_run          ``diffcolor:smokeRun`` ("True" / "False")
version_key        ``xmpMM:DocumentID`` ``xmp.did:diffcolor:KEY`` (the version: master and
                   access copy are renditions of one document) and ``xmpMM:InstanceID``
                   ``xmp.iid:diffcolor:KEY:FORMAT`` (this file)
source_sha256      ``xmpMM:DerivedFrom`` (``stRef:documentID`` and ``stRef:instanceID``
                   ``urn:sha256:HEX``: the source, named by its content)
decision           ``diffcolor:curatorDecision`` (approved; published copies only)
decided_by, _at    ``diffcolor:decidedBy``, ``diffcolor:decidedAt``
decision_note      ``diffcolor:decisionNote``
=================  ==========================================================

The project namespace is ``https://diffcolor-archive.org/ns/1.0/`` (prefix
``diffcolor``). :func:`read_xmp` reads a packet back out of a TIFF, JPEG, PNG or
WebP file and returns those record keys with their types restored, plus
``digital_source_type``, ``creator_tool``, ``description``, ``identifier``,
``title``, ``creator`` (a list), ``rights``, ``document_id``, ``instance_id`` and
``derived_from``.

A JPEG holds one APP1 segment of XMP (65,502 bytes); :func:`xmp_for_format`
shortens the longest free-text values for JPEG until the packet fits, marking each
cut with ``TRUNCATION_MARKER``. The master TIFF, PNG and WebP get the full text;
the result record always has it.
"""

from __future__ import annotations

import io
import json
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from typing import Any

import tifffile

# The IPTC NewsCodes term for "composite ... with trained algorithmic media": the
# pixels are the source's lightness with colour made by a trained model.
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
TRUNCATION_MARKER = " [truncated; full text in the result record]"
SMOKE_RUN_NOTICE = "SMOKE RUN, not a colourisation"

# Largest XMP packet one JPEG APP1 segment holds: 65535 minus the 2-byte length
# and the 29-byte "http://ns.adobe.com/xap/1.0/\0" header (the same limit that
# images.encode_access enforces).
JPEG_MAX_XMP_BYTES = 65535 - 2 - 29
# Whitespace after the packet so that editors can add to it in place (the XMP
# specification recommends about 2 KB).
_PADDING_BYTES = 2048

_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "xmpMM": "http://ns.adobe.com/xap/1.0/mm/",
    "stRef": "http://ns.adobe.com/xap/1.0/sType/ResourceRef#",
    "diffcolor": "https://diffcolor-archive.org/ns/1.0/",
}
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
for _prefix, _uri in _NS.items():
    ET.register_namespace(_prefix, _uri)

# Record key -> (diffcolor: local name, kind). Kinds say how a value is written
# as text and read back: text, int, float, bool, json.
_PROJECT_FIELDS: dict[str, tuple[str, str]] = {
    "item_id": ("itemId", "text"),
    "version": ("version", "int"),
    "caption": ("caption", "text"),
    "rewritten_caption": ("rewrittenCaption", "text"),
    "target_prompt": ("targetPrompt", "text"),
    "model_prompt": ("modelPrompt", "text"),
    "prompt_alignment": ("promptAlignment", "text"),
    "color_map": ("colorMap", "json"),
    "eta": ("eta", "float"),
    "seed": ("seed", "int"),
    "model_id": ("modelId", "text"),
    "clip_model_id": ("clipModelId", "text"),
    "model_hash": ("modelHash", "text"),
    "weight_sha256": ("weightSha256", "json"),
    "software": ("softwareName", "text"),
    "software_version": ("softwareVersion", "text"),
    "source_sha256": ("sourceSha256", "text"),
    "preset": ("preset", "text"),
    "smoke_run": ("smokeRun", "bool"),
    "catalogue": ("catalogue", "json"),
    # a curator's decision, in the published copy only (diffcolor.archive.decisions)
    "decision": ("curatorDecision", "text"),
    "decided_by": ("decidedBy", "text"),
    "decided_at": ("decidedAt", "text"),
    "decision_note": ("decisionNote", "text"),
}
# Free-text record fields that xmp_for_format may shorten for JPEG (catalogue and
# colour-map string values are shortened too).
_TRUNCATABLE_FIELDS = ("caption", "rewritten_caption", "target_prompt", "model_prompt", "decision_note")

# Characters XML 1.0 allows (section 2.2); everything else is dropped.
_XML_ILLEGAL = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ACCESS_FORMATS = {"TIFF": "TIFF", "TIF": "TIFF", "JPEG": "JPEG", "JPG": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}


def build_xmp(fields: dict, rendition: str | None = None) -> bytes:
    """A complete XMP packet (UTF-8 bytes) describing one derivative.

    Args:
        fields: the pipeline record's keys (see the module docstring); unknown
            keys are ignored, missing or None ones left out. Values may be of any
            length and hold any characters: XML-illegal ones are dropped.
        rendition: the file's format ("TIFF", "JPEG", ...), which its ``xmpMM:InstanceID`` names.

    Returns:
        ``<?xpacket begin=...?>`` ... ``<?xpacket end="w"?>``, UTF-8 encoded.

    Raises:
        ValueError: when ``fields`` is not a dict, or ``catalogue``,
            ``color_map`` or ``weight_sha256`` is not a dict.
    """
    # 1. Check inputs.
    if not isinstance(fields, dict):
        raise ValueError(f"fields must be a dict, got {type(fields).__name__}")
    for key in ("catalogue", "color_map", "weight_sha256"):
        if fields.get(key) is not None and not isinstance(fields[key], dict):
            raise ValueError(f"fields[{key!r}] must be a dict or None, got {type(fields[key]).__name__}")
    catalogue = fields.get("catalogue") or {}

    # 2. The envelope: x:xmpmeta / rdf:RDF / one rdf:Description.
    root = ET.Element(_q("x", "xmpmeta"))
    rdf = ET.SubElement(root, _q("rdf", "RDF"))
    description = ET.SubElement(rdf, _q("rdf", "Description"), {_q("rdf", "about"): ""})

    # 3. Standard properties: what the image is, what made it, what it shows.
    _simple(description, _q("Iptc4xmpExt", "DigitalSourceType"), DIGITAL_SOURCE_TYPE)
    tool = " ".join(str(fields[key]) for key in ("software", "software_version") if fields.get(key) is not None)
    if tool:
        _simple(description, _q("xmp", "CreatorTool"), tool)
    _lang_alt(description, _q("dc", "description"), _describe(fields))
    if catalogue.get("accession_number") is not None:
        _simple(description, _q("dc", "identifier"), _as_text(catalogue["accession_number"]))
    if catalogue.get("title") is not None:
        _lang_alt(description, _q("dc", "title"), _as_text(catalogue["title"]))
    if catalogue.get("creator") is not None:
        creators = catalogue["creator"] if isinstance(catalogue["creator"], (list, tuple)) else [catalogue["creator"]]
        sequence = ET.SubElement(ET.SubElement(description, _q("dc", "creator")), _q("rdf", "Seq"))
        for creator in creators:
            ET.SubElement(sequence, _q("rdf", "li")).text = _clean(_as_text(creator))
    if catalogue.get("rights") is not None:
        _lang_alt(description, _q("dc", "rights"), _as_text(catalogue["rights"]))
    _media_management(description, fields, rendition)

    # 4. Project properties, one per record field.
    for key, (name, kind) in _PROJECT_FIELDS.items():
        value = fields.get(key)
        if value is None:
            continue
        if kind == "json":
            text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
        elif kind == "float":
            text = repr(float(value))
        elif kind == "int":
            text = str(int(value))
        elif kind == "bool":
            text = "True" if value else "False"
        else:
            text = str(value)
        _simple(description, _q("diffcolor", name), text)

    # 5. Serialise inside the packet wrapper. A carriage return would be read back
    # as a newline (XML end-of-line handling), so text keeps it as a reference.
    body = ET.tostring(root, encoding="unicode").replace("\r", "&#13;")
    padding = (" " * 99 + "\n") * (_PADDING_BYTES // 100)
    packet = f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n{body}\n{padding}<?xpacket end="w"?>'
    return packet.encode("utf-8")


def _media_management(description: ET.Element, fields: dict, rendition: str | None) -> None:
    """xmpMM: this version's document and this file's instance ids, and the source it derives from."""
    key = fields.get("version_key")
    if key:
        _simple(description, _q("xmpMM", "DocumentID"), f"xmp.did:diffcolor:{_clean(str(key))}")
        if rendition:
            _simple(description, _q("xmpMM", "InstanceID"), f"xmp.iid:diffcolor:{_clean(str(key))}:{rendition.lower()}")
    source = fields.get("source_sha256")
    if source:
        derived = ET.SubElement(description, _q("xmpMM", "DerivedFrom"), {_q("rdf", "parseType"): "Resource"})
        for name in ("documentID", "instanceID"):
            _simple(derived, _q("stRef", name), f"urn:sha256:{_clean(str(source))}")


def xmp_for_format(fields: dict, format: str) -> bytes:
    """The XMP packet for a derivative of ``format``, shortened where the format needs it.

    TIFF, PNG and WebP get :func:`build_xmp` in full. JPEG gets the same packet when
    it fits one APP1 segment (``JPEG_MAX_XMP_BYTES``); otherwise the longest free
    texts (caption, rewritten caption, target prompt, catalogue and colour-map
    string values) are all cut to the longest common length that fits, each cut
    one ending in ``TRUNCATION_MARKER``.

    Raises:
        ValueError: on an unknown format, or a JPEG packet that does not fit even
            with every free text emptied (e.g. thousands of catalogue fields).
    """
    # 1. Check inputs; only JPEG has a size limit.
    kind = _ACCESS_FORMATS.get(str(format).upper())
    if kind is None:
        raise ValueError(f"format must be one of {sorted(set(_ACCESS_FORMATS.values()))}, got {format!r}")
    packet = build_xmp(fields, kind)
    if kind != "JPEG" or len(packet) <= JPEG_MAX_XMP_BYTES:
        return packet

    # 2. Binary search on a cap in characters applied to every free text: the
    # largest cap that fits keeps as much of every text as possible.
    longest = max((len(text) for text in _free_texts(fields)), default=0)
    best = _capped_packet(fields, 0, kind)
    if len(best) > JPEG_MAX_XMP_BYTES:
        raise ValueError(
            f"the XMP packet does not fit a JPEG APP1 segment ({len(best)} > {JPEG_MAX_XMP_BYTES} bytes) even with "
            "every free text cut; use PNG or WEBP for the access copy"
        )
    low, high = 0, longest
    while low < high:
        cap = (low + high + 1) // 2
        candidate = _capped_packet(fields, cap, kind)
        if len(candidate) <= JPEG_MAX_XMP_BYTES:
            low, best = cap, candidate
        else:
            high = cap - 1
    return best


def read_xmp(data: bytes) -> dict:
    """The provenance fields of the XMP packet in an image file's bytes.

    Args:
        data: a TIFF (tag 700), JPEG (APP1 ``http://ns.adobe.com/xap/1.0/``), PNG
            (iTXt ``XML:com.adobe.xmp``) or WebP (``XMP `` chunk) file.

    Returns:
        The record keys found (see the module docstring), with ints, floats,
        booleans and JSON dicts restored, plus ``digital_source_type``,
        ``creator_tool``, ``description``, ``identifier``, ``title``,
        ``creator`` (list) and ``rights`` when present; ``{}`` when the file
        holds no XMP.

    Raises:
        ValueError: when ``data`` is none of the four formats, or its XMP is not
            well-formed XML or declares a DOCTYPE (refused: entity expansion).
    """
    packet = _extract_packet(bytes(data))
    if packet is None:
        return {}
    return _parse_packet(packet)


_XMP_APP1_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"


def replace_jpeg_xmp(data: bytes, packet: bytes) -> bytes:
    """The JPEG ``data`` with its XMP APP1 segment replaced by ``packet`` (added when it has none).

    The compressed image data are copied byte for byte: a published copy has
    the pixels of the access copy it was made from. Raises ValueError for bytes
    that are not a JPEG, or a packet too large for one APP1 segment.
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError("replace_jpeg_xmp: the bytes are not a JPEG file")
    if len(packet) > JPEG_MAX_XMP_BYTES:
        raise ValueError(f"XMP packet of {len(packet)} bytes does not fit a JPEG APP1 segment (max {JPEG_MAX_XMP_BYTES})")
    segment = _XMP_APP1_HEADER + bytes(packet)
    kept, position = [], 2
    while position + 4 <= len(data) and data[position] == 0xFF and data[position + 1] not in (0xDA, 0xD9):
        length = struct.unpack(">H", data[position + 2:position + 4])[0]
        piece = data[position:position + 2 + length]
        if not (data[position + 1] == 0xE1 and piece[4:4 + len(_XMP_APP1_HEADER)] == _XMP_APP1_HEADER):
            kept.append(piece)
        position += 2 + length
    app1 = b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment
    # After JFIF's APP0 when there is one (readers expect it first), before everything else.
    head = [kept.pop(0)] if kept and kept[0][1] == 0xE0 else []
    return b"\xff\xd8" + b"".join(head) + app1 + b"".join(kept) + data[position:]


# ---------------------------------------------------------------------------
# Building.


def _q(prefix: str, name: str) -> str:
    return f"{{{_NS[prefix]}}}{name}"


def _clean(text: str) -> str:
    return _XML_ILLEGAL.sub("", text)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _simple(parent: ET.Element, tag: str, text: str) -> None:
    ET.SubElement(parent, tag).text = _clean(text)


def _lang_alt(parent: ET.Element, tag: str, text: str) -> None:
    alternatives = ET.SubElement(ET.SubElement(parent, tag), _q("rdf", "Alt"))
    ET.SubElement(alternatives, _q("rdf", "li"), {_XML_LANG: "x-default"}).text = _clean(text)


def _describe(fields: dict) -> str:
    """The human-readable dc:description: what this image is and how it was made."""
    catalogue = fields.get("catalogue") or {}
    source = catalogue.get("accession_number") or fields.get("item_id") or "unknown item"
    text = f"AI-colourised derivative of the black-and-white source {_as_text(source)}"
    if fields.get("source_sha256"):
        text += f" (sha256 {fields['source_sha256']})"
    if fields.get("model_id"):
        text += f", made with the diffusion model {fields['model_id']}"
    if fields.get("software"):
        text += f" by {fields['software']} {fields.get('software_version') or ''}".rstrip()
    text += ". The colours are generated, not recorded."
    prompt = fields.get("target_prompt") or fields.get("caption")
    if prompt:
        text += f" Prompt: {prompt}"
    if fields.get("smoke_run"):
        text = f"{SMOKE_RUN_NOTICE}. {text}"
    return text


def _free_texts(fields: dict) -> list[str]:
    texts = [fields[key] for key in _TRUNCATABLE_FIELDS if isinstance(fields.get(key), str)]
    for key in ("catalogue", "color_map"):
        texts += [value for value in (fields.get(key) or {}).values() if isinstance(value, str)]
    return texts


def _capped_packet(fields: dict, cap: int, rendition: str | None = None) -> bytes:
    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) > cap:
            return value[:cap] + TRUNCATION_MARKER
        return value

    capped = dict(fields)
    for key in _TRUNCATABLE_FIELDS:
        capped[key] = cut(fields.get(key))
    for key in ("catalogue", "color_map"):
        if isinstance(fields.get(key), dict):
            capped[key] = {name: cut(value) for name, value in fields[key].items()}
    return build_xmp(capped, rendition)


# ---------------------------------------------------------------------------
# Reading.

_JPEG_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _extract_packet(data: bytes) -> bytes | None:
    if data[:2] == b"\xff\xd8":
        return _jpeg_packet(data)
    if data[:8] == _PNG_SIGNATURE:
        return _png_packet(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_packet(data)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            tag = tiff.pages[0].tags.get(700)
            if tag is None:
                return None
            value = tag.value
            return bytes(value) if not isinstance(value, str) else value.encode("utf-8")
    raise ValueError("read_xmp: the bytes are not a TIFF, JPEG, PNG or WebP file")


def _jpeg_packet(data: bytes) -> bytes | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ValueError(f"read_xmp: corrupt JPEG, no marker at byte {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata after this
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        segment = data[position + 4 : position + 2 + length]
        if marker == 0xE1 and segment.startswith(_JPEG_XMP_HEADER):
            return segment[len(_JPEG_XMP_HEADER) :]
        position += 2 + length
    return None


def _png_packet(data: bytes) -> bytes | None:
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, chunk_type = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        if chunk_type == b"iTXt" and body.startswith(b"XML:com.adobe.xmp\x00"):
            rest = body[len(b"XML:com.adobe.xmp\x00") :]
            compressed = rest[0] == 1
            rest = rest[2:]  # compression flag and method
            rest = rest[rest.index(b"\x00") + 1 :]  # language tag
            text = rest[rest.index(b"\x00") + 1 :]  # translated keyword
            return zlib.decompress(text) if compressed else text
        if chunk_type == b"IEND":
            return None
        position += 12 + length
    return None


def _webp_packet(data: bytes) -> bytes | None:
    position = 12
    while position + 8 <= len(data):
        fourcc, length = struct.unpack("<4sI", data[position : position + 8])
        if fourcc == b"XMP ":
            return data[position + 8 : position + 8 + length]
        position += 8 + length + (length & 1)  # chunks are padded to even sizes
    return None


def _parse_packet(packet: bytes) -> dict:
    if b"<!DOCTYPE" in packet or b"<!ENTITY" in packet:
        raise ValueError("read_xmp: the XMP packet declares a DOCTYPE or entities, refused")
    # The xpacket processing instructions are legal XML around the root element
    # (x:xmpmeta, or rdf:RDF from writers that omit it), so the packet parses whole.
    try:
        root = ET.fromstring(packet.strip(b"\x00 \t\r\n"))
    except ET.ParseError as error:
        raise ValueError(f"read_xmp: the XMP packet is not well-formed XML: {error}") from error

    # Properties may be elements or (when simple) attributes of rdf:Description.
    values: dict[str, Any] = {}
    by_name = {_q("diffcolor", name): (key, kind) for key, (name, kind) in _PROJECT_FIELDS.items()}
    for description in root.iter(_q("rdf", "Description")):
        properties = [(name, value) for name, value in description.attrib.items()]
        properties += [(child.tag, child) for child in description]
        for tag, node in properties:
            if tag in by_name:
                key, kind = by_name[tag]
                values[key] = _typed(_text_of(node), kind)
            elif tag == _q("Iptc4xmpExt", "DigitalSourceType"):
                values["digital_source_type"] = _text_of(node)
            elif tag == _q("xmp", "CreatorTool"):
                values["creator_tool"] = _text_of(node)
            elif tag == _q("dc", "identifier"):
                values["identifier"] = _text_of(node)
            elif tag in (_q("dc", "description"), _q("dc", "title"), _q("dc", "rights")):
                values[tag.rsplit("}", 1)[1]] = _lang_alt_text(node)
            elif tag == _q("dc", "creator"):
                values["creator"] = [item.text or "" for item in node.iter(_q("rdf", "li"))] if not isinstance(node, str) else [node]
            elif tag in (_q("xmpMM", "DocumentID"), _q("xmpMM", "InstanceID")):
                values["document_id" if tag.endswith("DocumentID") else "instance_id"] = _text_of(node)
            elif tag == _q("xmpMM", "DerivedFrom") and not isinstance(node, str):
                found = node.find(_q("stRef", "documentID"))
                values["derived_from"] = "" if found is None else (found.text or "")
    return values


def _text_of(node: ET.Element | str) -> str:
    return node if isinstance(node, str) else (node.text or "")


def _lang_alt_text(node: ET.Element | str) -> str:
    if isinstance(node, str):
        return node
    items = list(node.iter(_q("rdf", "li")))
    for item in items:
        if item.get(_XML_LANG) == "x-default":
            return item.text or ""
    return (items[0].text or "") if items else (node.text or "")


def _typed(text: str, kind: str) -> Any:
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            return text.strip().lower() == "true"
        if kind == "json":
            return json.loads(text)
    except ValueError:
        # A value another tool edited into something else stays readable as text.
        return text
    return text
