"""Embedded XMP provenance: every field survives every derivative format, whatever the prompt holds."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile
from PIL import Image

from diffcolor.archive import images, metadata

# 5,000 characters with everything that has broken XMP writers: markup, quotes,
# ampersands, non-ASCII (2-, 3- and 4-byte UTF-8), tabs, newlines, carriage returns.
_PROMPT_PIECE = 'A <red> barn & "white" fence, l\'été, 中文, 🚜\tline\nnext\r\n'
LONG_PROMPT = (_PROMPT_PIECE * (5000 // len(_PROMPT_PIECE) + 1))[:5000]


def record_fields(prompt: str = LONG_PROMPT, **changes) -> dict:
    """The XMP-relevant keys of a pipeline record, every one set."""
    fields = {
        "item_id": "nla-obj-123/4",
        "version": 2,
        "caption": "A farm in 1923, <photograph> & \"notes\"",
        "rewritten_caption": "A sks farm in 1923",
        "target_prompt": prompt,
        "color_map": {"barn": "red", "sky": "pale blue <dawn>"},
        "eta": 0.35,
        "seed": 1234567890123,
        "model_id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "clip_model_id": "openai/clip-vit-large-patch14",
        "model_hash": "ab" * 32,
        "weight_sha256": {"unet/diffusion_pytorch_model.safetensors": "cd" * 32, "vae/model.safetensors": "ef" * 32},
        "software": "diffcolor-archive",
        "software_version": "0.1.0",
        "source_sha256": "01" * 32,
        "preset": "archive",
        "smoke_run": False,
        "catalogue": {
            "accession_number": "PIC/8725 & 1",
            "title": "Farm <near> Goulburn, é",
            "creator": "Hurley, Frank",
            "rights": "No known copyright restrictions",
            "collection": "Rural life",
            "year": 1923,
        },
    }
    fields.update(changes)
    return fields


def rgb_image(bits: int) -> np.ndarray:
    ramp = np.linspace(0, 1, 24 * 32 * 3).reshape(24, 32, 3)
    return np.round(ramp * (2**bits - 1)).astype(np.uint8 if bits == 8 else np.uint16)


def encode(kind: str, fields: dict) -> bytes:
    """A derivative of ``kind`` ("TIFF8", "TIFF16", "JPEG", "PNG", "WEBP") with the format's XMP."""
    if kind.startswith("TIFF"):
        return images.encode_master(rgb_image(int(kind[4:])), xmp=metadata.xmp_for_format(fields, "TIFF"))
    return images.encode_access(rgb_image(8), format=kind, xmp=metadata.xmp_for_format(fields, kind))


