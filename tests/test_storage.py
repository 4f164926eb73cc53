"""Storage publishes whole objects only, on local disk, memory:// and a real S3 API (moto)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from s3server import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, s3_bucket, s3_client, s3_endpoint  # noqa: F401 (fixtures)

from diffcolor.archive import storage
from diffcolor.common.errors import (
    BadImageError,
    InputUnavailableError,
    PermanentError,
    StorageConfigError,
    StorageError,
)

MIB = 2**20


@pytest.fixture
def small_parts(monkeypatch):
    """S3 transfers with 5 MiB parts (S3's minimum) above 6 MiB, so a 12 MB object goes in 3 parts."""
    monkeypatch.setattr(storage, "S3_MULTIPART_THRESHOLD", 6 * MIB)
    monkeypatch.setattr(storage, "S3_PART_SIZE", 5 * MIB)


def _wrap_s3_calls(monkeypatch, before) -> None:
    """Runs ``before(method, kwargs)`` ahead of every S3 API call s3fs makes.

    s3fs reaches the API through ``_call_s3`` (its async methods) or the sync
    ``call_s3`` (which holds its own reference to the original coroutine), so both
    are wrapped: every call passes through ``before`` exactly once.
    """
    import s3fs

    original_async, original_sync = s3fs.S3FileSystem._call_s3, s3fs.S3FileSystem.call_s3

    async def wrapped_async(self, method, *args, **kwargs):
        before(method, kwargs)
        return await original_async(self, method, *args, **kwargs)

    def wrapped_sync(self, method, *args, **kwargs):
        before(method, kwargs)
        return original_sync(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", wrapped_async)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", wrapped_sync)


@pytest.fixture
def s3_calls(monkeypatch):
    """Records every S3 API call: (method, PartNumber or None)."""
    calls: list[tuple[str, int | None]] = []
    _wrap_s3_calls(monkeypatch, lambda method, kwargs: calls.append((method, kwargs.get("PartNumber"))))
    return calls


def _fail_s3_call(monkeypatch, method: str, part_number: int | None, error: BaseException) -> None:
    """Makes the S3 API call ``method`` (that part only, when given) raise ``error``, as a network fault would."""

    def before(called, kwargs):
        if called == method and part_number in (None, kwargs.get("PartNumber")):
            raise error

    _wrap_s3_calls(monkeypatch, before)


def _open_uploads(endpoint: str, bucket_uri: str) -> list:
    return s3_client(endpoint).list_multipart_uploads(Bucket=bucket_uri.removeprefix("s3://")).get("Uploads", [])


def _payload(size: int, seed: int) -> bytes:
    return os.urandom(16) + bytes([seed]) * (size - 16)


# ---------------------------------------------------------------------------
# S3 (moto server on loopback).


def test_s3_small_and_large_objects_round_trip(s3_bucket, s3_endpoint, small_parts, s3_calls):
    small, large = _payload(1000, 1), _payload(12 * 10**6, 2)

    storage.write_bytes(storage.join(s3_bucket, "item", "small.bin"), small)
    storage.write_bytes(storage.join(s3_bucket, "item", "large.bin"), large)

    assert storage.read_bytes(storage.join(s3_bucket, "item", "small.bin")) == small
    assert storage.read_bytes(storage.join(s3_bucket, "item", "large.bin")) == large
    # The small one is one PUT; the large one three parts, committed.
    methods = [method for method, _ in s3_calls]
    assert methods.count("put_object") == 1
    assert sorted(part for method, part in s3_calls if method == "upload_part") == [1, 2, 3]
    assert methods.count("complete_multipart_upload") == 1
    assert _open_uploads(s3_endpoint, s3_bucket) == []


def test_s3_json_round_trip(s3_bucket):
    uri = storage.join(s3_bucket, "records", "v1.json")
    storage.write_json(uri, {"prompt": "a <red> barn & sky, é"})
    assert storage.read_json(uri) == {"prompt": "a <red> barn & sky, é"}


def test_s3_failure_mid_multipart_leaves_no_object_and_no_open_upload(s3_bucket, s3_endpoint, small_parts, s3_calls,
                                                                      monkeypatch):
    uri = storage.join(s3_bucket, "item", "master.tif")
    _fail_s3_call(monkeypatch, "upload_part", 2, OSError("connection reset (injected) on part 2"))

    with pytest.raises(StorageError, match="writing 's3://.*master.tif' failed"):
        storage.write_bytes(uri, _payload(12 * 10**6, 3))

    # An upload was opened and part 1 stored (moto lists such uploads), then aborted.
    assert [call for call in s3_calls if call[0] != "head_object"][:3] == [
        ("create_multipart_upload", None), ("upload_part", 1), ("abort_multipart_upload", None)]
    assert not storage.exists(uri)
    assert storage.list_files(storage.join(s3_bucket, "item")) == []
    assert _open_uploads(s3_endpoint, s3_bucket) == []


def test_s3_failed_rewrite_keeps_the_previous_object_whole(s3_bucket, s3_endpoint, small_parts, monkeypatch):
    uri = storage.join(s3_bucket, "item", "master.tif")
    previous = _payload(7 * 10**6, 4)
    storage.write_bytes(uri, previous)
    _fail_s3_call(monkeypatch, "complete_multipart_upload", None, OSError("endpoint went away (injected)"))

    with pytest.raises(StorageError):
        storage.write_bytes(uri, _payload(12 * 10**6, 5))

    assert storage.read_bytes(uri) == previous
    assert _open_uploads(s3_endpoint, s3_bucket) == []


def test_s3_interrupt_mid_multipart_aborts_the_upload(s3_bucket, s3_endpoint, small_parts, monkeypatch):
    # A KeyboardInterrupt (or a cancelled task) arriving while part 2 is sent.
    _fail_s3_call(monkeypatch, "upload_part", 2, KeyboardInterrupt())
    uri = storage.join(s3_bucket, "item", "access.jpg")

    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(uri, _payload(12 * 10**6, 6))

    assert not storage.exists(uri)
    assert _open_uploads(s3_endpoint, s3_bucket) == []


def test_s3_concurrent_writers_of_one_key_leave_exactly_one_payload(s3_bucket, s3_endpoint, small_parts):
    uri = storage.join(s3_bucket, "item", "result.json")
    payloads = [_payload(12 * 10**6, 7), _payload(12 * 10**6, 8)]
    barrier = threading.Barrier(len(payloads))
    errors: list[BaseException] = []

    def write(payload: bytes) -> None:
        try:
            barrier.wait()
            storage.write_bytes(uri, payload)
        except BaseException as error:  # handed to the main thread below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(payload,)) for payload in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert storage.read_bytes(uri) in payloads
    assert _open_uploads(s3_endpoint, s3_bucket) == []


def test_s3_exists_and_listing_see_objects_written_by_another_filesystem(s3_bucket, s3_endpoint):
    import s3fs

    prefix = storage.join(s3_bucket, "item")
    storage.write_bytes(storage.join(prefix, "a.txt"), b"a")
    assert storage.list_files(prefix) == [storage.join(prefix, "a.txt")]
    assert not storage.exists(storage.join(prefix, "b.txt"))
    fs, path = storage.filesystem(prefix)
    fs.ls(path)  # the shared instance now holds a listing of the prefix in its cache

    # Another worker (a separate filesystem instance, own cache) writes b.txt.
    other = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=s3_endpoint)
    other.pipe_file(f"{path}/b.txt", b"b")

    assert f"{path}/b.txt" not in fs.ls(path)  # the cache really is stale ...
    assert storage.exists(storage.join(prefix, "b.txt"))  # ... and storage does not trust it
    assert storage.list_files(prefix) == [storage.join(prefix, "a.txt"), storage.join(prefix, "b.txt")]
    storage.remove(storage.join(prefix, "a.txt"))
    assert storage.list_files(prefix) == [storage.join(prefix, "b.txt")]


