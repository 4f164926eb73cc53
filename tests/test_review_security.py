"""The review server under attack: Host names, token handling, bearer scripts, body and prompt limits,
concurrent decisions, symbolic links out of the output (also for `diffcolor bag` and IIIF publishing).

Where the point is the server's real behaviour (the Host it answers, what it
prints, how it reads bodies) the tests talk HTTP to `diffcolor review` running
in a subprocess on 127.0.0.1; the rest use FastAPI's TestClient. Concurrent
decisions are made by real processes, on local disk and on a real S3 API.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import multiprocessing
import os
import random
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_review import CAPTION, TOKEN, FakeJobs, _write_item

from diffcolor.archive import storage
from diffcolor.archive.bag import BagError, write_bag
from diffcolor.archive.decisions import pointer_of, read_decisions, record_decision
from diffcolor.archive.iiif_publish import publish_iiif
from diffcolor.archive.items import ItemLayout
from diffcolor.archive.results import write_results
from diffcolor.cli import main
from review.app import MAX_PROMPT_CHARS, ReviewConfig, create_app
from review.guard import MAX_BODY_BYTES, RedactQuery

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _collection(out: str) -> str:
    records = [_write_item(out, "fitted", state=True), _write_item(out, "nostate", state=False)]
    write_results(records, f"{out}/runs/20260101T000000Z-aaaaaa/results.parquet")
    return out


class Server:
    """`diffcolor review OUT` in a subprocess on 127.0.0.1, its stdout and stderr kept in files."""

    def __init__(self, tmp: Path, *args: str):
        self.port, self.log = _free_port(), tmp / "server.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "diffcolor", "review", *args, "--port", str(self.port)],
            stdout=open(tmp / "server.out", "wb"), stderr=open(self.log, "wb"), env=env, cwd=tmp)
        self.tmp = tmp
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.request("GET", "/favicon.ico").status == 204:
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the review server did not start: {self.output()}")
            time.sleep(0.3)

    def request(self, method: str, path: str, *, host: str | None = None, body: bytes | None = None,
                headers: dict | None = None, timeout: float = 30) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host if host is not None else f"127.0.0.1:{self.port}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        response.data = response.read()
        connection.close()
        return response

    def raw(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as connection:
            connection.sendall(data)
            return connection.recv(65536)

    def output(self) -> str:
        return (self.tmp / "server.out").read_text(errors="replace") + self.log.read_text(errors="replace")

    def stop(self, signal_number: int = 2) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal_number)  # 2, Ctrl-C, or 15: uvicorn shuts down, the CLI cleans up
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start(tmp: Path) -> Server:
    """A real server, started without --token-file (so with a private token file), on a small collection."""
    out = _collection(str(tmp / "out"))
    running = Server(tmp, out, "--allowed-host", "review.example.org")
    match = re.search(r"with the token in (\S+)", running.output())
    assert match, running.output()
    running.token_file = Path(match.group(1))
    running.token = running.token_file.read_text().strip()
    running.out = out
    return running


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = _start(tmp_path_factory.mktemp("review-server"))
    yield running
    running.stop()


# 1. Host names: only those the server was started for, before any route runs.

ALLOWED_HOSTS = ("127.0.0.1:{port}", "127.0.0.1", "localhost:{port}", "LocalHost.:{port}", "[::1]:{port}",
                 "[0:0:0:0:0:0:0:1]:{port}", "review.example.org", "REVIEW.example.org.:443")
REFUSED_HOSTS = ("evil.example:{port}", "evil.example", "127.0.0.1.evil.example:{port}", "localhost.evil:{port}",
                 "review.example.org.evil", "[::2]:{port}", "127.0.0.2:{port}", "0.0.0.0:{port}", "",
                 "localhost:notaport", "[::1", "::1", "localhost:{port}:1", "localhost:0", "a..b")


def test_only_the_host_names_the_server_was_started_for_are_answered(server):
    for host in ALLOWED_HOSTS:
        response = server.request("GET", "/api/items", host=host.format(port=server.port))
        assert response.status == 200 and json.loads(response.data)["total"] == 2, host
    for host in REFUSED_HOSTS:
        for path in ("/api/items", "/", "/api/items/fitted/versions/1/image", "/no-such-route"):
            response = server.request("GET", path, host=host.format(port=server.port))
            assert response.status in (400, 421), (host, path, response.status)
            assert b"fitted" not in response.data and b"Dog" not in response.data
    # A change by a rebinding page with the right token still never reaches the route.
    refused = server.request("POST", "/api/items/fitted/decisions", host=f"evil.example:{server.port}",
                             headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"},
                             body=json.dumps({"version": 1, "decision": "approved", "decided_by": "x"}).encode())
    assert refused.status == 421 and not os.path.exists(f"{server.out}/items/fitted/decisions")
    # No Host at all (HTTP/1.0), and two Host headers.
    assert server.raw(b"GET /api/items HTTP/1.0\r\n\r\n").split(b"\r\n")[0].split()[1] in (b"400", b"421")
    twice = server.raw(f"GET /api/items HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nHost: evil.example\r\n"
                       "Connection: close\r\n\r\n".encode())
    assert twice.split(b"\r\n")[0].split()[1] == b"400"


def test_origin_is_checked_against_the_allow_list_never_against_the_requests_own_host(tmp_path):
    out = _collection(str(tmp_path / "out"))
    review = ReviewConfig(output=out, token=TOKEN, port=8765, allowed_hosts=("review.example.org",))
    client = TestClient(create_app(review, FakeJobs()), base_url="http://127.0.0.1:8765")
    client.post("/login", data={"token": TOKEN}, headers={"Origin": "http://127.0.0.1:8765"})

    def approve(origin: str | None, host: str = "127.0.0.1:8765") -> int:
        headers = {"X-CSRF-Token": review.csrf, "Host": host, **({"Origin": origin} if origin else {})}
        return client.post("/api/items/fitted/decisions", headers=headers,
                           json={"version": 1, "decision": "approved", "decided_by": "Ada"}).status_code

    # A page of this server (or of the name a proxy serves it under) may; none other may, whatever Host says.
    for origin in ("http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765", "https://review.example.org",
                   "http://review.example.org"):
        assert approve(origin) == 201, origin
    for origin, host in (("http://127.0.0.1:9999", "127.0.0.1:9999"), ("http://localhost:3000", "localhost:3000"),
                         ("http://evil.example", "127.0.0.1:8765"), ("null", "127.0.0.1:8765"),
                         ("http://127.0.0.1.evil.example:8765", "127.0.0.1:8765"), ("file://", "127.0.0.1:8765"),
                         ("http://localhost", "localhost")):
        assert approve(origin, host) == 403, origin
    assert len(read_decisions(out, "fitted")) == 5


def test_allowed_host_names_are_checked_when_the_server_starts(tmp_path, capsys):
    assert main(["review", str(tmp_path), "--allowed-host", "evil/../x"]) == 2
    assert "'evil/../x' is not a host name" in capsys.readouterr().err


# 2. The token is never printed; it is read from a private file and given in a form, never in a URL.

def test_the_token_is_never_printed_and_lives_in_a_private_file(tmp_path):
    server = _start(tmp_path)
    token, token_file = server.token, server.token_file
    assert len(token) >= 32 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    assert f"127.0.0.1:{server.port}/login" in server.output()
    # A token in a URL is refused, not used (URLs are logged); the form signs in.
    in_url = server.request("GET", f"/login?token={token}")
    assert in_url.status == 400 and "set-cookie" not in {name.lower() for name, _ in in_url.getheaders()}
    assert server.request("POST", "/login", body=f"token={token}x".encode(),
                          headers={"Content-Type": "application/x-www-form-urlencoded"}).status == 401
    signed = server.request("POST", "/login", body=f"token={token}".encode(),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert signed.status == 303 and "HttpOnly" in signed.getheader("set-cookie")
    assert "SameSite=strict" in signed.getheader("set-cookie")
    server.stop(15)  # SIGTERM: the server stops cleanly and says so with 128 + 15, as every command does
    assert server.process.returncode == 143 and token not in server.output()
    assert not token_file.exists()  # removed when the server stops


def test_a_missing_or_unreadable_token_file_is_one_line_and_exit_2(tmp_path, capsys):
    for bad in (tmp_path / "missing", tmp_path):
        assert main(["review", str(tmp_path), "--token-file", str(bad)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"diffcolor: error: --token-file '{bad}' cannot be read") and error.count("\n") == 1
    (tmp_path / "short").write_text("abc")
    assert main(["review", str(tmp_path), "--token-file", str(tmp_path / "short")]) == 2
    assert "at least 16 characters" in capsys.readouterr().err


def test_access_log_lines_never_show_a_token():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/login?a=1&token=SECRET-VALUE&b=2", "1.1", 400), None)
    RedactQuery().filter(record)
    assert "SECRET-VALUE" not in record.getMessage() and "token=***" in record.getMessage()


# 3. Scripts with a bearer token need no CSRF header; cookie sessions do.

def test_a_bearer_script_needs_no_csrf_header_and_the_api_page_says_how(tmp_path):
    out = _collection(str(tmp_path / "out"))
    client = TestClient(create_app(ReviewConfig(output=out, token=TOKEN, allowed_hosts=("testserver",)), FakeJobs()))
    decided = client.post("/api/items/fitted/decisions", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"version": 1, "decision": "approved", "decided_by": "a script"})
    assert decided.status_code == 201, decided.text
    # A wrong bearer token is not rescued by a good cookie; a cookie session without the header is refused.
    client.post("/login", data={"token": TOKEN})
    assert client.post("/api/items/fitted/decisions", headers={"Authorization": "Bearer wrong"},
                       json={"version": 1, "decision": "rejected", "decided_by": "x"}).status_code == 401
    assert client.post("/api/items/fitted/decisions",
                       json={"version": 1, "decision": "rejected", "decided_by": "x"}).status_code == 403
    page = client.get("/api-docs").text
    assert 'curl -fsS -H "Authorization: Bearer $TOKEN"' in page and "no CSRF header" in page


# 4. Limits: bodies (every route, by Content-Length and by counted bytes), prompts, colour maps.

def test_large_bodies_are_refused_before_they_are_read(server):
    # A declared 50 MB body: refused at once, before a byte of it is sent.
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/api/items/fitted/check", skip_host=True)
    connection.putheader("Host", f"127.0.0.1:{server.port}")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(50 * 2**20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and time.monotonic() - started < 5
    connection.close()
    # A chunked body without a length: counted as it arrives, refused past the limit.
    for path in ("/api/items/fitted/check", "/login", "/api/recolour", "/api/items/fitted"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as stream:
            stream.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
                           "Transfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b"x" * 65536
            sent, answer = 0, b""
            try:
                while sent <= 4 * MAX_BODY_BYTES:
                    stream.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
            except OSError:  # the server answered and closed while we were still sending
                pass
            try:
                answer = stream.recv(65536)
            except OSError:
                pass
        first = answer.split(b"\r\n")[0]
        assert first.split()[1:2] in ([b"413"], [b"405"]), (path, first)  # GET-only routes may say 405 first
        assert sent <= 4 * MAX_BODY_BYTES + len(chunk)
    # The server is still there and answers.
    assert server.request("GET", "/api/items").status == 200


def test_prompts_and_colour_maps_are_bounded_before_any_tokenizer_work(tmp_path):
    out = _collection(str(tmp_path / "out"))
    client = TestClient(create_app(ReviewConfig(output=out, token=TOKEN, allowed_hosts=("testserver",)), FakeJobs()))
    cases = [{"target_prompt": "a " * MAX_PROMPT_CHARS}, {"target_prompt": "ab " * 100},
             {"color_map": {f"w{i}": "red" for i in range(1000)}}, {"color_map": {"dog": "r" * 5000}},
             {"color_map": {"d" * 5000: "red"}}]
    for case in cases:
        started = time.monotonic()
        for path in ("/api/items/fitted/check", "/api/recolour"):
            body = {"item_id": "fitted", **case}
            response = client.post(path, json=body if "check" in path else {"targets": [body]},
                                   headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code == 422, (case, path, response.status_code)
        assert time.monotonic() - started < 2
    assert client.post("/api/items/fitted/check", json={"item_id": "fitted", "color_map": {"dog": "red"}}).json()["ok"]


# 5. Concurrent decisions: one order, and approved.json is always the log's last approval.

def _versions(out: str, count: int) -> None:
    layout = ItemLayout(f"{out}/items/fitted")
    record = storage.read_json(layout.record(1))
    for version in range(2, count + 1):
        storage.write_bytes(layout.output(version, "access.jpg"), storage.read_bytes(layout.output(1, "access.jpg")))
        storage.write_json(layout.record(version), dict(record, version=version,
                                                        outputs={"access": layout.output(version, "access.jpg")}))


RACES = 4  # each race: 8 processes decide at once, then the log and the pointer are checked


def _slow_pointer(write_bytes):
    """``storage.write_bytes`` with writes of ``approved.json`` delayed at random by up to 300 ms (a slow store)."""
    def slow(uri, data):
        if uri.endswith("approved.json"):
            time.sleep(random.random() * 0.3)
        return write_bytes(uri, data)
    return slow


def _decide(out: str, start, worker: int, environment: dict) -> None:
    os.environ.update(environment)
    random.seed()
    storage.write_bytes = _slow_pointer(storage.write_bytes)
    start.wait(60)  # all processes decide at once
    decision = "rejected" if worker % 4 == 3 else "approved"
    record_decision(out, "fitted", 1 + worker % 4, decision, f"curator {worker}")


def _race(out: str, processes: int = 8) -> None:
    context = multiprocessing.get_context("fork")
    start = context.Barrier(processes)
    environment = {name: value for name, value in os.environ.items() if name.startswith(("AWS_", "DIFFCOLOR_"))}
    workers = [context.Process(target=_decide, args=(out, start, n, environment)) for n in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    for worker in workers:
        if worker.exitcode is None:
            worker.kill()
            worker.join()
    assert [worker.exitcode for worker in workers] == [0] * processes


def _check_log(out: str, decisions: int) -> None:
    log = read_decisions(out, "fitted")
    assert [entry["sequence"] for entry in log] == list(range(1, decisions + 1))
    layout = ItemLayout(f"{out}/items/fitted")
    wanted = pointer_of(out, layout, log)
    assert storage.read_json(f"{out}/items/fitted/approved.json") == json.loads(json.dumps(wanted))
    last_approval = [entry for entry in log if entry["decision"] == "approved"][-1]
    if wanted["version"] is not None:
        assert wanted["decision_id"] == last_approval["decision_id"]
        published = storage.read_bytes(wanted["published_access"])
        assert hashlib.sha256(published).hexdigest() == wanted["published_access_sha256"]


def test_concurrent_decisions_in_many_processes_leave_the_logs_last_approval(tmp_path):
    out = _collection(str(tmp_path / "out"))
    _versions(out, 4)
    for race in range(1, RACES + 1):
        _race(out)
        _check_log(out, 8 * race)


@pytest.fixture
def atomic_conditional_puts(monkeypatch):
    """moto's server checks If-None-Match and then stores, unlocked, in its request threads (moto 5): two racing
    conditional PUTs can both succeed. Real S3 makes the check and the write one step; so does this lock."""
    from moto.s3.responses import S3Response

    lock, put = threading.Lock(), S3Response.put_object

    def atomic(self, *args, **kwargs):
        with lock:
            return put(self, *args, **kwargs)
    monkeypatch.setattr(S3Response, "put_object", atomic)


def test_concurrent_decisions_on_s3(s3_bucket, atomic_conditional_puts):
    out = _collection(f"{s3_bucket}/out")
    _versions(out, 4)
    for race in range(1, 3):
        _race(out, processes=4)
        _check_log(out, 4 * race)


def test_decisions_written_before_sequence_numbers_are_read_first_and_keep_their_pointer(tmp_path):
    out = _collection(str(tmp_path / "out"))
    _versions(out, 2)
    folder, layout = f"{out}/items/fitted/decisions", ItemLayout(f"{out}/items/fitted")
    old = [{"decision_id": "20260101T120000Z-ffffffff", "item_id": "fitted", "version": 1, "decision": "approved",
            "decided_by": "Ada", "decided_at": "2026-01-01T12:00:00+00:00", "note": "", "version_record": "x"},
           {"decision_id": "20260102T120000Z-00000000", "item_id": "fitted", "version": 2, "decision": "rejected",
            "decided_by": "Bo", "decided_at": "2026-01-02T12:00:00+00:00", "note": "", "version_record": "x"}]
    for entry in old:
        storage.write_json(f"{folder}/{entry['decision_id']}.json", entry)
    storage.write_bytes(f"{out}/items/fitted/published/{old[0]['decision_id']}.jpg", b"published copy")
    pointer = {"item_id": "fitted", "version": 1, "decision_id": old[0]["decision_id"], "decided_by": "Ada",
               "decided_at": old[0]["decided_at"], "note": "", "master": layout.output(1, "master.tif"),
               "master_sha256": "0" * 64, "published_access": f"{out}/items/fitted/published/{old[0]['decision_id']}.jpg",
               "published_access_sha256": hashlib.sha256(b"published copy").hexdigest()}
    storage.write_json(f"{out}/items/fitted/approved.json", pointer)  # as the old code wrote it
    record_decision(out, "fitted", 2, "rejected", "Cy")  # changes nothing published
    assert storage.read_json(f"{out}/items/fitted/approved.json") == pointer
    record_decision(out, "fitted", 2, "approved", "Di")
    log = read_decisions(out, "fitted")
    assert [entry["decided_by"] for entry in log] == ["Ada", "Bo", "Cy", "Di"]
    assert storage.read_json(f"{out}/items/fitted/approved.json")["decided_by"] == "Di"
    assert {"00000001.json", "00000002.json"} <= set(os.listdir(folder))


# 6. Symbolic links out of the output: never followed by the server, bag or IIIF publishing.

@pytest.fixture
def linked(tmp_path):
    """An output whose item 'linked' is a link to an item folder outside it, plus that outside folder."""
    out = _collection(str(tmp_path / "out"))
    outside = tmp_path / "outside"
    _write_item(str(outside), "linked", state=False)
    os.symlink(outside / "items" / "linked", f"{out}/items/linked")
    write_results([storage.read_json(f"{out}/items/fitted/result.json") | {"item_id": "linked"}],
                  f"{out}/runs/20260103T000000Z-cccccc/results.parquet")
    return out, outside


def _tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_the_server_neither_reads_nor_writes_through_a_linked_item_folder(linked):
    out, outside = linked
    before = _tree(outside)
    review = ReviewConfig(output=out, token=TOKEN, allowed_hosts=("testserver",))
    client = TestClient(create_app(review, FakeJobs()))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/api/items/linked", "/items/linked", "/api/items/linked/versions/1/image"):
        response = client.get(path)
        assert response.status_code == 403 and "outside the output" in response.json()["detail"], path
    for body in ({"version": 1, "decision": "approved", "decided_by": "x"},
                 {"version": 1, "decision": "rejected", "decided_by": "x"}):
        assert client.post("/api/items/linked/decisions", headers=bearer, json=body).status_code == 403
    assert client.post("/api/items/linked/check", json={"item_id": "linked", "color_map": {"dog": "red"}}
                       ).status_code == 403
    assert client.post("/api/recolour", headers=bearer, json={"targets": [{"item_id": "linked", "color_map": {
        "dog": "red"}}]}).status_code == 403
    assert _tree(outside) == before  # no decisions/, approved.json or published/ outside
    assert client.get("/api/items/fitted").status_code == 200


@pytest.mark.parametrize("link", ["versions/v0002.json", "versions/v0001/access.jpg", "decisions", "published"])
def test_a_linked_file_or_folder_inside_an_item_is_refused(tmp_path, link):
    out = _collection(str(tmp_path / "out"))
    outside = tmp_path / "outside"
    outside.mkdir()
    item = Path(out) / "items" / "fitted"
    target = outside / "target"
    if link == "versions/v0002.json":
        target.write_text(json.dumps(dict(storage.read_json(str(item / "versions/v0001.json")), version=2,
                                          caption="SECRET outside record")))
    elif link.endswith(".jpg"):
        target.write_bytes((item / "versions/v0001/access.jpg").read_bytes())
        (item / link).unlink()
    else:
        target.mkdir()
    os.symlink(target, item / link)
    before = _tree(outside)
    client = TestClient(create_app(ReviewConfig(output=out, token=TOKEN, allowed_hosts=("testserver",)), FakeJobs()))
    version = 2 if link.endswith(".json") else 1
    decided = client.post("/api/items/fitted/decisions", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"version": version, "decision": "approved", "decided_by": "x"})
    assert decided.status_code == 403 and "outside the output" in decided.text
    assert "SECRET" not in client.get("/api/items/fitted").text
    if link.startswith("versions"):
        assert client.get(f"/api/items/fitted/versions/{version}/image").status_code == 403
    assert _tree(outside) == before and not (item / "approved.json").exists()


def test_a_linked_runs_folder_is_not_read_by_the_collection(tmp_path):
    out = _collection(str(tmp_path / "out"))
    outside = tmp_path / "outside-runs"
    os.rename(f"{out}/runs", outside)
    os.symlink(outside, f"{out}/runs")
    client = TestClient(create_app(ReviewConfig(output=out, token=TOKEN, allowed_hosts=("testserver",)), FakeJobs()))
    assert client.get("/api/items").json()["total"] == 0


def _bag_run(out: str) -> str:
    """A run of one done version whose files exist and match their sha256 (written by hand, no model)."""
    layout = ItemLayout(f"{out}/items/bench")
    outputs = {"master": layout.output(1, "master.tif"), "access": layout.output(1, "access.jpg")}
    for uri, data in zip(outputs.values(), (b"master bytes", b"access bytes")):
        storage.write_bytes(uri, data)
    record = {"item_id": "bench", "version": 1, "status": "done", "caption": CAPTION, "outputs": outputs,
              "output_sha256": {role: hashlib.sha256(storage.read_bytes(uri)).hexdigest()
                                for role, uri in outputs.items()}}
    storage.write_json(layout.record(1), record)
    write_results([record], f"{out}/runs/r1/results.parquet")
    storage.write_bytes(f"{out}/runs/r1/report.html", b"<p>report</p>")
    return out


@pytest.mark.parametrize("link", ["runs/r1/report.html", "runs", "items/bench", "items/bench/versions/v0001.json"])
def test_a_bag_never_copies_what_a_link_leads_to_outside_the_output(tmp_path, capsys, link):
    out = _bag_run(str(tmp_path / "out"))
    assert write_bag(out, "r1", tmp_path / "good")["files"] == 6
    secret = tmp_path / "secret"
    (secret / "r1").mkdir(parents=True)
    source = Path(out) / link
    if source.is_dir():
        os.rename(source, secret / "moved")
        os.symlink(secret / "moved", source)
    else:
        (secret / "file").write_bytes(b"SECRET outside content")
        source.unlink()
        os.symlink(secret / "file", source)
    assert main(["bag", out, "--run", "r1", "-o", str(tmp_path / "bag")]) == 2
    assert "outside the output" in capsys.readouterr().err
    assert not any(b"SECRET" in path.read_bytes() for path in (tmp_path / "bag").rglob("*") if path.is_file())
    with pytest.raises(BagError, match="outside the output"):
        write_bag(out, "../../secret", tmp_path / "other")


def test_iiif_publishing_leaves_out_a_linked_item_and_writes_nothing_outside(linked):
    out, outside = linked
    _write_item(out, "third", state=False)  # its result.json a link to an outside record
    secret = dict(storage.read_json(f"{out}/items/third/result.json"), caption="SECRET outside record")
    (outside / "record.json").write_text(json.dumps(secret))
    os.remove(f"{out}/items/third/result.json")
    os.symlink(outside / "record.json", f"{out}/items/third/result.json")
    before = _tree(outside)
    publication = publish_iiif(out, "https://example.org/colour", unreviewed=True)
    assert publication.items == ["fitted", "nostate"]
    assert any("item 'third'" in why and "outside the output" in why for why in publication.left_out)
    assert "SECRET" not in json.dumps(publication.manifest) and _tree(outside) == before
    os.rename(f"{out}/iiif", outside / "iiif")
    os.symlink(outside / "iiif", f"{out}/iiif")
    with pytest.raises(storage.OutsideRootError):
        publish_iiif(out, "https://example.org/colour", unreviewed=True)
    assert json.loads((outside / "iiif" / "manifest.json").read_text()) == publication.manifest  # not rewritten


def test_confine_judges_where_a_path_really_is(tmp_path):
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    os.symlink(root / "inner", root / "alias")  # a link inside the root to the root: fine
    os.symlink(tmp_path, root / "up")
    os.symlink(tmp_path / "nowhere", root / "dangling")
    assert storage.confine(str(root), str(root / "alias" / "new" / "file.json"))
    for bad in (root / "up" / "x", root / "dangling", root / "dangling" / "x", f"{root}/inner/../../x"):
        with pytest.raises(storage.OutsideRootError):
            storage.confine(str(root), str(bad))
    assert storage.confine("s3://b/out", "s3://b/out/items/a") == "s3://b/out/items/a"
    for bad in ("s3://b/outside/x", "s3://b/out/../x", "s3://b/out2/x"):
        with pytest.raises(storage.OutsideRootError):
            storage.confine("s3://b/out", bad)
