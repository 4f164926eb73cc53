"""Content credentials (C2PA) for the derivatives: who made this image, how, and from what.

Each master and access copy can carry a C2PA manifest, signed with the
operator's key, that a C2PA reader (c2patool, Content Credentials Verify, a
browser extension) shows to anyone who receives the file:

- the actions: ``c2pa.opened`` of the black-and-white source (the parent
  ingredient, with its own hash and a thumbnail), then ``c2pa.edited`` with
  the IPTC digital source type ``compositeWithTrainedAlgorithmicMedia``:
  the pixels are the source's lightness with colours made by a trained model;
- ``org.diffcolor.colourisation``: the prompt as the curator wrote it, the
  model id and hash, the seed, the software and its version, and whether it
  was a smoke run (random weights).

The signing key and certificate chain come from the operator's configuration,
never from a manifest or a flow parameter (see ``deploy/README.md``):

``DIFFCOLOR_C2PA_CERT``  PEM certificate chain file (signer first, then its CA)
``DIFFCOLOR_C2PA_KEY``   PEM private key file (PKCS#8)
``DIFFCOLOR_C2PA_ALG``   es256 (default), es384, es512, ps256, ps384, ps512 or ed25519
``DIFFCOLOR_C2PA_TSA``   optional RFC 3161 timestamp authority URL
``DIFFCOLOR_C2PA_TIFF``  ``sidecar`` (default) or ``embedded``: where a master TIFF's manifest goes

JPEG, PNG and WebP access copies carry their manifest inside the file. A
master TIFF gets it beside the file by default, as the C2PA sidecar
``master.c2pa`` (a reader is given both): the manifest's TIFF tag (0xCD41)
is unknown to the archival validators in use (exiftool 12.57 warns on it),
and a master must validate clean. ``embedded`` puts it in the TIFF instead.

Without a key the derivatives are written unsigned and the records say so
(``content_credentials: {"signed": false, ...}``). Signed outputs are not
byte-identical between two runs (a signature carries a time and a random
nonce); unsigned ones are.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from diffcolor import __version__
from diffcolor.common.errors import PermanentError

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
ASSERTION_LABEL = "org.diffcolor.colourisation"
ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")
MIME_TYPES = {"TIFF": "image/tiff", "JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
              "JPEG2000": "image/jp2"}
UNSIGNED = {"signed": False, "reason": "no signing key configured (DIFFCOLOR_C2PA_CERT, DIFFCOLOR_C2PA_KEY)"}


class SigningConfigError(PermanentError):
    """The configured signing key or certificate cannot be used."""

    error_class = "signing_config"


@dataclass(frozen=True)
class Signing:
    """The operator's signing material (kept out of reprs: the key is secret)."""

    certificate_chain: bytes
    private_key: bytes
    algorithm: str = "es256"
    timestamp_url: str | None = None
    embed_in_tiff: bool = False  # False: a master's manifest is the sidecar master.c2pa

    def __repr__(self) -> str:
        return f"Signing(algorithm={self.algorithm!r}, timestamp_url={self.timestamp_url!r})"

    @property
    def signer_name(self) -> str:
        """The common name of the signing certificate (the first of the chain)."""
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        certificate = x509.load_pem_x509_certificate(self.certificate_chain)
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else certificate.subject.rfc4514_string()


def signing_from_environment(environ: dict | None = None) -> Signing | None:
    """The signing material the environment names (module docstring); None when no key is configured.

    Raises SigningConfigError when only one of certificate and key is set, a
    file is missing, or the algorithm is unknown.
    """
    environ = os.environ if environ is None else environ
    cert, key = environ.get("DIFFCOLOR_C2PA_CERT"), environ.get("DIFFCOLOR_C2PA_KEY")
    if not cert and not key:
        return None
    if not cert or not key:
        raise SigningConfigError("set both DIFFCOLOR_C2PA_CERT and DIFFCOLOR_C2PA_KEY to sign, or neither")
    algorithm = environ.get("DIFFCOLOR_C2PA_ALG", "es256").lower()
    if algorithm not in ALGORITHMS:
        raise SigningConfigError(f"DIFFCOLOR_C2PA_ALG must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    tiff = environ.get("DIFFCOLOR_C2PA_TIFF", "sidecar").lower()
    if tiff not in ("sidecar", "embedded"):
        raise SigningConfigError(f"DIFFCOLOR_C2PA_TIFF must be sidecar or embedded, got {tiff!r}")
    try:
        return Signing(Path(cert).read_bytes(), Path(key).read_bytes(), algorithm,
                       environ.get("DIFFCOLOR_C2PA_TSA") or None, embed_in_tiff=tiff == "embedded")
    except OSError as error:
        raise SigningConfigError(f"signing material unreadable: {error.strerror}: '{error.filename}'") from None


def _manifest(record: dict, mime: str) -> dict:
    prompt = record.get("target_prompt") or record.get("caption")
    assertion = {key: record.get(key) for key in ("item_id", "version", "model_id", "model_hash", "clip_model_id",
                                                   "seed", "alpha", "preset", "source_sha256", "smoke_run")
                 if record.get(key) is not None}
    assertion.update(prompt=prompt, software="DiffColor Archive", software_version=__version__)
    edited = {"action": "c2pa.edited", "digitalSourceType": DIGITAL_SOURCE_TYPE,
              "softwareAgent": {"name": "DiffColor Archive", "version": __version__},
              "description": ("SMOKE RUN, not a colourisation: " if record.get("smoke_run") else "")
              + "colours generated by a diffusion model guided by the prompt; lightness is the source's",
              "parameters": {"prompt": prompt, "model": record.get("model_id")}}
    return {
        "claim_generator_info": [{"name": "DiffColor Archive", "version": __version__}],
        "title": f"{record.get('item_id', 'item')} v{record.get('version', '')}",
        "format": mime,
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": [
                {"action": "c2pa.opened", "parameters": {"ingredientIds": ["source"]}}, edited]}},
            {"label": ASSERTION_LABEL, "data": assertion},
        ],
    }