def test_s3_missing_object_or_bucket_is_input_unavailable(s3_bucket):
    with pytest.raises(InputUnavailableError, match="does-not-exist.tif' does not exist"):
        storage.read_bytes(storage.join(s3_bucket, "does-not-exist.tif"))
    with pytest.raises(InputUnavailableError, match="does not exist"):
        storage.read_bytes("s3://diffcolor-no-such-bucket/x.tif")
    assert storage.list_files(storage.join(s3_bucket, "nothing-here")) == []


def test_s3_access_denied_is_input_unavailable_and_shows_no_credentials(s3_bucket, monkeypatch):
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    # What S3 answers on a 403, with the credentials planted in the text to prove redaction.
    denied = ClientError(
        {"Error": {"Code": "AccessDenied", "Message": f"Access Denied for {FAKE_ACCESS_KEY}/{FAKE_SECRET_KEY}"}},
        "GetObject",
    )
    uri = storage.join(s3_bucket, "private", "scan.tif")
    storage.write_bytes(uri, b"scan")
    _fail_s3_call(monkeypatch, "get_object", None, translate_boto_error(denied))

    with pytest.raises(InputUnavailableError) as caught:
        storage.read_bytes(uri)

    message = str(caught.value)
    assert uri in message and "permission denied" in message
    assert FAKE_SECRET_KEY not in message and FAKE_ACCESS_KEY not in message


