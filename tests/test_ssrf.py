"""URLs from outside never reach this host's own network unless the operator allows the host (docs/DESIGN.md §9).

A real HTTP server on 127.0.0.1 stands for the internal service an attacker
aims at: each test checks both the answer DiffColor gives and what the server
saw (no request at all, when refused).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from diffcolor.archive import outside, storage
from diffcolor.archive.outside import ALLOW_HOSTS_ENV, ForbiddenAddressError, forbidden_reason
from diffcolor.common.errors import PermanentError

BODY = b"internal secret page"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.seen.append((self.command, self.path, self.headers.get("Host")))
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_response(404)
            self.end_headers()
            return
        status, headers, body = route
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value.replace("PORT", str(self.server.server_port)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """``(base URL, server)`` of an HTTP server on 127.0.0.1; ``server.seen`` lists the requests it got."""
    monkeypatch.delenv(ALLOW_HOSTS_ENV, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.seen, httpd.routes = [], {"/secret": (200, {}, BODY)}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_loopback_server_is_refused_unless_allowed_and_then_read(server, monkeypatch):
    base, httpd = server
    with pytest.raises(ForbiddenAddressError, match=r"loopback address.*--allow-host 127\.0\.0\.1"):
        storage.read_bytes(f"{base}/secret", storage.ReadLimits())
    assert httpd.seen == []  # refused before any connection
    monkeypatch.setenv(ALLOW_HOSTS_ENV, "127.0.0.1")
    assert storage.read_bytes(f"{base}/secret", storage.ReadLimits()) == BODY
    assert storage.exists(f"{base}/secret") and not storage.exists(f"{base}/nothing")


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]",
                                  "[::ffff:7f00:1]", "[64:ff9b::7f00:1]", "localhost", "[::1]", "0.0.0.0"])
def test_every_spelling_of_loopback_is_refused(server, host):
    base, httpd = server
    url = f"http://{host}:{httpd.server_port}/secret"
    with pytest.raises(ForbiddenAddressError):
        storage.read_bytes(url)
    assert httpd.seen == []


@pytest.mark.parametrize("address", ["169.254.169.254", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
                                     "224.0.0.1", "255.255.255.255", "0.0.0.0", "fe80::1", "fc00::1", "fd12:3456::1",
                                     "::", "ff02::1", "::ffff:169.254.169.254", "64:ff9b::a00:1", "2002:a00:1::1",
                                     "fec0::1"])
def test_internal_addresses_are_forbidden_and_public_ones_are_not(address):
    assert forbidden_reason(ipaddress.ip_address(address)) is not None
    for public in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34"):
        assert forbidden_reason(ipaddress.ip_address(public)) is None


def test_the_metadata_service_is_refused_without_a_connection(monkeypatch):
    def no_connection(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(outside, "_connect", no_connection)
    with pytest.raises(ForbiddenAddressError, match="link-local"):
        storage.read_bytes("http://169.254.169.254/latest/meta-data/iam/security-credentials/")


def test_a_host_with_one_forbidden_address_among_public_ones_is_refused(server, monkeypatch):
    base, httpd = server
    real = socket.getaddrinfo

    def mixed(host, *args, **kwargs):
        if host == "images.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", mixed)
    with pytest.raises(ForbiddenAddressError, match=r"images\.example \(127\.0\.0\.1\)"):
        storage.read_bytes(f"http://images.example:{httpd.server_port}/secret")


def test_the_connection_goes_to_the_address_checked_not_to_a_second_answer(server, monkeypatch):
    # DNS rebinding: the first answer passes the check, a later one would point elsewhere. The fetch must
    # connect to the address it checked (here the allowed loopback server) and never ask again.
    base, httpd = server
    real, answers = socket.getaddrinfo, []

    def rebinding(host, port, *args, **kwargs):
        if host != "images.example":
            return real(host, port, *args, **kwargs)
        answers.append(host)
        address = "127.0.0.1" if len(answers) == 1 else "10.9.9.9"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setenv(ALLOW_HOSTS_ENV, "127.0.0.0/8")
    assert storage.read_bytes(f"http://images.example:{httpd.server_port}/secret") == BODY
    assert answers == ["images.example"]
    assert httpd.seen == [("GET", "/secret", f"images.example:{httpd.server_port}")]  # the URL's host, pinned address


def test_redirects_are_checked_at_every_hop_and_capped(server, monkeypatch):
    base, httpd = server
    httpd.routes.update({
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/to-gopher": (307, {"Location": "gopher://127.0.0.1:PORT/_x"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/ok": (308, {"Location": "/secret"}, b""),
    })
    monkeypatch.setenv(ALLOW_HOSTS_ENV, "127.0.0.1")  # the first host is allowed; where it sends us is checked anew
    with pytest.raises(ForbiddenAddressError, match="169.254.169.254"):
        storage.read_bytes(f"{base}/to-metadata")
    for route in ("/to-file", "/to-gopher"):
        with pytest.raises(ForbiddenAddressError, match="not an http"):
            storage.read_bytes(f"{base}{route}")
    monkeypatch.setenv(ALLOW_HOSTS_ENV, "localhost")  # allowed by name; its redirect to 127.0.0.1 by name is not
    monkeypatch.setattr(socket, "getaddrinfo", _only_ipv4(socket.getaddrinfo))
    httpd.routes["/to-loopback-by-address"] = (302, {"Location": "http://127.0.0.1:PORT/secret"}, b"")
    with pytest.raises(ForbiddenAddressError, match="127.0.0.1"):
        storage.read_bytes(f"http://localhost:{httpd.server_port}/to-loopback-by-address")
    assert ("GET", "/secret", f"127.0.0.1:{httpd.server_port}") not in httpd.seen
    monkeypatch.setenv(ALLOW_HOSTS_ENV, "127.0.0.1")
    httpd.seen.clear()
    with pytest.raises(storage.InputUnavailableError, match="more than 5"):
        storage.read_bytes(f"{base}/loop")
    assert len(httpd.seen) == outside.MAX_REDIRECTS + 1
    assert storage.read_bytes(f"{base}/ok") == BODY


def _only_ipv4(real):
    def resolve(host, port, *args, **kwargs):
        return [answer for answer in real(host, port, *args, **kwargs) if answer[0] == socket.AF_INET]
    return resolve


def _command(capsys, *args: str) -> tuple[int, str, str]:
    """``diffcolor ARGS`` in this process: (exit status, stdout, stderr)."""
    from diffcolor.cli import main

    code = main(list(args))
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def test_the_iiif_import_and_the_cli_refuse_loopback_and_take_allow_host(server, tmp_path, capsys, monkeypatch):
    base, httpd = server
    image = f"{base}/iiif/plate-1"
    info = {"@context": "http://iiif.io/api/image/3/context.json", "id": image, "type": "ImageService3",
            "protocol": "http://iiif.io/api/image", "profile": "level1", "width": 4000, "height": 3000,
            "maxWidth": 2000}
    manifest = {"@context": "http://iiif.io/api/presentation/3/context.json", "id": f"{base}/manifest.json",
                "type": "Manifest", "label": {"en": ["Harbour views"]},
                "items": [{"id": f"{base}/canvas/1", "type": "Canvas", "label": {"en": ["Boats in the harbour"]},
                           "items": [{"type": "AnnotationPage", "items": [
                               {"type": "Annotation", "motivation": "painting",
                                "body": {"id": f"{image}/full/max/0/default.jpg", "type": "Image",
                                         "service": [{"id": image, "type": "ImageService3"}]}}]}]}]}
    httpd.routes.update({"/manifest.json": (200, {}, json.dumps(manifest).encode()),
                         "/iiif/plate-1/info.json": (200, {}, json.dumps(info).encode())})
    out = tmp_path / "m.parquet"
    build = ("manifest", "build", "--from-iiif", f"{base}/manifest.json", "--image-info", f"{image}/info.json",
             "-o", str(out))
    monkeypatch.setenv(ALLOW_HOSTS_ENV, "")  # restored after the test: --allow-host below adds to it
    code, _, err = _command(capsys, *build)
    assert code == 2 and "loopback" in err and "--allow-host" in err and len(err.splitlines()) == 1
    assert httpd.seen == [] and not out.exists()

    code, _, err = _command(capsys, *build, "--allow-host", "127.0.0.1")
    assert code == 0, err
    assert {path for _, path, _ in httpd.seen} == {"/manifest.json", "/iiif/plate-1/info.json"}
    import pyarrow.parquet as pq

    assert pq.read_table(out).column("image_uri").to_pylist() == [f"{image}/full/2000,1500/0/default.jpg"]

    # Validating a manifest given by URL, and colourising an image URL, are checked the same way.
    httpd.routes["/m.parquet"] = (200, {}, out.read_bytes())
    httpd.seen.clear()
    monkeypatch.setenv(ALLOW_HOSTS_ENV, "")
    assert _command(capsys, "manifest", "validate", f"{base}/m.parquet")[0] == 2 and httpd.seen == []
    monkeypatch.setenv(ALLOW_HOSTS_ENV, "127.0.0.1")
    assert _command(capsys, "manifest", "validate", f"{base}/m.parquet")[0] == 0
    monkeypatch.setenv(ALLOW_HOSTS_ENV, "")
    code, _, err = _command(capsys, "colorize", f"{base}/secret", "--caption", "a boat in the harbour", "--out",
                            str(tmp_path / "item"), "--model", "tiny")
    assert code == 2 and "refused" in err and len(err.splitlines()) == 1


def _certificate(tmp_path, name: str):
    """(CA file, server cert file, key file): a throwaway CA and a certificate for ``name`` it signed."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False).sign(ca_key, hashes.SHA256()))
    files = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    files[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return files


@pytest.mark.parametrize("certified", ["images.example", "other.example"])
def test_https_connects_to_the_checked_address_and_verifies_the_url_host(certified, server, tmp_path, monkeypatch):
    import ssl

    base, httpd = server
    ca, cert, key = _certificate(tmp_path, certified)
    names = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda connection, name, _: names.append(name)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *args, **kwargs: real(
        "127.0.0.1" if host == "images.example" else host, port, *args, **kwargs))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    url = f"https://images.example:{httpd.server_port}/secret"
    with pytest.raises(ForbiddenAddressError):
        storage.read_bytes(url)
    assert names == []
    monkeypatch.setenv(ALLOW_HOSTS_ENV, "127.0.0.1")
    if certified == "images.example":
        assert storage.read_bytes(url) == BODY
        assert httpd.seen == [("GET", "/secret", f"images.example:{httpd.server_port}")]
    else:  # the certificate is checked against the URL's host, not the address connected to
        with pytest.raises(storage.InputUnavailableError, match="TLS failed"):
            storage.read_bytes(url)
    assert names == ["images.example"]  # SNI: the URL's host


