"""Every read and write of DiffColor goes through this module, by fsspec URI.

A URI is a local path (``/data/out``, ``out``), ``file://``, ``memory://`` or
``s3://bucket/prefix`` (AWS S3 or any S3 API such as MinIO, through s3fs),
or ``gs://``/``az://`` where their fsspec packages are installed; no other
protocol and no chained URL (``simplecache::...``) is opened (:data:`STORE_PROTOCOLS`).
An ``http(s)://`` URL can be read (:func:`read_bytes`, :func:`exists`) and
nothing else; it is fetched by :mod:`diffcolor.archive.outside`, which never
reaches loopback, link-local or private addresses unless the operator allows
the host (``DIFFCOLOR_ALLOW_HOSTS``, ``--allow-host``).

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

Objects too large to hold in memory (a scan's master) are written into a local
file first (:func:`staged`: on a local disk the ``.partial`` file beside the
target, elsewhere a temporary file) and published from it the same ways, read
part by part, their sha256 computed as they are read.

Existence checks and listings invalidate fsspec's listing cache first, since
another process (another worker, another run) may have just written the object.

Every object written to S3 carries its Content-Type (from the file name:
TIFF, JPEG, PNG, WebP, JSON, Parquet, HTML, safetensors, ...).

Credentials written into a URI (``s3://KEY:SECRET@bucket/key``) are lifted out
of it: the URI the backend sees has none, S3 gets them as its key and secret,
and :mod:`diffcolor.common.redact` masks them wherever they would be shown.

Confinement (:func:`confine`): whatever serves, records or delivers the
files of one output root (the review server, decisions, BagIt bags, IIIF
publishing) names each local path through ``confine(root, uri)``, which
refuses a path whose real location (symbolic links and ``..`` resolved, for
paths still to be created too) leaves the real location of the root: a link
in the output never makes those commands read or write elsewhere. Object
stores have no links; there only the URI's own text is checked.

Reads of sources are bounded (:class:`ReadLimits`): only regular files (a FIFO
or a device is refused before it is opened for reading), at most ``max_bytes``,
within ``seconds``.

Errors: a missing object raises InputUnavailableError (permanent), permission
denied (S3 AccessDenied / 403, missing credentials) raises InputUnavailableError
naming the URI, a request the store refuses as malformed (an invalid bucket
name, a bad argument, a redirect to another region) raises StorageConfigError
(permanent), any other backend failure (5xx, throttling, timeouts, connection
errors) raises StorageError (transient, worth a retry). Messages never contain
credentials.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import mimetypes
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import fsspec
from fsspec.core import split_protocol, url_to_fs

from diffcolor.common.errors import (
    BadImageError,
    InputUnavailableError,
    MissingObjectError,
    StorageConfigError,
    StorageError,
    UserError,
)
from diffcolor.archive import outside
from diffcolor.common.redact import redact, split_userinfo

logger = logging.getLogger(__name__)

# S3 transfer sizes (ours). One PUT up to 64 MiB keeps the common case (masters of
# tens of MB) one request; above it, 16 MiB parts bound the memory of a retry and
# stay well above S3's 5 MiB minimum part size and below its 10,000-part limit
# for any image we write (160 GB).
S3_MULTIPART_THRESHOLD = 64 * 2**20
S3_PART_SIZE = 16 * 2**20

_S3_PROTOCOLS = ("s3", "s3a")
# The fsspec protocols DiffColor reads and writes. Others (ftp, sftp, smb, webhdfs, reference, ...) and chained
# URLs over them ("simplecache::http://...") would reach servers past the checks of diffcolor.archive.outside.
STORE_PROTOCOLS = frozenset({"file", "local", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})
_SECRET_OPTIONS = ("key", "secret", "token", "password", "session_token")
# botocore's "no usable credentials" exceptions (not OSError subclasses), matched
# by class name so that s3fs and botocore stay optional dependencies.
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError")
# Requests the client or the store refuses as malformed: retrying the same request cannot help.
_PERMANENT_CLIENT_ERRORS = ("ParamValidationError", "NoRegionError", "InvalidS3AddressingStyleError",
                            "UnknownEndpointError", "InvalidRegionError")
_PERMANENT_ERRNOS = (errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE, errno.EPERM, errno.ENOSYS, errno.EXDEV)
READ_CHUNK_BYTES = 8 * 2**20
# Content types beyond what the mimetypes module knows on every platform.
_CONTENT_TYPES = {
    ".tif": "image/tiff", ".tiff": "image/tiff", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
    ".webp": "image/webp", ".jp2": "image/jp2", ".json": "application/json", ".parquet": "application/vnd.apache.parquet",
    ".html": "text/html; charset=utf-8", ".safetensors": "application/octet-stream", ".txt": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
}


class OutsideRootError(InputUnavailableError):
    """A path that leads outside the output root it belongs to (a symbolic link, ``..``): refused."""

    error_class = "outside_root"


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on reading one source (ours: far above any archival scan, far below what hurts a worker)."""

    max_bytes: int = 2 * 2**30  # a 2 GiB TIFF is a 400-megapixel 16-bit RGB scan
    seconds: float = 600.0  # wall time for the whole read

    @classmethod
    def from_mib(cls, max_mib: float, seconds: float) -> "ReadLimits":
        """The limits as operators give them: a size in MiB, a time in seconds."""
        return cls(max_bytes=int(max_mib * 2**20), seconds=float(seconds))


