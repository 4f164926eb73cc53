"""Reading http(s) URLs that came from outside without reaching this host's own network (SSRF).

An image URL in a manifest or a IIIF manifest, an ``info.json``, a manifest
given by URL: anyone may have written it, and a worker that fetched it
wherever it points would read the cloud's metadata service
(``169.254.169.254``), an admin page on loopback, or a service of the private
network, and put what it got into an archive. So every http(s) read of
DiffColor goes through :func:`fetch`, which:

- resolves the host and checks EVERY address it resolves to; a host with one
  forbidden address is refused: loopback, link-local, private (RFC 1918),
  unique-local ``fc00::/7``, shared ``100.64.0.0/10`` (CGNAT), unspecified,
  multicast, reserved and any other non-global address, also when written as
  a decimal, octal or hex IPv4 literal (``http://2130706433/``,
  ``http://0x7f.1/``) or embedded in an IPv6 one (IPv4-mapped
  ``::ffff:127.0.0.1``, NAT64 ``64:ff9b::/96``, 6to4, Teredo);
- connects to the address it checked (the TLS name and the Host header are
  still the URL's host), so a DNS answer that changes between the check and
  the connection (DNS rebinding) cannot move the request;
- follows at most :data:`MAX_REDIRECTS` redirects itself, checking each
  target the same way and refusing any that is not http(s);
- reads within the caller's :class:`~diffcolor.archive.storage.ReadLimits`.

The operator allows hosts that must be reached anyway (an image server on the
private network) with ``DIFFCOLOR_ALLOW_HOSTS`` (comma-separated host names,
IP addresses or networks: ``images.internal,10.2.0.0/16``) or the command
line's ``--allow-host`` (which sets it for the run's processes). An allowed
host name is reached whatever it resolves to; an allowed address or network
allows the addresses in it. Proxies (``HTTP_PROXY``) are not used: a proxy
resolves names itself, where no check can follow.

Errors: a refused address or redirect raises :class:`ForbiddenAddressError`
(permanent, class ``input_unavailable``); 404/410 MissingObjectError; other
4xx, TLS failures and unresolvable hosts InputUnavailableError; 5xx, 429,
timeouts and connection errors StorageError (transient). Messages show URLs
redacted.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from diffcolor.common.errors import BadImageError, InputUnavailableError, MissingObjectError, StorageError
from diffcolor.common.redact import redact

ALLOW_HOSTS_ENV = "DIFFCOLOR_ALLOW_HOSTS"
MAX_REDIRECTS = 5  # ours: IIIF servers redirect once or twice (http -> https, an id -> its current path)
CONNECT_SECONDS = 30.0
READ_CHUNK_BYTES = 1 << 20
USER_AGENT = "DiffColor-Archive"
_REDIRECTS = (301, 302, 303, 307, 308)
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"  # what a request target keeps as it is (the rest is percent-encoded)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"),)
_SHARED = ipaddress.ip_network("100.64.0.0/10")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ForbiddenAddressError(InputUnavailableError):
    """A URL from outside points at an address of this host's own network, and the operator did not allow it."""


def is_http(uri: str) -> bool:
    """Whether ``uri`` is an http(s) URL (read through :func:`fetch`, never fsspec's http filesystem)."""
    return str(uri).lower().startswith(("http://", "https://"))


# ---------------------------------------------------------------------------
# The address policy


