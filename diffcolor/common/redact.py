"""One redaction rule for every URI and message that leaves the process (docs/DESIGN.md §9, credentials).

Credentials can reach DiffColor in three ways: the environment (AWS variables),
storage options, and the URIs themselves (``s3://KEY:SECRET@bucket/...``,
``https://user:pass@host/...``, presigned ``?X-Amz-Signature=...`` query
strings). Whatever is logged, recorded, reported or written goes through
:func:`redact` first, which removes:

- the user-info part of every URI (``scheme://user:pass@host`` becomes
  ``scheme://***@host``), whatever characters the secret holds (``/``, ``+``,
  ``=``, ``@``, ``:``, ``%2F``: :func:`userinfo_span` says how it is found);
- the values of secret-looking query parameters (signatures, tokens, keys, passwords);
- every known secret value wherever it appears: the credential variables of
  the environment, and each secret :func:`remember_secret` was told about (the
  storage layer remembers the user-info it lifts out of URIs, so the same value
  is also removed from a backend's error text).

Where credentials may come in, they are stopped at the door (docs/SECURITY.md):
the command line lifts S3 credentials out of its URI arguments into the
process's environment and refuses them in any other scheme; a manifest's
``image_uri`` or ``ground_truth_uri`` with credentials is a validation
problem; the flows refuse parameters with credentials
(:func:`refuse_credentials`). Redaction is the second line, for what comes
from elsewhere (a catalogue field, a backend's error text).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable

from diffcolor.common.errors import PermanentError

MASK = "***"
# Environment variables whose values are secrets wherever they show up.
SECRET_ENVIRONMENT = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
                      "PREFECT_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MIN_SECRET_LENGTH = 4  # shorter values are not masked everywhere (they would mask ordinary text)

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A URI inside free text: a scheme, then everything up to white space or a quote.
_URI_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")
# What may follow the '@' that ends a user-info: a host (name, IPv4, [IPv6]), an optional port, then the path.
_HOST_AFTER = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)(?::\d*)?(?=[/?#]|$)")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<name>[?&;#](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token"
    r"|refresh_token|id_token|api_key|apikey|key|secret|password|passwd|client_secret|code)=)(?P<value>[^&;#\s'\"]+)")
_REMEMBERED: set[str] = set()
_LOCK = threading.Lock()


def remember_secret(value: str | None) -> None:
    """Adds ``value`` to the secrets :func:`redact` removes wherever it appears (in this process)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        with _LOCK:
            _REMEMBERED.add(value)


def userinfo_span(uri: str) -> tuple[int, int] | None:
    """Where the user-info of ``uri`` is: ``(start, end)`` with ``uri[end] == "@"``; None when it has none.

    RFC 3986 ends the authority at the first ``/``, ``?`` or ``#``, so a secret
    written unencoded with one of those (real AWS secret keys hold ``/``)
    would hide in the "path". Hence two rules:

    - an ``@`` in the authority: the user-info runs to its last ``@``
      (a host never holds one), so ``:``, ``@`` and ``%XX`` in a secret are covered;
    - otherwise ``user:secret@host`` across a ``/``, ``?`` or ``#``: a ``:``
      before an ``@`` that is followed by a host and then the path (or the end).
      The user-info runs to the first such ``@``: ``s3://KEY:a/b+c@bucket/img@2x.png``
      has the secret ``a/b+c`` and the key ``img@2x.png``.

    The second rule also takes ``http://host:8080/a@b`` for credentials: a
    path's ``@`` after a port must be written ``%40`` (the price of never
    letting a secret through).
    """
    uri = str(uri)
    scheme = _SCHEME.match(uri)
    if scheme is None:
        return None
    start = scheme.end()
    authority_end = next((i for i in range(start, len(uri)) if uri[i] in "/?#"), len(uri))
    at = uri.rfind("@", start, authority_end)
    if at >= 0:
        return start, at
    colon = uri.find(":", start)
    at = uri.find("@", max(colon, start))
    while colon >= 0 and at >= 0:
        if _HOST_AFTER.match(uri, at + 1):
            return start, at
        at = uri.find("@", at + 1)
    return None


def has_userinfo(uri: str) -> bool:
    """Whether ``uri`` carries credentials (a user-info part, :func:`userinfo_span`)."""
    return userinfo_span(uri) is not None


class CredentialsInUriError(PermanentError):
    """A URI given to DiffColor carries credentials where they would be stored with it (a manifest, a flow run)."""

    error_class = "credentials_in_uri"


CREDENTIALS_ADVICE = ("give credentials to the store in the environment instead (AWS_ACCESS_KEY_ID and "
                      "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a .netrc for http(s)): a URI is stored and shown "
                      "wherever it goes")


def refuse_credentials(*uris: str | None, what: str = "URI") -> None:
    """Raises CredentialsInUriError (its message redacted) for the first of ``uris`` that carries credentials.

    The credentials are remembered first (:func:`remember_secret`), so that
    whatever shows the refused URI later in this process masks them too.
    """
    for uri in uris:
        if uri is not None and has_userinfo(uri):
            split_userinfo(uri)
            raise CredentialsInUriError(f"{what} '{redact(uri)}' carries credentials; {CREDENTIALS_ADVICE}")


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user-info, user, password)``: ``s3://KEY:SECRET@b/k`` -> ``("s3://b/k", "KEY", "SECRET")``.

    The user and password are percent-decoded and remembered as secrets (both
    as written and decoded); a URI without user-info comes back unchanged
    with ``(None, None)``. :func:`userinfo_span` says what counts as user-info.
    """
    from urllib.parse import unquote

    uri = str(uri)
    span = userinfo_span(uri)
    if span is None:
        return uri, None, None
    start, end = span
    userinfo = uri[start:end]
    user, colon, password = userinfo.partition(":")
    for value in (userinfo, user, password, unquote(user), unquote(password)):
        remember_secret(value)
    return uri[:start] + uri[end + 1:], unquote(user), unquote(password) if colon else None


def _mask_uri(match: re.Match) -> str:
    uri = match.group(0)
    span = userinfo_span(uri)
    return uri if span is None else f"{uri[:span[0]]}{MASK}{uri[span[1]:]}"


def redact(text: object, extra: Iterable[str] = ()) -> str:
    """``text`` (as a string) with user-info, secret query values and every known secret value masked."""
    text = str(text)
    with _LOCK:
        secrets = set(_REMEMBERED)
    secrets.update(os.environ.get(name, "") for name in SECRET_ENVIRONMENT)
    secrets.update(value for value in extra if value)
    for secret in sorted((s for s in secrets if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URI_IN_TEXT.sub(_mask_uri, text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group('name')}{MASK}", text)


def redact_value(value):
    """``value`` with :func:`redact` applied to every string inside it (dicts, lists and tuples walked)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_value(key): redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(item) for item in value)
    return value