@pytest.mark.parametrize("uri", ["ftp://127.0.0.1/a.png", "sftp://127.0.0.1/a.png", "webhdfs://127.0.0.1/a.png",
                                 "simplecache::http://169.254.169.254/latest/meta-data/",
                                 "blockcache::https://127.0.0.1/a.png", "zip://a.png::http://127.0.0.1/a.zip",
                                 "reference://", "HTTP://127.0.0.1/a.png"])
def test_other_protocols_and_chained_urls_never_open_a_connection(uri, server):
    base, httpd = server
    with pytest.raises(PermanentError):  # refused, never retried
        storage.read_bytes(uri)
    assert httpd.seen == []


@pytest.mark.slow  # a whole flow run (models loaded) for what the storage tests above check at the read
def test_manifest_image_urls_on_loopback_and_link_local_fail_their_items(prefect_server, server, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffcolor.archive.results import read_results
    from flows.collection import RunOptions, colorize_collection

    base, httpd = server
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"item_id": "inside", "image_uri": f"{base}/secret", "caption": "a dog on a bench", "seed": 1},
        {"item_id": "metadata", "image_uri": "http://169.254.169.254/latest/meta-data/", "caption": "a dog on a bench",
         "seed": 2}]), manifest)
    options = RunOptions(preset="smoke", pool="inline", retry_delay_seconds=[0.1])

    state = colorize_collection(str(manifest), str(tmp_path / "out"), "tiny", options, return_state=True)
    rows = {row["item_id"]: row for row in read_results(state.result(raise_on_failure=False)["results"]).to_pylist()}
    assert {row["error_class"] for row in rows.values()} == {"input_unavailable"}
    assert "loopback" in rows["inside"]["error_message"] and "link-local" in rows["metadata"]["error_message"]
    assert httpd.seen == []
