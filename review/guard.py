"""What the review server checks before any route runs: the Host it is asked for, and the size of request bodies.

Two ASGI middlewares (plain ASGI, so that they act on the raw request before
FastAPI reads anything):

- :class:`HostGuard` answers only requests whose ``Host`` names this server:
  a page on another origin that points its own DNS name at 127.0.0.1 (DNS
  rebinding) sends its own name as ``Host`` and is refused, so it cannot read
  what the server shows. Names are compared without case and without a
  trailing dot; the port is not compared (a proxy may add its own). A missing,
  repeated or malformed ``Host`` is refused with 400, an unknown name with 421
  (Misdirected Request).
- :class:`BodyLimit` refuses a request body over ``max_bytes``: by its
  ``Content-Length`` before the route runs, and by counting the bytes of a
  body without one (chunked) as they arrive; either way 413.

:func:`allowed_origins` and :func:`origin_key` give the ``Origin`` check of
state changes the same allow-list, as scheme, host and port, never the
request's own ``Host``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
MAX_BODY_BYTES = 1 * 2**20  # ours: the largest legitimate body (500 recolour targets) is far below
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]{0,252})$")


def normalize_host(name: str) -> str | None:
    """A host name as compared: lower case, no trailing dot, IPv6 without brackets; None when it is not one."""
    name = (name or "").strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if ":" in name:  # an IPv6 address (the only host form with colons)
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            return None
    name = name[:-1] if name.endswith(".") else name
    return name if _HOST_NAME.match(name) and ".." not in name else None


def split_host_header(value: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of a ``Host`` header value (host normalized, port None when absent); None when malformed."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
    elif value.count(":") > 1:  # a bare IPv6 address is not a valid Host (RFC 9110: brackets)
        return None
    else:
        host, _, port_text = value.partition(":")
        rest = f":{port_text}" if _ else ""
    port = None
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or not 0 < int(rest[1:]) < 65536:
            return None
        port = int(rest[1:])
    name = normalize_host(host)
    return (name, port) if name else None


def allowed_names(host: str, extra: tuple[str, ...] | list[str] = ()) -> frozenset[str]:
    """The host names a server started on ``host`` answers: the loopback names, ``host``, and ``extra``."""
    names = {normalize_host(name) for name in (*LOOPBACK_NAMES, host, *extra)}
    return frozenset(name for name in names if name)


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an ``Origin`` header (the default port made explicit); None when malformed."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query or parts.username:
        return None
    name = normalize_host(parts.hostname or "")
    if not name:
        return None
    return parts.scheme, name, port or (443 if parts.scheme == "https" else 80)


def allowed_origins(host: str, port: int | None, extra: tuple[str, ...] | list[str] = ()) -> frozenset:
    """The origins whose pages may change things: every allowed name at the server's port (http or https);
    names given with ``--allowed-host`` also at the default ports, as a proxy in front serves them."""
    keys = set()
    for name in allowed_names(host):
        for scheme in ("http", "https"):
            keys.add((scheme, name, port or (443 if scheme == "https" else 80)))
    for name in allowed_names(host, extra) - allowed_names(host):
        for scheme, default in (("http", 80), ("https", 443)):
            keys.update({(scheme, name, default), (scheme, name, port or default)})
    return frozenset(keys)


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class HostGuard:
    """Refuses every request whose ``Host`` is not one of ``names`` (see the module docstring)."""

    def __init__(self, app, names: frozenset[str]):
        self.app, self.names = app, names

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        values = [value.decode("latin-1") for key, value in scope.get("headers", []) if key == b"host"]
        parsed = split_host_header(values[0]) if len(values) == 1 else None
        if parsed is None:
            return await _refuse(send, 400, "a request needs one well-formed Host header")
        if parsed[0] not in self.names:
            return await _refuse(send, 421, "this server does not answer for that host name "
                                            "(start it with --allowed-host NAME to add one)")
        return await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413 (see the module docstring)."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        detail = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        lengths = [value for key, value in scope.get("headers", []) if key == b"content-length"]
        try:
            if any(int(value) > self.max_bytes for value in lengths):
                return await _refuse(send, 413, detail)
        except ValueError:
            return await _refuse(send, 400, "a malformed Content-Length header")
        received, started, refused = 0, False, False

        async def counted_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    raise _TooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return  # the 413 is the answer; the route's own is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not refused:
                raise
        if refused and not started:
            await _refuse(send, 413, detail)


class RedactQuery(logging.Filter):
    """Masks the value of every ``token`` query parameter in a log record (uvicorn's access log prints query strings)."""

    _TOKEN = re.compile(r"(?i)([?&;]token=)[^&\s\"' ]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._TOKEN.sub(r"\1***", arg) if isinstance(arg, str) else arg for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = self._TOKEN.sub(r"\1***", record.msg)
        return True