def content_type(uri: str) -> str:
    """The Content-Type an object at ``uri`` is stored with, from its file name (else application/octet-stream)."""
    name = str(uri).rsplit("/", 1)[-1].lower()
    extension = os.path.splitext(name)[1]
    return _CONTENT_TYPES.get(extension) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def join(root: str, *parts: str) -> str:
    """Joins path components onto a URI with ``/`` (never ``os.path``: S3 keys use ``/``)."""
    text = str(root).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            text = f"{text}/{part}"
    return text


def absolute(uri: str) -> str:
    """``uri`` with a local path made absolute (``out`` -> ``/home/me/out``); any other URI as given.

    Records name their files by URI: a path relative to the working directory
    of the process that wrote them means nothing to a reader elsewhere.
    """
    protocol, path = split_protocol(str(uri))
    if protocol in (None, "file", "local"):
        return os.path.abspath(os.path.expanduser(path))
    return str(uri)


def confine(root: str, uri: str) -> str:
    """``uri`` when it stays inside the output root ``root``; raises OutsideRootError when it leaves it.

    Local paths are judged by where they really are: ``os.path.realpath`` of
    ``uri`` (every symbolic link on the way followed, a dangling one to where it
    points, ``..`` resolved; a path that does not exist yet by its existing
    part) must be the real root or under it. The root itself may be a link (an
    operator's choice); links inside it may point anywhere inside it. Other
    stores have no links: ``uri`` must start with ``root/`` and hold no ``..``
    segment. Check right before each read or write (a later swap of a folder
    for a link by someone who may write the output is not caught: they could
    change the files themselves).
    """
    root, uri = str(root).rstrip("/") or "/", str(uri)
    fs, path = filesystem(uri)
    if _is_local(fs):
        real_root = os.path.realpath(filesystem(root)[1])
        real = os.path.realpath(path)
        if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
            return uri
    elif uri == root or (uri.startswith(root + "/") and ".." not in uri[len(root) + 1:].split("/")):
        return uri
    raise OutsideRootError(_redact(f"'{uri}' leads outside the output '{root}' (a symbolic link or '..'); refused"))


