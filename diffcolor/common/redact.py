"""One redaction rule for every URI and message that leaves the process (spec section 9, credentials).

Credentials can reach DiffColor in three ways: the environment (AWS variables),
storage options, and the URIs themselves (``s3://KEY:SECRET@bucket/...``,
``https://user:pass@host/...``, presigned ``?X-Amz-Signature=...`` query
strings). Whatever is logged, recorded, reported or written goes through
:func:`redact` first, which removes:

- the user-info part of every URI (``scheme://user:pass@host`` becomes
  ``scheme://***@host``);
- the values of secret-looking query parameters (signatures, tokens, keys, passwords);
- every known secret value wherever it appears: the credential variables of
  the environment, and each secret :func:`remember_secret` was told about (the
  storage layer remembers the user-info it lifts out of URIs, so the same value
  is also removed from a backend's error text).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable

MASK = "***"
# Environment variables whose values are secrets wherever they show up.
SECRET_ENVIRONMENT = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
                      "PREFECT_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MIN_SECRET_LENGTH = 4  # shorter values are not masked everywhere (they would mask ordinary text)

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#'\"]+)@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<name>[?&;](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token"
    r"|api_key|apikey|key|secret|password|passwd)=)(?P<value>[^&;#\s'\"]+)")
_REMEMBERED: set[str] = set()
_LOCK = threading.Lock()


def remember_secret(value: str | None) -> None:
    """Adds ``value`` to the secrets :func:`redact` removes wherever it appears (in this process)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        with _LOCK:
            _REMEMBERED.add(value)


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user-info, user, password)``: ``s3://KEY:SECRET@b/k`` -> ``("s3://b/k", "KEY", "SECRET")``.

    The user and password are percent-decoded and remembered as secrets; a URI
    without user-info comes back unchanged with ``(None, None)``.
    """
    from urllib.parse import unquote

    match = _USERINFO.match(str(uri))
    if match is None:
        return str(uri), None, None
    user, _, password = match.group("userinfo").partition(":")
    user, password = unquote(user), unquote(password) if password else None
    for value in (match.group("userinfo"), user, password):
        remember_secret(value)
    return match.group("scheme") + str(uri)[match.end():], user, password


def redact(text: object, extra: Iterable[str] = ()) -> str:
    """``text`` (as a string) with user-info, secret query values and every known secret value masked."""
    text = str(text)
    with _LOCK:
        secrets = set(_REMEMBERED)
    secrets.update(os.environ.get(name, "") for name in SECRET_ENVIRONMENT)
    secrets.update(value for value in extra if value)
    for secret in sorted((s for s in secrets if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
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
