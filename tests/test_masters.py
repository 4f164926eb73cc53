"""Archival masters and access copies keep the scan's resolution, carry their lineage and pass exiftool -validate."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import tifffile
from conftest import gray_scene
from PIL import Image

from diffcolor.archive import images
from diffcolor.archive.metadata import read_xmp
from diffcolor.common.items import ItemRequest
from diffcolor.method import presets
from diffcolor.method.presets import PipelineConfig, apply_overrides
from diffcolor.pipeline import colorize_item

CAPTION = "a dog sitting on a wooden bench"


def _scan(path, *, resolution=None, unit="INCH", bits=8, size=(72, 96)):
    scale = 65535 if bits == 16 else 255
    pixels = np.round(gray_scene(*size) * scale).astype(np.uint16 if bits == 16 else np.uint8)
    place = {} if resolution is None else {"resolution": resolution, "resolutionunit": unit}
    tifffile.imwrite(path, pixels, photometric="minisblack", **place)
    return path


def _tags(data: bytes) -> dict:
    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        page = tiff.pages[0]
        tags = {tag.name: tag.value for tag in page.tags}
    return tags


def _run(models, config, source, out):
    request = ItemRequest(item_id="scan", source_uri=str(source), caption=CAPTION, color_map={"dog": "brown"})
    [record] = colorize_item(models, request, str(out), config)
    with open(record["outputs"]["master"], "rb") as master, open(record["outputs"]["access"], "rb") as access:
        return record, master.read(), access.read()


def test_the_scans_resolution_and_unit_are_kept_in_both_derivatives(models, smoke, tmp_path):
    source = _scan(tmp_path / "scan600.tif", resolution=(600, 600))
    config = apply_overrides(smoke, {"access_max_side": 48})  # the access copy is half the size: 300 dpi
    record, master, access = _run(models, config, source, tmp_path / "out")

    tags = _tags(master)
    assert tags["XResolution"] == tags["YResolution"] == (600, 1) and int(tags["ResolutionUnit"]) == 2  # inch
    assert int(tags["Compression"]) == 5 and int(tags["Predictor"]) == 2  # LZW with horizontal differencing
    assert record["source"]["resolution"] == {"x": 600.0, "y": 600.0, "unit": "inch"}
    with Image.open(io.BytesIO(access)) as copy:
        assert copy.size == (48, 36) and copy.info["dpi"] == pytest.approx((300, 300), abs=0.5)


def test_a_resolution_in_centimetres_stays_in_centimetres_and_a_jpegs_jfif_density_is_read(tmp_path):
    cm = _scan(tmp_path / "cm.tif", resolution=(236.2205, 236.2205), unit="CENTIMETER")
    source = images.read_image(cm.read_bytes(), "cm.tif")
    assert source.resolution == images.Resolution(pytest.approx(236.2205), pytest.approx(236.2205), "cm")
    tags = _tags(images.encode_master(np.zeros((4, 4, 3), np.uint8), resolution=source.resolution))
    assert int(tags["ResolutionUnit"]) == 3 and tags["XResolution"][0] / tags["XResolution"][1] == pytest.approx(236.2205)

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(buffer, format="JPEG", dpi=(300, 300))
    assert images.read_image(buffer.getvalue(), "scan.jpg").resolution == images.Resolution(300.0, 300.0, "inch")
    # No unit stated: no resolution invented.
    assert images.read_image(_scan(tmp_path / "none.tif").read_bytes(), "none.tif").resolution is None


def test_master_compression_is_configurable_and_checked_when_configured():
    rgb = np.zeros((8, 8, 3), np.uint16)
    assert int(_tags(images.encode_master(rgb, compression="none"))["Compression"]) == 1
    assert int(_tags(images.encode_master(rgb, compression="deflate"))["Compression"]) == 8
    assert set(presets.MASTER_COMPRESSIONS) == set(images.MASTER_COMPRESSIONS)
    assert {f.upper() for f in presets.ACCESS_FORMATS} - {"JPG"} == set(images.ACCESS_FORMATS)
    with pytest.raises(ValueError, match="master_compression must be one of lzw, none, deflate"):
        apply_overrides(PipelineConfig(), {"master_compression": "jpeg"})


def test_derivatives_name_their_version_their_rendition_and_the_source_they_derive_from(models, smoke, tmp_path):
    source = _scan(tmp_path / "scan.tif", resolution=(400, 400))
    record, master, access = _run(models, smoke, source, tmp_path / "out")
    from_master, from_access = read_xmp(master), read_xmp(access)
    assert from_master["document_id"] == from_access["document_id"] == f"xmp.did:diffcolor:{record['version_key']}"
    assert from_master["instance_id"].endswith(":tiff") and from_access["instance_id"].endswith(":jpeg")
    assert from_master["derived_from"] == from_access["derived_from"] == f"urn:sha256:{record['source_sha256']}"


@pytest.mark.exiftool
@pytest.mark.parametrize("bits, access_format", [(8, "JPEG"), (16, "PNG")])
def test_exiftool_validates_every_derivative_without_a_warning(models, smoke, tmp_path, bits, access_format):
    exiftool = shutil.which("exiftool")
    if exiftool is None:
        pytest.fail("exiftool is needed: apt-get install libimage-exiftool-perl")
    source = _scan(tmp_path / "scan.tif", resolution=(600, 600), bits=bits)
    config = apply_overrides(smoke, {"access_format": access_format})
    record, _, _ = _run(models, config, source, tmp_path / "out")
    files = [record["outputs"]["master"], record["outputs"]["access"]]
    done = subprocess.run([exiftool, "-j", "-validate", "-warning", "-a", "-XResolution", "-ResolutionUnit",
                           "-XMP-xmpMM:DocumentID", "-XMP-iptcExt:DigitalSourceType", *files],
                          capture_output=True, text=True, check=True)
    master, access = json.loads(done.stdout)
    for found in (master, access):
        assert found["Validate"] == "OK", found
        assert found["DocumentID"] == f"xmp.did:diffcolor:{record['version_key']}"
        assert found["DigitalSourceType"].endswith("compositeWithTrainedAlgorithmicMedia")
    assert master["XResolution"] == 600 and master["ResolutionUnit"] == "inches"