def create_exclusive(uri: str, data: bytes) -> bool:
    """Creates the object at ``uri`` only if none exists there; True when this call created it.

    The store's own conditional create, so that of several processes or
    machines racing for one name exactly one wins, and readers see the whole
    object or none: local disk a complete staged file hard-linked onto the
    name (``link`` refuses an existing name), S3 ``PutObject`` with
    ``If-None-Match: *``, ``memory://`` a check-and-set under a process lock.
    Raises StorageConfigError on any other store.
    """
    fs, path = filesystem(uri)
    data = bytes(data)
    try:
        if _is_local(fs):
            return _create_local_exclusive(path, data)
        if "memory" in _protocols(fs):
            with _MEMORY_LOCK:
                if fs.exists(path):
                    return False
                fs.pipe_file(path, data)
                return True
        if _is_s3(fs):
            bucket, key, _ = fs.split_path(path)
            try:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*",
                           ContentType=content_type(path))
            except FileExistsError:  # s3fs's translation of 412 Precondition Failed
                return False
            except Exception as error:  # botocore's own classes, or an OSError s3fs made of a 409 conflict
                text = f"{type(error).__name__} {error}"
                if "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text:
                    return False
                raise
            return True
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise backend_error(uri, "writing", error, fs) from error
    finally:
        if not _is_local(fs):
            fs.invalidate_cache(path)
    raise StorageConfigError(_redact(f"'{uri}': exclusive creation needs local disk, S3 or memory://"))


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
    """The filesystem and the backend path of ``uri`` (options from :func:`storage_options_for`).

    S3 credentials written into the URI (``s3://KEY:SECRET@bucket/...``) become
    the filesystem's key and secret, and are remembered as secrets to redact.
    """
    uri = str(uri)
    if outside.is_http(uri):
        raise StorageConfigError(f"'{redact(uri)}' is an http(s) URL: it can be read, never written, listed or opened "
                                 "as a file")
    for part in uri.split("::"):
        protocol, _ = split_protocol(part)
        if protocol is not None and protocol.lower() not in STORE_PROTOCOLS:
            raise StorageConfigError(f"'{redact(uri)}': {protocol}:// is not a store DiffColor uses (a local path, "
                                     "file://, memory://, s3://, gs://, az://; http(s):// to read)")
    options = storage_options_for(uri)
    protocol, _ = split_protocol(uri)
    if protocol in _S3_PROTOCOLS:
        uri, user, password = split_userinfo(uri)
        if user:
            options.update(key=user, secret=password)
    fs, path = url_to_fs(uri, **options)
    return fs, path


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return any(protocol in _S3_PROTOCOLS for protocol in _protocols(fs))


