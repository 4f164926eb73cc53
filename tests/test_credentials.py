"""Content credentials: derivatives signed with C2PA, read back with c2pa-python's Reader."""

from __future__ import annotations

import datetime
import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import tifffile
from conftest import gray_scene

from diffcolor.archive.credentials import (
    ASSERTION_LABEL,
    DIGITAL_SOURCE_TYPE,
    SigningConfigError,
    read_credentials,
    signing_from_environment,
)
from diffcolor.archive.metadata import read_xmp
from diffcolor.cli import main
from diffcolor.common.items import ItemRequest
from diffcolor.pipeline import colorize_item

CAPTION = "a dog sitting on a wooden bench"


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory) -> dict[str, str]:
    """A throwaway CA and an ES256 signing certificate it issued, as an operator's files would hold them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Museum")])

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=not sign, crl_sign=not sign,
                             encipher_only=False, decipher_only=False)

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    valid = {"not_valid_before": now - datetime.timedelta(days=1), "not_valid_after": now + datetime.timedelta(days=30)}
    ca = (x509.CertificateBuilder(subject_name=name("Test Museum CA"), issuer_name=name("Test Museum CA"),
                                  public_key=ca_key.public_key(), serial_number=x509.random_serial_number(), **valid)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(usage(False), critical=True).sign(ca_key, hashes.SHA256()))
    signer = (x509.CertificateBuilder(subject_name=name("Test Museum digitisation"), issuer_name=ca.subject,
                                      public_key=key.public_key(), serial_number=x509.random_serial_number(), **valid)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(usage(True), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("c2pa-keys")
    (folder / "chain.pem").write_bytes(signer.public_bytes(serialization.Encoding.PEM)
                                       + ca.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return {"DIFFCOLOR_C2PA_CERT": str(folder / "chain.pem"), "DIFFCOLOR_C2PA_KEY": str(folder / "key.pem")}


@pytest.fixture(scope="module")
def signed_item(models, smoke, key_pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("signed")
    tifffile.imwrite(folder / "scan.tif", np.round(gray_scene(72, 96) * 255).astype(np.uint8),
                     photometric="minisblack", resolution=(600, 600), resolutionunit="INCH")
    request = ItemRequest(item_id="scan", source_uri=str(folder / "scan.tif"), caption=CAPTION,
                          color_map={"dog": "brown"})
    [record] = colorize_item(models, request, str(folder / "out"), smoke, signing=signing_from_environment(key_pair))
    return record


def _read(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


@pytest.mark.parametrize("role, format", [("master", "TIFF"), ("access", "JPEG")])
def test_each_derivative_carries_a_signed_manifest_with_the_source_and_the_colourisation(signed_item, role, format):
    data = _read(signed_item["outputs"][role])
    # The access copy embeds its manifest; the master's is its sidecar master.c2pa (module docstring).
    sidecar = _read(signed_item["outputs"]["master_credentials"]) if role == "master" else None
    assert (read_credentials(data, format) is None) == (role == "master")
    found = read_credentials(data, format, sidecar)
    assert found is not None
    # A throwaway CA is not on any trust list; everything else validates.
    assert found["validation_state"] == "Valid"
    assert {status["code"] for status in found["validation_status"]} <= {"signingCredential.untrusted"}
    manifest = found["manifest"]
    actions = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.edited"]
    assert actions[1]["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    [ingredient] = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["format"] == "image/tiff"
    ours = next(a for a in manifest["assertions"] if a["label"] == ASSERTION_LABEL)["data"]
    assert ours["prompt"] == signed_item["target_prompt"] == "a brown dog sitting on a wooden bench"
    assert ours["model_id"] == "tiny" and ours["smoke_run"] is True
    assert signed_item["content_credentials"] == {"signed": True, "signer": "Test Museum digitisation",
                                                  "algorithm": "es256", "master": "sidecar"}
    # The XMP provenance is still there beside the manifest.
    assert read_xmp(data)["target_prompt"] == signed_item["target_prompt"]


def test_a_changed_pixel_breaks_the_credentials(signed_item):
    data = bytearray(_read(signed_item["outputs"]["master"]))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tiff:
        offset = tiff.pages[0].dataoffsets[0]
    data[offset + 10] ^= 0xFF
    found = read_credentials(bytes(data), "TIFF", _read(signed_item["outputs"]["master_credentials"]))
    assert found["validation_state"] != "Valid"
    assert any("mismatch" in status["code"] for status in found["validation_status"])


def test_without_a_key_derivatives_are_unsigned_and_say_so(models, smoke, tmp_path, gray_png, monkeypatch, capsys):
    for name in ("DIFFCOLOR_C2PA_CERT", "DIFFCOLOR_C2PA_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert main(["colorize", str(gray_png), "--caption", CAPTION, "--out", str(tmp_path / "o"), "--model", "tiny",
                 "--preset", "smoke"]) == 0
    assert "content credentials: none, outputs are unsigned" in capsys.readouterr().err
    record = json.loads((tmp_path / "o" / "result.json").read_text())
    assert record["content_credentials"]["signed"] is False
    assert read_credentials(_read(record["outputs"]["master"]), "TIFF") is None


def test_a_half_configured_or_missing_key_is_refused_before_any_model_loads(key_pair, tmp_path, gray_png, capsys,
                                                                           monkeypatch):
    with pytest.raises(SigningConfigError, match="set both"):
        signing_from_environment({"DIFFCOLOR_C2PA_CERT": key_pair["DIFFCOLOR_C2PA_CERT"]})
    with pytest.raises(SigningConfigError, match="DIFFCOLOR_C2PA_ALG must be one of"):
        signing_from_environment(dict(key_pair, DIFFCOLOR_C2PA_ALG="md5"))
    import diffcolor.cli as cli

    monkeypatch.setattr(cli, "_load_models", lambda *_: pytest.fail("models loaded with a broken signing setup"))
    monkeypatch.setenv("DIFFCOLOR_C2PA_CERT", key_pair["DIFFCOLOR_C2PA_CERT"])
    monkeypatch.setenv("DIFFCOLOR_C2PA_KEY", str(tmp_path / "no-such-key.pem"))
    assert main(["colorize", str(gray_png), "--caption", CAPTION, "--out", str(tmp_path / "o"), "--model", "tiny"]) == 2
    assert "signing material unreadable" in capsys.readouterr().err and "no-such-key.pem" not in repr(key_pair)


def test_a_master_can_embed_its_manifest(models, smoke, key_pair, tmp_path, gray_png):
    signing = signing_from_environment(dict(key_pair, DIFFCOLOR_C2PA_TIFF="embedded"))
    [record] = colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION),
                             str(tmp_path / "out"), smoke, signing=signing)
    assert "master_credentials" not in record["outputs"] and record["content_credentials"]["master"] == "embedded"
    assert read_credentials(_read(record["outputs"]["master"]), "TIFF")["validation_state"] == "Valid"


@pytest.mark.exiftool
def test_exiftool_validates_signed_derivatives(signed_item):
    exiftool = shutil.which("exiftool")
    if exiftool is None:
        pytest.fail("exiftool is needed: apt-get install libimage-exiftool-perl")
    done = subprocess.run([exiftool, "-j", "-validate", "-warning", "-a",
                           signed_item["outputs"]["master"], signed_item["outputs"]["access"]],
                          capture_output=True, text=True, check=True)
    assert [found["Validate"] for found in json.loads(done.stdout)] == ["OK", "OK"]