def test_s3_other_backend_errors_are_transient_storage_errors(s3_bucket, monkeypatch):
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    busy = ClientError({"Error": {"Code": "InternalError", "Message": "We encountered an internal error"}}, "PutObject")
    uri = storage.join(s3_bucket, "item", "result.json")

    with pytest.MonkeyPatch.context() as patch:
        _fail_s3_call(patch, "put_object", None, translate_boto_error(busy))
        with pytest.raises(StorageError, match="internal error") as caught:
            storage.write_bytes(uri, b"{}")

    assert caught.value.error_class == "storage"
    assert not storage.exists(uri)


# ---------------------------------------------------------------------------
# Storage options.


def test_storage_options_come_from_the_environment(monkeypatch):
    for name in ("DIFFCOLOR_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    assert storage.storage_options_for("s3://bucket/key") == {}

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    assert storage.storage_options_for("s3://bucket/key") == {"endpoint_url": "http://generic:9000"}
    monkeypatch.setenv("DIFFCOLOR_S3_ENDPOINT_URL", "http://minio:9000")
    assert storage.storage_options_for("s3://bucket/key") == {"endpoint_url": "http://minio:9000"}
    assert storage.storage_options_for("s3a://bucket/key") == {"endpoint_url": "http://minio:9000"}

    assert storage.storage_options_for("/data/out") == {}
    assert storage.storage_options_for("file:///data/out") == {}
    assert storage.storage_options_for("memory://out") == {}


def test_messages_never_show_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekret-value-1234")
    text = storage._redact("failed with sekret-value-1234 at http://user:pass@minio:9000/bucket")
    assert "sekret-value-1234" not in text and "user:pass" not in text


# ---------------------------------------------------------------------------
# Local disk.


def test_local_write_is_published_whole(tmp_path):
    uri = str(tmp_path / "out" / "item" / "master.tif")
    storage.write_bytes(uri, b"first")
    storage.write_bytes(uri, b"second version")
    assert storage.read_bytes(uri) == b"second version"
    assert os.listdir(tmp_path / "out" / "item") == ["master.tif"]
    assert storage.list_files(str(tmp_path / "out" / "item")) == [uri]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
@pytest.mark.parametrize("previous", [None, b"previous version"])
def test_local_failure_mid_write_leaves_no_partial_file(tmp_path, monkeypatch, failing, previous):
    folder = tmp_path / "item"
    folder.mkdir()
    uri = str(folder / "master.tif")
    if previous is not None:
        storage.write_bytes(uri, previous)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(StorageError, match="No space left"):
        storage.write_bytes(uri, b"new version " * 1000)
    monkeypatch.undo()

    # The old object (or none) and no staging file.
    assert os.listdir(folder) == ([] if previous is None else ["master.tif"])
    if previous is not None:
        assert storage.read_bytes(uri) == previous


def test_local_interrupt_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(str(tmp_path / "master.tif"), b"x" * 100)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_local_missing_and_denied_are_input_unavailable(tmp_path, monkeypatch):
    with pytest.raises(InputUnavailableError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "missing.tif"))

    # Injected, since tests may run as root, for whom file modes deny nothing.
    from fsspec.implementations.local import LocalFileSystem

    def denied(self, path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(LocalFileSystem, "cat_file", denied)
    with pytest.raises(InputUnavailableError, match="locked.tif' cannot be read: permission denied"):
        storage.read_bytes(str(tmp_path / "locked.tif"))


# ---------------------------------------------------------------------------
# memory://


def test_memory_filesystem_round_trip():
    prefix = f"memory://diffcolor-test-{os.getpid()}/item"
    uri = storage.join(prefix, "result.json")
    assert not storage.exists(uri)
    assert storage.list_files(prefix) == []

    storage.write_json(uri, {"status": "done"})
    storage.write_bytes(storage.join(prefix, "access.jpg"), b"jpeg")

    assert storage.read_json(uri) == {"status": "done"}
    assert storage.exists(uri)
    assert storage.list_files(prefix) == [storage.join(prefix, "access.jpg"), uri]
    storage.remove(uri)
    storage.remove(uri)  # removing twice is fine
    assert not storage.exists(uri)
    with pytest.raises(InputUnavailableError):
        storage.read_bytes(uri)


def test_local_objects_are_published_with_the_umask_mode_not_0600(tmp_path):
    import os
    import stat

    target = tmp_path / "out" / "record.json"
    storage.write_bytes(str(target), b"{}")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


# ---------------------------------------------------------------------------
# Content types, bounded reads, error classes, strict JSON, credentials in URIs.


@pytest.mark.parametrize(
    ("name", "expected"),
    [("master.tif", "image/tiff"), ("access.jpg", "image/jpeg"), ("access.png", "image/png"),
     ("access.webp", "image/webp"), ("result.json", "application/json"),
     ("results.parquet", "application/vnd.apache.parquet"), ("report.html", "text/html; charset=utf-8"),
     ("color-state.safetensors", "application/octet-stream")],
)
def test_every_object_written_to_s3_carries_its_content_type(s3_bucket, s3_endpoint, name, expected):
    storage.write_bytes(storage.join(s3_bucket, "item", name), b"payload")
    head = s3_client(s3_endpoint).head_object(Bucket=s3_bucket.removeprefix("s3://"), Key=f"item/{name}")
    assert head["ContentType"] == expected


def test_a_large_s3_object_gets_its_content_type_through_the_multipart_upload(s3_bucket, s3_endpoint, small_parts):
    storage.write_bytes(storage.join(s3_bucket, "big", "master.tif"), _payload(12 * 10**6, 9))
    head = s3_client(s3_endpoint).head_object(Bucket=s3_bucket.removeprefix("s3://"), Key="big/master.tif")
    assert head["ContentType"] == "image/tiff"


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "scan.tif"
    os.mkfifo(fifo)  # nobody will ever write to it: a plain open() would wait for ever
    limits = storage.ReadLimits(seconds=5)
    started = time.monotonic()
    with pytest.raises(InputUnavailableError, match="is not a regular file \\(a FIFO\\)"):
        storage.read_bytes(str(fifo), limits)
    with pytest.raises(InputUnavailableError, match="a character device"):
        storage.read_bytes("/dev/zero", limits)
    assert time.monotonic() - started < 2


def test_a_source_over_the_size_limit_is_a_bad_image_on_disk_and_on_s3(tmp_path, s3_bucket):
    limits = storage.ReadLimits(max_bytes=1000)
    (tmp_path / "big.tif").write_bytes(b"\0" * 1001)
    storage.write_bytes(storage.join(s3_bucket, "big.tif"), b"\0" * 1001)
    for uri in (str(tmp_path / "big.tif"), storage.join(s3_bucket, "big.tif")):
        with pytest.raises(BadImageError, match="larger than the source limit of 1000 bytes"):
            storage.read_bytes(uri, limits)
    assert storage.read_bytes(str(tmp_path / "big.tif"), storage.ReadLimits(max_bytes=1001)) == b"\0" * 1001


def test_a_source_that_is_not_read_in_time_fails_with_the_limit_named(tmp_path, monkeypatch):
    (tmp_path / "slow.tif").write_bytes(b"x" * (3 * storage.READ_CHUNK_BYTES))
    clock = iter(range(0, 10_000, 100))  # every look at the clock is 100 s later
    monkeypatch.setattr(storage.time, "monotonic", lambda: next(clock))
    with pytest.raises(InputUnavailableError, match="not read within 150 s"):
        storage.read_bytes(str(tmp_path / "slow.tif"), storage.ReadLimits(seconds=150))


def test_an_invalid_bucket_name_is_a_permanent_error_not_a_transient_one(s3_bucket):
    with pytest.raises(StorageConfigError, match="retrying cannot help") as caught:
        storage.write_bytes("s3://Not_A_Valid_Bucket!/x.json", b"{}")
    assert caught.value.error_class == "storage_config" and isinstance(caught.value, PermanentError)


def test_json_records_are_strict_json_with_nan_as_null(tmp_path):
    uri = str(tmp_path / "result.json")
    storage.write_json(uri, {"ssim_l": float("nan"), "max_delta_l": float("inf"), "nested": [1.5, float("-inf")]})
    text = (tmp_path / "result.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard {name}")) == {
        "ssim_l": None, "max_delta_l": None, "nested": [1.5, None]}