def sign(data: bytes, format: str, record: dict, source: bytes, source_format: str,
         signing: Signing) -> tuple[bytes, bytes | None]:
    """``data`` (a derivative of ``format``) signed for ``record``, the source as its parent ingredient.

    Returns the file's bytes and, for a TIFF whose manifest goes beside it
    (``signing.embed_in_tiff`` off), the sidecar manifest (None when embedded).
    Raises SigningConfigError when the key or certificate is refused.
    """
    sidecar = format.upper() == "TIFF" and not signing.embed_in_tiff
    signed = io.BytesIO()
    manifest = _sign_stream(io.BytesIO(data), signed, format, record, source, source_format, signing, sidecar)
    return (data, manifest) if sidecar else (signed.getvalue(), None)


def _sign_stream(asset, out, format: str, record: dict, source: bytes, source_format: str, signing: Signing,
                 sidecar: bool) -> bytes:
    """Signs the derivative read from ``asset`` into ``out`` (a signed copy; with ``sidecar``, a copy without
    the manifest); returns the manifest's bytes."""
    import c2pa

    mime, source_mime = MIME_TYPES[format.upper()], MIME_TYPES.get(source_format.upper(), "image/tiff")
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(
            signing.algorithm, signing.certificate_chain, signing.private_key,
            signing.timestamp_url.encode() if signing.timestamp_url else None))
    except c2pa.C2paError as error:
        raise SigningConfigError(f"the C2PA signing key or certificate was refused: {error}") from None
    builder = c2pa.Builder(_manifest(record, mime))
    builder.add_ingredient({"title": f"source of {record.get('item_id', 'item')}", "relationship": "parentOf",
                            "format": source_mime, "label": "source"}, source_mime, io.BytesIO(source))
    if sidecar:
        builder.set_no_embed()
    try:
        return bytes(builder.sign(signer, mime, asset, out))
    except c2pa.C2paError as error:
        raise SigningConfigError(f"C2PA signing failed: {error}") from None


def sign_file(path: str, format: str, record: dict, source: bytes, source_format: str,
              signing: Signing) -> bytes | None:
    """The local file at ``path`` (a derivative of ``format``) signed for ``record`` as :func:`sign` signs
    bytes, read and written as streams (a scan's master is never held in memory).

    With the manifest embedded the file is replaced by its signed copy (written
    beside it, then renamed over it); with a sidecar the file is unchanged.
    Returns the sidecar manifest, or None when embedded.
    Raises SigningConfigError when the key or certificate is refused.
    """
    import tempfile

    sidecar = format.upper() == "TIFF" and not signing.embed_in_tiff
    handle, signed = tempfile.mkstemp(prefix=".signing.", suffix=".partial", dir=os.path.dirname(path) or ".")
    try:
        with open(path, "rb") as asset, os.fdopen(handle, "w+b") as out:
            manifest = _sign_stream(asset, out, format, record, source, source_format, signing, sidecar)
        if sidecar:
            return manifest
        os.chmod(signed, os.stat(path).st_mode & 0o777)
        os.replace(signed, path)
        return None
    finally:
        if os.path.exists(signed):
            os.unlink(signed)


def read_credentials(data: bytes, format: str, sidecar: bytes | None = None) -> dict | None:
    """The active C2PA manifest of ``data`` (or of its ``sidecar``) and its validation; None when there is none.

    Returns ``{"manifest": ..., "validation_state": ..., "validation_status": [...]}``
    as c2pa-python's Reader reports them.
    """
    import c2pa

    try:
        reader = c2pa.Reader(MIME_TYPES[format.upper()], io.BytesIO(data), manifest_data=sidecar)
    except c2pa.C2paError:
        return None
    report = json.loads(reader.json())
    return {"manifest": report["manifests"][report["active_manifest"]],
            "validation_state": report.get("validation_state"),
            "validation_status": report.get("validation_status") or []}