def _redact(text: str, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """``text`` redacted (:func:`diffcolor.common.redact.redact`), also of ``fs``'s credential-like options."""
    options = getattr(fs, "storage_options", None) or {}
    return redact(text, extra=[str(options.get(name) or "") for name in _SECRET_OPTIONS])


_PAST = {"reading": "read", "writing": "written", "checking": "checked", "listing": "listed", "removing": "removed"}


def backend_error(uri: str, action: str, error: BaseException, fs: fsspec.AbstractFileSystem) -> Exception:
    """The DiffColor exception for a backend failure while ``action``-ing ``uri``: permanent or transient by its kind."""
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return MissingObjectError(_redact(f"'{uri}' does not exist (while {action} it)", fs))
    if isinstance(error, PermissionError) or type(error).__name__ in _NO_CREDENTIALS:
        return InputUnavailableError(_redact(f"'{uri}' cannot be {_PAST[action]}: permission denied ({error})", fs))
    described = f"{action} '{uri}' failed: {type(error).__name__}: {error}"
    if _is_permanent(error):
        return StorageConfigError(_redact(f"{described} (the store refuses this request; retrying cannot help)", fs))
    return StorageError(_redact(described, fs))


def _is_permanent(error: BaseException) -> bool:
    """Whether a backend error will repeat on retry: a malformed request, not a busy or unreachable store."""
    if isinstance(error, (TimeoutError, ConnectionError)):
        return False
    if type(error).__name__ in _PERMANENT_CLIENT_ERRORS:
        return True
    return isinstance(error, OSError) and error.errno in _PERMANENT_ERRNOS


def _is_backend_error(error: BaseException) -> bool:
    """OSError, or an exception of the S3 client stack (botocore, aiobotocore, aiohttp)."""
    if isinstance(error, OSError):
        return True
    module = type(error).__module__ or ""
    return module.split(".", 1)[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs")


def read_bytes(uri: str, limits: ReadLimits | None = None) -> bytes:
    """The whole object at ``uri``; with ``limits``, a bounded read of a regular file (a source).

    Raises:
        InputUnavailableError: the object is missing, reading it is denied, it is
            not a regular file (a FIFO, a device), or it was not read within
            ``limits.seconds``.
        BadImageError: it is larger than ``limits.max_bytes``.
        StorageConfigError: the store refuses the request as malformed (permanent).
        StorageError: any other backend failure (transient).
        ForbiddenAddressError (an InputUnavailableError): an http(s) URL that
            points at this host's own network (:mod:`diffcolor.archive.outside`).
    """
    if outside.is_http(uri):
        limits = limits or ReadLimits()
        return outside.fetch(str(uri), max_bytes=limits.max_bytes, seconds=limits.seconds)
    fs, path = filesystem(uri)
    try:
        if limits is None:
            return fs.cat_file(path)
        return _read_bounded(uri, fs, path, limits)
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise backend_error(uri, "reading", error, fs) from error


def _read_bounded(uri: str, fs: fsspec.AbstractFileSystem, path: str, limits: ReadLimits) -> bytes:
    """Reads ``path`` in chunks, refusing special files, too many bytes and too much time."""
    return b"".join(_bounded_chunks(uri, fs, path, limits))


def _bounded_chunks(uri: str, fs: fsspec.AbstractFileSystem, path: str, limits: ReadLimits) -> Iterator[bytes]:
    """The chunks of ``path`` as they are read, refusing special files, too many bytes and too much time."""
    deadline = time.monotonic() + limits.seconds
    if _is_local(fs):
        # Non-blocking open and fstat: a FIFO without a writer must not hang the worker, and a
        # device (/dev/zero) must not be read at all; O_NONBLOCK changes nothing for a regular file.
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        stream = os.fdopen(handle, "rb")
        kind = os.fstat(handle).st_mode
        if not stat.S_ISREG(kind):
            stream.close()
            raise InputUnavailableError(_redact(f"'{uri}' is not a regular file ({file_kind(kind)}); only files are read"))
    else:
        size = (fs.info(path) or {}).get("size")
        if size is not None and size > limits.max_bytes:
            raise _too_large(uri, size, limits)
        stream = fs.open(path, "rb")
    with stream:
        total = 0
        while True:
            chunk = stream.read(READ_CHUNK_BYTES)
            if not chunk:
                return
            total += len(chunk)
            if total > limits.max_bytes:
                raise _too_large(uri, total, limits)
            if time.monotonic() > deadline:
                raise InputUnavailableError(_redact(
                    f"'{uri}' was not read within {limits.seconds:g} s ({total} bytes so far); the source limit is "
                    f"{limits.seconds:g} s"))
            yield chunk


def _too_large(uri: str, size: int, limits: ReadLimits) -> BadImageError:
    return BadImageError(_redact(f"'{uri}' is larger than the source limit of {limits.max_bytes} bytes "
                                 f"({'at least ' if size > limits.max_bytes else ''}{size} bytes)"))


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is ("a FIFO", "a directory"...), from its ``st_mode``."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


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
        raise backend_error(uri, "writing", error, fs) from error
    finally:
        if not _is_local(fs):
            fs.invalidate_cache(path)


class StagedFile:
    """A local file to write an object into, published whole at its URI by :meth:`publish` (see :func:`staged`)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._fs, self._target = filesystem(uri)
        if _is_local(self._fs):  # beside the target: publishing is a rename, never a copy
            directory = os.path.dirname(self._target) or "."
            os.makedirs(directory, exist_ok=True)
            prefix = f".{os.path.basename(self._target)}."
        else:  # a local file first, then streamed to the store
            directory, prefix = None, "diffcolor-"
        handle, self.path = tempfile.mkstemp(prefix=prefix, suffix=".partial", dir=directory)
        os.fchmod(handle, 0o666 & ~_UMASK)
        os.close(handle)
        self.published = False

    def write(self, writer: Callable[[BinaryIO], None]) -> None:
        """Calls ``writer`` with the file opened for writing (from empty); a failure to write it (disk full,
        permission) raises StorageError or InputUnavailableError as :func:`write_bytes` would."""
        try:
            with open(self.path, "wb") as stream:
                writer(stream)
        except Exception as error:
            if not _is_backend_error(error):
                raise
            raise backend_error(self.uri, "writing", error, self._fs) from error

    def publish(self) -> str:
        """Publishes the file's content at the URI atomically (:func:`publish_file`); returns its sha256 (hex)."""
        digest = publish_file(self.uri, self.path)
        self.published = True
        self.discard()
        return digest

    def discard(self) -> None:
        """Removes the local file (a published local file was renamed away: nothing left to remove)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def publish_file(uri: str, local: str) -> str:
    """Publishes the local file ``local`` at ``uri`` atomically; returns its sha256 (hex), read as it is sent.

    Local: fsynced, renamed onto the target (so ``local`` must be on the
    target's filesystem: :func:`staged` puts it beside the target), the folder
    fsynced. S3: one PUT below ``S3_MULTIPART_THRESHOLD``, else a multipart
    upload of parts read from the file in turn (memory: one part), completed
    whole or aborted. Other backends: one ``pipe_file`` of the complete bytes.

    Raises:
        InputUnavailableError, StorageError: as :func:`write_bytes`.
    """
    import hashlib

    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    try:
        if _is_local(fs):
            with open(local, "rb+") as stream:
                for chunk in iter(lambda: stream.read(READ_CHUNK_BYTES), b""):
                    digest.update(chunk)
                os.fsync(stream.fileno())
            os.replace(local, path)
            _fsync_folder_of(path)
        elif _is_s3(fs):
            _put_s3_file(fs, path, local, digest)
        else:
            with open(local, "rb") as stream:
                data = stream.read()
            digest.update(data)
            fs.pipe_file(path, data)
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise backend_error(uri, "writing", error, fs) from error
    finally:
        if not _is_local(fs):
            fs.invalidate_cache(path)
    return digest.hexdigest()


@contextlib.contextmanager
def staged(uri: str) -> Iterator[StagedFile]:
    """A local file (``.path``) to write the object at ``uri`` into, for objects too large to hold in memory.

    Nothing is visible at ``uri`` until :meth:`StagedFile.publish`, which
    publishes the whole file atomically (as :func:`write_bytes` does) and
    returns its sha256; leaving the block, by an error or not, removes the
    local file. On a local disk the file is a ``.partial`` file beside the
    target, so publishing is a rename.
    """
    try:
        file = StagedFile(uri)
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise backend_error(uri, "writing", error, filesystem(uri)[0]) from error
    try:
        yield file
    finally:
        file.discard()


def _put_s3_file(fs: fsspec.AbstractFileSystem, path: str, local: str, digest) -> None:
    """The file at ``local`` as one PUT, or as a multipart upload of parts read in turn, completed whole or
    aborted (as :func:`_write_s3_atomic`); ``digest`` is updated with every byte sent."""
    bucket, key, _ = fs.split_path(path)
    with open(local, "rb") as stream:
        if os.fstat(stream.fileno()).st_size < S3_MULTIPART_THRESHOLD:
            data = stream.read()
            digest.update(data)
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, ContentType=content_type(path))
            return
        upload_id = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key,
                               ContentType=content_type(path))["UploadId"]
        try:
            parts = []
            for number, part in enumerate(iter(lambda: stream.read(S3_PART_SIZE), b""), start=1):
                digest.update(part)
                answer = fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                    Body=part)
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                       MultipartUpload={"Parts": parts})
        except BaseException as error:
            _abort_upload(fs, bucket, key, upload_id, error)
            raise


def _write_s3_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """One PUT, or a multipart upload that is completed whole or aborted."""
    bucket, key, _ = fs.split_path(path)
    if len(data) < S3_MULTIPART_THRESHOLD:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, ContentType=content_type(path))
        return
    upload_id = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key, ContentType=content_type(path))["UploadId"]
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
        _abort_upload(fs, bucket, key, upload_id, error)
        raise


def _abort_upload(fs: fsspec.AbstractFileSystem, bucket: str, key: str, upload_id: str, error: BaseException) -> None:
    """Aborts a multipart upload that failed with ``error``.

    Called for BaseException too: a KeyboardInterrupt or a cancelled task must
    not leave an open upload behind either. The original error is what the
    caller sees; a failed abort is noted on it.
    """
    try:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as abort_error:
        note = _redact(f"aborting multipart upload {upload_id} of s3://{bucket}/{key} also failed: {abort_error}", fs)
        logger.warning("%s; a lifecycle rule AbortIncompleteMultipartUpload will remove it", note)
        error.add_note(note)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
_MEMORY_LOCK = threading.Lock()


def _stage_beside(path: str, data: bytes) -> str:
    """A complete, fsynced copy of ``data`` in a new staging file beside ``path`` (its folder made); its name.

    The staging file gets the usual mode under the process umask (mkstemp creates 0600 files).
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        os.unlink(staging)
        raise
    return staging


def _fsync_folder_of(path: str) -> None:
    """A rename or link into a folder is durable only once the folder's entry is on disk."""
    directory_handle = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory_handle)
    finally:
        os.close(directory_handle)


def _write_local_atomic(path: str, data: bytes) -> None:
    staging = _stage_beside(path, data)
    try:
        os.replace(staging, path)
    except BaseException:
        try:
            os.unlink(staging)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder_of(path)


def _create_local_exclusive(path: str, data: bytes) -> bool:
    """The complete file appears at ``path`` at once, or not at all: written beside it, then hard-linked onto
    ``path`` (``link`` fails when ``path`` exists, so a reader never sees a partial file and one writer wins)."""
    staging = _stage_beside(path, data)
    try:
        try:
            os.link(staging, path)
        except FileExistsError:
            return False
    finally:
        os.unlink(staging)
    _fsync_folder_of(path)
    return True


def modified_time(uri: str) -> float | None:
    """When the object at ``uri`` was last written (seconds since the epoch, the store's clock); None if unknown.

    Raises:
        InputUnavailableError: it is missing or checking is denied. StorageError: other backend failures.
    """
    if outside.is_http(uri):
        return None
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise backend_error(uri, "checking", error, fs) from error
    modified = next((info[key] for key in ("mtime", "LastModified", "last_modified", "created") if info.get(key)), None)
    if hasattr(modified, "timestamp"):
        return float(modified.timestamp())
    return float(modified) if isinstance(modified, (int, float)) else None


def exists(uri: str) -> bool:
    """Whether an object exists at ``uri``, asking the backend, not a listing cache.

    Raises:
        InputUnavailableError: checking is denied. StorageError: other backend failures.
    """
    if outside.is_http(uri):  # a HEAD request, checked like every fetch
        try:
            outside.fetch(str(uri), method="HEAD", seconds=ReadLimits.seconds)
        except MissingObjectError:
            return False
        return True
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        return fs.exists(path)
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise backend_error(uri, "checking", error, fs) from error


def list_files(uri: str) -> list[str]:
    """URIs of the objects directly under the prefix ``uri`` (empty when there is none), sorted.

    Asks the backend, not a listing cache; ``.partial`` staging files are left out.

    Raises:
        InputUnavailableError: listing is denied. StorageError: other backend failures.
    """
    return [join(uri, name) for name in _listed(uri, "file") if not name.endswith(".partial")]


def list_folders(uri: str) -> list[str]:
    """URIs of the folders (prefixes with objects under them) directly under ``uri``, sorted; empty when none.

    Raises:
        InputUnavailableError: listing is denied. StorageError: other backend failures.
    """
    return [join(uri, name) for name in _listed(uri, "directory")]


def _listed(uri: str, kind: str) -> list[str]:
    """The sorted names of the entries of ``kind`` ("file" or "directory") directly under ``uri``, from the backend."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise backend_error(uri, "listing", error, fs) from error
    return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == kind)


def iter_objects(uri: str, *, split_at: Sequence[str] = (), workers: int = 16) -> Iterator[list[str]]:
    """Every object under the prefix ``uri``, recursively, by listing: batches of their paths relative to ``uri``.

    Never one request per object: on S3 it is ``ListObjectsV2`` pages of up to
    1000 keys; ``split_at`` (sorted relative paths) cuts the key space into
    ranges that are listed in parallel by up to ``workers`` threads, each range
    yielded in key order (ranges in any order). Elsewhere one ``find``. On a
    local disk symbolic links are listed as files and never followed. Staging
    ``.partial`` files are left out. Nothing under ``uri``: nothing yielded.

    Raises:
        InputUnavailableError: listing is denied. StorageError: other backend failures.
    """
    fs, path = filesystem(uri)
    path = path.rstrip("/")
    try:
        if _is_s3(fs):
            yield from _iter_s3_objects(fs, path, sorted(split_at), workers)
            return
        fs.invalidate_cache(path)
        if _is_local(fs):
            for folder, folders, files in os.walk(path, followlinks=False):
                inner = os.path.relpath(folder, path)
                prefix = "" if inner == "." else inner.replace(os.sep, "/") + "/"
                links = [name for name in folders if os.path.islink(os.path.join(folder, name))]
                batch = [prefix + name for name in sorted(files + links) if not name.endswith(".partial")]
                if batch:
                    yield batch
            return
        names = fs.find(path) if fs.isdir(path) else []
        yield [name[len(path) + 1:] for name in sorted(names) if not name.endswith(".partial")]
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise backend_error(uri, "listing", error, fs) from error


def _iter_s3_objects(fs, path: str, split_at: list[str], workers: int) -> Iterator[list[str]]:
    """S3 listing pages of the keys under ``path``, in ranges cut at ``split_at``, listed concurrently."""
    bucket, key, _ = fs.split_path(path)
    base = f"{key}/" if key else ""
    bounds = [base + point for point in split_at if point]
    ranges = list(zip([None, *bounds], [*bounds, None]))

    def pages(low: str | None, high: str | None) -> Iterator[list[str]]:
        token = None
        # StartAfter is exclusive and must sort before `low`; keys before `low` that it lets in are dropped.
        start = low[:-1] if low else None
        while True:
            arguments = {"Bucket": bucket, "Prefix": base}
            if token:
                arguments["ContinuationToken"] = token
            elif start:
                arguments["StartAfter"] = start
            answer = fs.call_s3("list_objects_v2", **arguments)
            keys = [item["Key"] for item in answer.get("Contents", [])]
            page = [k[len(base):] for k in keys if (low is None or k >= low) and (high is None or k < high)
                    and not k.endswith(".partial") and not k.endswith("/")]
            if page:
                yield page
            if not answer.get("IsTruncated") or (high is not None and keys and keys[-1] >= high):
                return
            token = answer.get("NextContinuationToken")

    if len(ranges) == 1:
        yield from pages(None, None)
    else:
        yield from _parallel([lambda low=low, high=high: pages(low, high) for low, high in ranges], workers)


def _parallel(sources: list, workers: int) -> Iterator[list[str]]:
    """What the generators ``source()`` yield, each run on one of up to ``workers`` threads, as it comes.

    The queue between them is bounded (a listing waits while the consumer is
    behind), and a consumer that stops early stops the listings.
    """
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    pending: queue.Queue = queue.Queue(maxsize=4 * workers)
    stop = threading.Event()
    finished = object()

    def put(item) -> None:
        while not stop.is_set():
            try:
                pending.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run(source) -> None:
        try:
            for page in source():
                if stop.is_set():
                    return
                put(page)
        except BaseException as error:  # handed to the consumer, which raises it
            put(error)
        finally:
            put(finished)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources)))) as pool:
        for source in sources:
            pool.submit(run, source)
        try:
            left = len(sources)
            while left:
                item = pending.get()
                if item is finished:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            stop.set()


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
        raise backend_error(uri, "removing", error, fs) from error
    finally:
        if not _is_local(fs):
            fs.invalidate_cache(path)


def remove_empty_folders(uri: str) -> None:
    """Removes the empty folders under ``uri``, and ``uri`` itself when it ends up empty, on a local disk.

    Object stores have no folders (a prefix without objects does not exist),
    so there it does nothing. A folder that is not empty, or that another
    process just removed, is left alone.
    """
    fs, path = filesystem(uri)
    if not _is_local(fs) or not os.path.isdir(path):
        return
    for folder, _, _ in os.walk(path, topdown=False):  # children before their parents
        try:
            os.rmdir(folder)
        except OSError:
            pass


def sha256_of(uri: str) -> str:
    """The sha256 (hex) of the object at ``uri``, read in chunks (bounded memory however large it is).

    Raises:
        MissingObjectError: it does not exist. InputUnavailableError: reading is denied.
        StorageError: other backend failures.
    """
    import hashlib

    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(READ_CHUNK_BYTES), b""):
                digest.update(chunk)
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise backend_error(uri, "reading", error, fs) from error
    return digest.hexdigest()


def sha256_bounded(uri: str, limits: ReadLimits) -> str:
    """The sha256 (hex) of the regular file at ``uri``, read in chunks within ``limits`` (as :func:`read_bytes`
    reads a source: a FIFO or device refused, never hung on): an output is checked without holding it whole.

    Raises: as :func:`read_bytes` with ``limits``.
    """
    import hashlib

    if outside.is_http(uri):  # fetched as a source is, through the outside-address checks
        return hashlib.sha256(read_bytes(uri, limits)).hexdigest()
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    try:
        for chunk in _bounded_chunks(uri, fs, path, limits):
            digest.update(chunk)
    except Exception as error:
        if not _is_backend_error(error):
            raise
        raise backend_error(uri, "reading", error, fs) from error
    return digest.hexdigest()


def read_json(uri: str) -> Any:
    """Parsed JSON object at ``uri``; UserError naming it when it is not UTF-8 JSON (a ValueError too)."""
    data = read_bytes(uri)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"'{redact(uri)}' is not JSON: {error}") from None


def write_json(uri: str, value: Any) -> None:
    """Publishes ``value`` as indented UTF-8 JSON at ``uri`` (:func:`strict_json`)."""
    write_bytes(uri, (strict_json(value, indent=2) + "\n").encode("utf-8"))


def strict_json(value: Any, *, indent: int | None = None, default=None) -> str:
    """``value`` as JSON that strict readers accept: keys sorted, NaN and infinities written as null."""
    return json.dumps(_finite(value), indent=indent, ensure_ascii=False, sort_keys=True, allow_nan=False,
                      default=default)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON readers reject NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