def forbidden_reason(address: Address) -> str | None:
    """Why ``address`` may not be reached from outside input ("loopback", ...); None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and any(address in network for network in _NAT64):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            reason = forbidden_reason(embedded)
            return f"{reason} ({embedded} inside {address})" if reason else None
        if address.teredo:
            reasons = [forbidden_reason(part) for part in address.teredo]
            return next((f"{reason} (inside Teredo {address})" for reason in reasons if reason), None)
    for test, reason in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                         ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                         ("is_site_local", "site-local")):
        if getattr(address, test, False):
            return reason
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "shared address space (CGNAT, 100.64.0.0/10)"
    if isinstance(address, ipaddress.IPv6Address) and address in ipaddress.ip_network("fc00::/7"):
        return "unique-local (fc00::/7)"
    if address.is_private:
        return "private"
    if address.is_reserved or not address.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class AllowList:
    """The hosts and networks the operator allows outside URLs to reach (``DIFFCOLOR_ALLOW_HOSTS``)."""

    names: frozenset[str] = frozenset()
    networks: tuple = ()

    @classmethod
    def parse(cls, text: str | None) -> "AllowList":
        """``"images.internal, 10.2.0.0/16, 127.0.0.1"`` -> the names and the networks (an address is a /32 or /128)."""
        names, networks = set(), []
        for entry in (text or "").replace(";", ",").replace(" ", ",").split(","):
            entry = entry.strip().strip("[]").lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry)
        return cls(frozenset(names), tuple(networks))

    @classmethod
    def from_environment(cls) -> "AllowList":
        return cls.parse(os.environ.get(ALLOW_HOSTS_ENV))

    def allows_name(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.names

    def allows_address(self, address: Address) -> bool:
        candidates = [address] + ([address.ipv4_mapped] if getattr(address, "ipv4_mapped", None) else [])
        return any(candidate in network for candidate in candidates for network in self.networks
                   if candidate.version == network.version)


def allow_hosts(hosts) -> None:
    """Adds ``hosts`` to ``DIFFCOLOR_ALLOW_HOSTS`` of this process (inherited by the workers it starts)."""
    current = [part for part in os.environ.get(ALLOW_HOSTS_ENV, "").split(",") if part.strip()]
    os.environ[ALLOW_HOSTS_ENV] = ",".join(dict.fromkeys([*current, *(host.strip() for host in hosts if host.strip())]))


def _advice(host: str) -> str:
    return f"if this host is yours to reach, allow it: --allow-host {host} (or {ALLOW_HOSTS_ENV}={host})"


def resolve_checked(url: str, allow: AllowList | None = None) -> tuple[str, int, list[Address]]:
    """(host, port, the addresses to connect to) of an http(s) ``url``, every address it resolves to checked.

    Raises ForbiddenAddressError when any resolved address is forbidden and
    neither the host name nor that address is allowed; InputUnavailableError
    when the URL is not http(s) or its host does not resolve.
    """
    allow = AllowList.from_environment() if allow is None else allow
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as error:
        raise InputUnavailableError(f"'{redact(url)}' is not a valid URL ({error})") from None
    host = parts.hostname
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise InputUnavailableError(f"'{redact(url)}' is not an http(s) URL with a host")
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as error:
        raise InputUnavailableError(f"'{redact(url)}': host {host!r} cannot be resolved ({error})") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(answer[4][0].split("%", 1)[0]) for answer in answers))
    if not addresses:
        raise InputUnavailableError(f"'{redact(url)}': host {host!r} resolves to no address")
    if not allow.allows_name(host):
        for address in addresses:
            reason = forbidden_reason(address)
            if reason and not allow.allows_address(address):
                shown = host if host == str(address) else f"{host} ({address})"
                raise ForbiddenAddressError(
                    f"'{redact(url)}' refused: {shown} is a {reason} address, and URLs from outside may not reach "
                    f"this host's own network; {_advice(host)}")
    return host, port, addresses


# ---------------------------------------------------------------------------
# The request


def _connection_pool(scheme: str, host: str, port: int, address: Address, timeout):
    import urllib3

    if scheme == "https":
        return urllib3.HTTPSConnectionPool(str(address), port, timeout=timeout, retries=False, maxsize=1,
                                           cert_reqs="CERT_REQUIRED", server_hostname=host, assert_hostname=host)
    return urllib3.HTTPConnectionPool(str(address), port, timeout=timeout, retries=False, maxsize=1)


def _host_header(host: str, port: int, scheme: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == (443 if scheme == "https" else 80) else f"{shown}:{port}"


def fetch(url: str, *, max_bytes: int = 2 * 2**30, seconds: float = 600.0, method: str = "GET",
          allow: AllowList | None = None) -> bytes:
    """The body of ``url`` (GET), or b"" after a successful HEAD; checked as the module docstring says.

    Raises ForbiddenAddressError, MissingObjectError, InputUnavailableError,
    BadImageError (larger than ``max_bytes``) or StorageError (transient).
    """
    allow = AllowList.from_environment() if allow is None else allow
    deadline = time.monotonic() + seconds
    current = str(url)
    for _ in range(MAX_REDIRECTS + 1):
        host, port, addresses = resolve_checked(current, allow)  # raises for anything but a valid http(s) URL
        parts = urlsplit(current)
        target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_URL_SAFE)
        try:
            host = host.encode("idna").decode("ascii")  # the TLS name and Host header of an internationalised name
        except UnicodeError as error:
            raise InputUnavailableError(f"'{redact(current)}': host {host!r} is not a valid name ({error})") from None
        pool, response = _connect(parts.scheme.lower(), host, port, addresses, method, target, current, deadline)
        try:
            if response.status in _REDIRECTS and response.headers.get("Location"):
                following = urljoin(current, response.headers["Location"].strip())
                if urlsplit(following).scheme.lower() not in ("http", "https"):
                    raise ForbiddenAddressError(f"'{redact(current)}' redirects to '{redact(following)}', which is "
                                                "not an http(s) URL; refused")
                current = following
                continue
            if method == "HEAD" and response.status in (405, 501):
                return b""  # a server that answers no HEAD: the read itself will say whether the object is there
            _check_status(response.status, current)
            if method == "HEAD":
                return b""
            return _read_body(response, current, max_bytes, deadline, seconds)
        finally:
            response.release_conn()
            pool.close()
    raise InputUnavailableError(f"'{redact(url)}' redirects more than {MAX_REDIRECTS} times; refused")


def _connect(scheme: str, host: str, port: int, addresses: list[Address], method: str, target: str, url: str,
             deadline: float):
    """(pool, response) of the request sent to the first of the checked ``addresses`` that accepts a connection."""
    import urllib3

    headers = {"Host": _host_header(host, port, scheme), "User-Agent": USER_AGENT, "Accept": "*/*",
               "Accept-Encoding": "identity"}  # the size limit counts the bytes as stored, never a decompression
    for number, address in enumerate(addresses, start=1):
        remaining = max(0.1, deadline - time.monotonic())
        timeout = urllib3.Timeout(connect=min(CONNECT_SECONDS, remaining), read=remaining)
        pool = _connection_pool(scheme, host, port, address, timeout)
        try:
            return pool, pool.urlopen(method, target, headers=headers, redirect=False, retries=False,
                                      preload_content=False, assert_same_host=False)
        except urllib3.exceptions.SSLError as error:
            pool.close()
            raise InputUnavailableError(f"'{redact(url)}': TLS failed ({error})") from None
        except urllib3.exceptions.NewConnectionError as error:
            pool.close()
            if number < len(addresses):
                continue  # the host's next address (IPv6 and IPv4, say)
            raise StorageError(f"reading '{redact(url)}' failed: cannot connect ({redact(error)})") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            pool.close()
            raise StorageError(f"reading '{redact(url)}' failed: {type(error).__name__}: {redact(error)}") from None
        except ValueError as error:  # a request http.client refuses to send (a control character in it)
            pool.close()
            raise InputUnavailableError(f"'{redact(url)}' cannot be requested ({redact(error)})") from None
    raise AssertionError("resolve_checked returns at least one address")


def _check_status(status: int, url: str) -> None:
    if 200 <= status < 300:
        return
    if status in (404, 410):
        raise MissingObjectError(f"'{redact(url)}' does not exist (HTTP {status})")
    if status in (401, 403):
        raise InputUnavailableError(f"'{redact(url)}' cannot be read: permission denied (HTTP {status})")
    if status == 429 or status >= 500:
        raise StorageError(f"reading '{redact(url)}' failed: HTTP {status}")
    raise InputUnavailableError(f"'{redact(url)}' cannot be read (HTTP {status})")


def _read_body(response, url: str, max_bytes: int, deadline: float, seconds: float) -> bytes:
    import urllib3

    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise BadImageError(f"'{redact(url)}' is larger than the source limit of {max_bytes} bytes ({length} bytes)")
    chunks, total = [], 0
    try:
        while True:
            chunk = response.read1(READ_CHUNK_BYTES)  # what has come, not a full chunk: the deadline holds
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > max_bytes:
                raise BadImageError(f"'{redact(url)}' is larger than the source limit of {max_bytes} bytes "
                                    f"(at least {total} bytes)")
            if time.monotonic() > deadline:
                raise InputUnavailableError(f"'{redact(url)}' was not read within {seconds:g} s ({total} bytes so "
                                            f"far); the source limit is {seconds:g} s")
            chunks.append(chunk)
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise StorageError(f"reading '{redact(url)}' failed: {type(error).__name__}: {redact(error)}") from None