def test_credentials_in_an_s3_uri_are_used_and_never_shown(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs = pytest.importorskip("s3fs")
    s3fs.S3FileSystem.clear_instance_cache()
    secret_uri = s3_bucket.replace("s3://", f"s3://{FAKE_ACCESS_KEY}:CANARY-in-uri-3141@")
    storage.write_bytes(f"{secret_uri}/item/result.json", b"{}")
    assert storage.read_bytes(f"{secret_uri}/item/result.json") == b"{}"
    with pytest.raises(InputUnavailableError) as caught:
        storage.read_bytes(f"{secret_uri}/item/missing.json")
    assert "CANARY-in-uri-3141" not in str(caught.value) and FAKE_ACCESS_KEY not in str(caught.value)
    assert "***@" in str(caught.value)


def test_an_outputs_hash_is_read_in_chunks_within_the_read_limits(tmp_path, s3_bucket):
    import hashlib

    payload = _payload(3 * storage.READ_CHUNK_BYTES + 5, 4)
    (tmp_path / "master.tif").write_bytes(payload)
    storage.write_bytes(storage.join(s3_bucket, "master.tif"), payload)
    for uri in (str(tmp_path / "master.tif"), storage.join(s3_bucket, "master.tif")):
        assert storage.sha256_bounded(uri, storage.ReadLimits()) == hashlib.sha256(payload).hexdigest()
    with pytest.raises(BadImageError, match="larger than the source limit"):
        storage.sha256_bounded(str(tmp_path / "master.tif"), storage.ReadLimits(max_bytes=len(payload) - 1))
    os.mkfifo(tmp_path / "pipe.tif")
    with pytest.raises(InputUnavailableError, match="not a regular file"):
        storage.sha256_bounded(str(tmp_path / "pipe.tif"), storage.ReadLimits(seconds=5))
    with pytest.raises(InputUnavailableError):  # an output named by a URL is fetched as a source is: refused here
        storage.sha256_bounded("http://127.0.0.1:9/master.tif", storage.ReadLimits(seconds=5))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_checking_a_large_versions_outputs_holds_none_of_them_whole(tmp_path):
    # A committed version's 300 MB master (a 50 Mpx 16-bit scan's) is checked against its sha256 in another
    # process: the check adds a few chunks to its memory, not the file (it read the file whole before).
    import hashlib
    import subprocess
    import sys

    master = tmp_path / "master.tif"
    digest = hashlib.sha256()
    with open(master, "wb") as stream:
        for index in range(300):
            chunk = bytes([index % 251]) * 2**20
            stream.write(chunk)
            digest.update(chunk)
    record = {"outputs": {"master": str(master)}, "output_sha256": {"master": digest.hexdigest()}}
    script = (
        "import json, sys\n"
        "from diffcolor.archive.items import outputs_whole\n"
        "def status(field):\n"
        "    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith(field))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = status('VmRSS')\n"
        "whole = outputs_whole(json.loads(sys.argv[1]))\n"
        "print(json.dumps({'whole': whole, 'added': status('VmHWM') - before}))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script, json.dumps(record)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout)
    assert measured["whole"] is True
    assert measured["added"] <= 64 * 2**20, measured
