"""Every read and write of DiffColor goes through this module, by fsspec URI.

A URI is a local path (``/data/out``, ``out``), ``file://``, ``memory://`` or
``s3://bucket/prefix`` (AWS S3 or any S3 API such as MinIO, through s3fs).

S3 configuration comes from the environment only (never from manifests or
records, so that no credential is ever written anywhere):

- credentials: s3fs/botocore's usual chain: ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, instance
  roles; region from ``AWS_DEFAULT_REGION`` / ``AWS_REGION``;
- endpoint: ``DIFFCOLOR_S3_ENDPOINT_URL`` (e.g. ``http://minio:9000``), else
  ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``; see
  :func:`storage_options_for`.

Writes publish whole objects only:

- local disk: a temporary ``.partial`` file beside the target, flushed and
  fsynced, then ``os.replace`` onto the target (and the directory fsynced), so a
  reader sees the old object or the new one, never a partial one;
- S3: below ``S3_MULTIPART_THRESHOLD`` one PUT of the complete bytes; above it a
  multipart upload of ``S3_PART_SIZE`` parts that S3 makes visible only when it
  is completed. Any error or interrupt before completion (``BaseException``, so
  a cancelled task too) aborts the upload, leaving no object and no open upload.
  If the abort itself cannot reach the store, the upload stays open but
  invisible; a bucket lifecycle rule ``AbortIncompleteMultipartUpload`` is the
  backstop for that. Concurrent writers of one key: the last completed PUT or
  multipart upload wins whole (S3 never mixes two uploads);
- other fsspec backends (``memory://``): one ``pipe_file`` call of the complete
  bytes.

Existence checks and listings invalidate fsspec's listing cache first, since
another process (another worker, another run) may have just written the object.

Errors: a missing object raises InputUnavailableError (permanent), permission
denied (S3 AccessDenied / 403, missing credentials) raises InputUnavailableError
naming the URI, any other backend failure raises StorageError (transient, worth a
retry). Messages never contain credentials: known secret values are redacted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import Any

import fsspec
from fsspec.core import split_protocol, url_to_fs

from diffcolor.common.errors import InputUnavailableError, StorageError

logger = logging.getLogger(__name__)

# S3 transfer sizes (ours). One PUT up to 64 MiB keeps the common case (masters of
# tens of MB) one request; above it, 16 MiB parts bound the memory of a retry and
# stay well above S3's 5 MiB minimum part size and below its 10,000-part limit
# for any image we write (160 GB).
S3_MULTIPART_THRESHOLD = 64 * 2**20
S3_PART_SIZE = 16 * 2**20

_S3_PROTOCOLS = ("s3", "s3a")
# Environment variables whose values must never appear in a message.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
_SECRET_OPTIONS = ("key", "secret", "token", "password", "session_token")
# botocore's "no usable credentials" exceptions (not OSError subclasses), matched
# by class name so that s3fs and botocore stay optional dependencies.
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError")


def join(root: str, *parts: str) -> str:
    """Joins path components onto a URI with ``/`` (never ``os.path``: S3 keys use ``/``)."""
    text = str(root).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            text = f"{text}/{part}"
    return text


def storage_options_for(uri: str) -> dict:
    """The fsspec storage options for ``uri``, from the environment.

    For ``s3://`` (and ``s3a://``): ``{"endpoint_url": ...}`` when
    ``DIFFCOLOR_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
    is set (first one set wins), else ``{}``: AWS with botocore's defaults.
    Credentials are not put here; s3fs reads them from the standard AWS variables.
    Every other protocol (local paths, ``file://``, ``memory://``) gets ``{}``.
    """
    protocol, _ = split_protocol(str(uri))
    if protocol not in _S3_PROTOCOLS:
        return {}
    for name in ("DIFFCOLOR_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return {"endpoint_url": os.environ[name]}
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the backend path of ``uri`` (options from :func:`storage_options_for`)."""
    fs, path = url_to_fs(str(uri), **storage_options_for(uri))
    return fs, path


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return any(protocol in _S3_PROTOCOLS for protocol in _protocols(fs))


def _redact(text: str, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """``text`` with known credential values and URL user-info replaced by ``***``.

    Known values: the AWS credential variables of the environment and any
    credential-like storage option of ``fs``.
    """
    secrets = [os.environ.get(name, "") for name in _SECRET_ENV]
    options = getattr(fs, "storage_options", None) or {}
    secrets += [str(options.get(name) or "") for name in _SECRET_OPTIONS]
    for secret in sorted({value for value in secrets if len(value) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


_PAST = {"reading": "read", "writing": "written", "checking": "checked", "listing": "listed", "removing": "removed"}


def _backend_error(uri: str, action: str, error: BaseException, fs: fsspec.AbstractFileSystem) -> Exception:
    """The DiffColor exception for a backend failure while ``action``-ing ``uri``."""
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return InputUnavailableError(_redact(f"'{uri}' does not exist (while {action} it)", fs))
    if isinstance(error, PermissionError) or type(error).__name__ in _NO_CREDENTIALS:
        return InputUnavailableError(_redact(f"'{uri}' cannot be {_PAST[action]}: permission denied ({error})", fs))
    return StorageError(_redact(f"{action} '{uri}' failed: {type(error).__name__}: {error}", fs))


def _is_backend_error(error: BaseException) -> bool:
    """OSError, or an exception of the S3 client stack (botocore, aiobotocore, aiohttp)."""
    if isinstance(error, OSError):
        return True
    module = type(error).__module__ or ""
    return module.split(".", 1)[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs")


def read_bytes(uri: str) -> bytes:
    """The whole object at ``uri``.

    Raises:
        InputUnavailableError: the object is missing, or reading it is denied.
        StorageError: any other backend failure (transient).
    """
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise _backend_error(uri, "reading", error, fs) from error


def write_bytes(uri: str, data: bytes) -> None:
    """Publishes ``data`` at ``uri`` atomically (see the module docstring).

    Raises:
        InputUnavailableError: writing is denied (permission, credentials) or the
            bucket does not exist.
        StorageError: any other backend failure (transient); nothing was published.
    """
    fs, path = filesystem(uri)
    data = bytes(data)
    try:
        if _is_local(fs):
            _write_local_atomic(path, data)
        elif _is_s3(fs):
            _write_s3_atomic(fs, path, data)
        else:
            fs.pipe_file(path, data)
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise _backend_error(uri, "writing", error, fs) from error
    finally:
        if not _is_local(fs):
            fs.invalidate_cache(path)


def _write_s3_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """One PUT, or a multipart upload that is completed whole or aborted."""
    bucket, key, _ = fs.split_path(path)
    if len(data) < S3_MULTIPART_THRESHOLD:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data)
        return
    upload_id = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    try:
        parts = []
        for number, start in enumerate(range(0, len(data), S3_PART_SIZE), start=1):
            answer = fs.call_s3(
                "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                Body=data[start : start + S3_PART_SIZE],
            )
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        fs.call_s3(
            "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException as error:
        # BaseException: a KeyboardInterrupt or a cancelled task must not leave an
        # open upload behind either. The original error is what the caller sees.
        try:
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as abort_error:
            note = _redact(f"aborting multipart upload {upload_id} of s3://{bucket}/{key} also failed: {abort_error}", fs)
            logger.warning("%s; a lifecycle rule AbortIncompleteMultipartUpload will remove it", note)
            error.add_note(note)
        raise


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _write_local_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    try:
        # mkstemp creates 0600 files; published objects get the usual mode under the process umask.
        os.fchmod(handle, 0o666 & ~_UMASK)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, path)
    except BaseException:
        try:
            os.unlink(staging)
        except FileNotFoundError:
            pass
        raise
    # The rename itself is durable only once the directory entry is on disk.
    directory_handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_handle)
    finally:
        os.close(directory_handle)


def exists(uri: str) -> bool:
    """Whether an object exists at ``uri``, asking the backend, not a listing cache.

    Raises:
        InputUnavailableError: checking is denied. StorageError: other backend failures.
    """
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        return fs.exists(path)
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise _backend_error(uri, "checking", error, fs) from error


def list_files(uri: str) -> list[str]:
    """URIs of the objects directly under the prefix ``uri`` (empty when there is none), sorted.

    Asks the backend, not a listing cache; ``.partial`` staging files are left out.

    Raises:
        InputUnavailableError: listing is denied. StorageError: other backend failures.
    """
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise _backend_error(uri, "listing", error, fs) from error
    names = sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == "file")
    return [join(uri, name) for name in names if not name.endswith(".partial")]


def remove(uri: str) -> None:
    """Deletes the object at ``uri`` if it exists.

    Raises:
        InputUnavailableError: deleting is denied. StorageError: other backend failures.
    """
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise _backend_error(uri, "removing", error, fs) from error
    finally:
        if not _is_local(fs):
            fs.invalidate_cache(path)


def read_json(uri: str) -> Any:
    """Parsed JSON object at ``uri``."""
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, value: Any) -> None:
    """Publishes ``value`` as indented UTF-8 JSON at ``uri``."""
    write_bytes(uri, (json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