def assert_decodes(kind: str, data: bytes, fields: dict) -> None:
    """Pillow still decodes the file, and finds our packet where the format's XMP belongs."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.size == (32, 24)
        if not kind.startswith("TIFF"):
            packet = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
            assert packet == metadata.xmp_for_format(fields, kind)
    if kind.startswith("TIFF"):
        assert np.array_equal(tifffile.imread(io.BytesIO(data)), rgb_image(int(kind[4:])))


FORMATS = ["TIFF8", "TIFF16", "JPEG", "PNG", "WEBP"]


def test_packet_is_complete_and_well_formed():
    packet = metadata.build_xmp(record_fields())

    assert packet.startswith('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'.encode())
    assert packet.endswith(b'<?xpacket end="w"?>')
    root = ET.fromstring(packet)
    assert root.tag == "{adobe:ns:meta/}xmpmeta"
    source_type = root.find(".//{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}DigitalSourceType")
    assert source_type.text == metadata.DIGITAL_SOURCE_TYPE
    assert metadata.DIGITAL_SOURCE_TYPE == (
        "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
    )


@pytest.mark.parametrize("kind", FORMATS)
def test_every_field_round_trips_exactly(kind):
    fields = record_fields()

    data = encode(kind, fields)
    found = metadata.read_xmp(data)

    for key, value in fields.items():
        assert found[key] == value, key
    assert found["target_prompt"] == LONG_PROMPT  # the 5,000 characters, byte for byte
    assert found["digital_source_type"] == metadata.DIGITAL_SOURCE_TYPE
    assert found["creator_tool"] == "diffcolor-archive 0.1.0"
    assert found["identifier"] == "PIC/8725 & 1"
    assert found["title"] == "Farm <near> Goulburn, é"
    assert found["creator"] == ["Hurley, Frank"]
    assert found["rights"] == "No known copyright restrictions"
    assert found["description"].startswith("AI-colourised derivative of the black-and-white source PIC/8725 & 1")
    assert found["description"].endswith(f"Prompt: {LONG_PROMPT}")
    assert_decodes(kind, data, fields)


@pytest.mark.parametrize("kind", FORMATS)
def test_a_100k_prompt_is_cut_for_jpeg_only(kind):
    huge = ("a sepia <street> & café " * 5000)[:100_000]
    fields = record_fields(huge, catalogue={**record_fields()["catalogue"], "notes": "n" * 100_000})

    data = encode(kind, fields)
    found = metadata.read_xmp(data)

    if kind == "JPEG":
        assert len(metadata.xmp_for_format(fields, "JPEG")) <= metadata.JPEG_MAX_XMP_BYTES
        for text, original in ((found["target_prompt"], huge), (found["catalogue"]["notes"], "n" * 100_000)):
            assert text.endswith(metadata.TRUNCATION_MARKER)
            kept = text[: -len(metadata.TRUNCATION_MARKER)]
            assert original.startswith(kept) and len(kept) > 10_000
        # Short values are left whole.
        assert found["caption"] == fields["caption"]
        assert found["catalogue"]["title"] == fields["catalogue"]["title"]
    else:
        assert found["target_prompt"] == huge
        assert found["catalogue"] == fields["catalogue"]
    assert_decodes(kind, data, fields)


@pytest.mark.parametrize("kind", FORMATS)
def test_characters_xml_cannot_hold_are_dropped_not_fatal(kind):
    legal = "keep\ttabs\nnewlines\r\nand returns é 🚜"
    prompt = "".join(chr(code) for code in range(32) if chr(code) not in "\t\n\r") + legal + "\ud800\ufffe\uffff"

    fields = record_fields(prompt, caption="bell\x07 caption")
    data = encode(kind, fields)
    found = metadata.read_xmp(data)

    assert found["target_prompt"] == legal
    assert found["caption"] == "bell caption"
    assert_decodes(kind, data, fields)


def test_missing_and_none_fields_are_left_out():
    found = metadata.read_xmp(
        images.encode_access(rgb_image(8), format="PNG", xmp=metadata.build_xmp({"item_id": "x", "target_prompt": None}))
    )

    assert found == {
        "item_id": "x",
        "digital_source_type": metadata.DIGITAL_SOURCE_TYPE,
        "description": found["description"],
    }
    assert "Prompt" not in found["description"]


def test_smoke_runs_say_so():
    found = metadata.read_xmp(encode("PNG", record_fields(smoke_run=True, model_id="tiny")))

    assert found["smoke_run"] is True
    assert found["description"].startswith("SMOKE RUN, not a colourisation.")


def test_several_creators_become_a_sequence():
    catalogue = {"creator": ["Hurley, Frank", "Caire, Nicholas"]}
    found = metadata.read_xmp(encode("JPEG", record_fields(catalogue=catalogue)))

    assert found["creator"] == ["Hurley, Frank", "Caire, Nicholas"]
    assert found["catalogue"] == catalogue
    assert "identifier" not in found and "title" not in found


def test_jpeg_limit_matches_the_encoder():
    assert metadata.JPEG_MAX_XMP_BYTES == images._JPEG_MAX_XMP_BYTES


def test_files_without_xmp_and_bad_input():
    assert metadata.read_xmp(images.encode_access(rgb_image(8), format="JPEG")) == {}
    assert metadata.read_xmp(images.encode_master(rgb_image(8))) == {}
    with pytest.raises(ValueError, match="not a TIFF, JPEG, PNG or WebP"):
        metadata.read_xmp(b"GIF89a...")
    with pytest.raises(ValueError, match="format must be one of"):
        metadata.xmp_for_format(record_fields(), "GIF")
    with pytest.raises(ValueError, match="catalogue"):
        metadata.build_xmp({"catalogue": "not a dict"})


def test_entity_declarations_are_refused():
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x:xmpmeta xmlns:x="adobe:ns:meta/">&a;</x:xmpmeta>'
    data = images.encode_access(rgb_image(8), format="WEBP", xmp=bomb)

    with pytest.raises(ValueError, match="DOCTYPE"):
        metadata.read_xmp(data)
