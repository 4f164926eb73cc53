"""Every read and write of DiffColor goes through this module, by fsspec URI.

A URI is a local path (``/data/out``, ``out``), ``file://``, ``memory://`` or
``s3://bucket/prefix`` (with any endpoint, through s3fs and its usual
environment variables). Writes publish whole objects only:

- local disk: a temporary file beside the target, flushed and fsynced, then
  ``os.replace`` onto the target, so a reader sees the old object or the new
  one, never a partial one;
- object stores: the complete bytes in one ``pipe`` call (a single PUT, or a
  multipart upload that the backend commits only when complete).

Existence checks and listings bypass fsspec's listing caches, since another
process (another worker, another run) may have just written the object.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from diffcolor.errors import InputUnavailableError, StorageError


def join(root: str, *parts: str) -> str:
    """Joins path components onto a URI with ``/`` (never ``os.path``: S3 keys use ``/``)."""
    text = str(root).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            text = f"{text}/{part}"
    return text


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the backend path of ``uri``."""
    fs, path = url_to_fs(str(uri))
    return fs, path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def read_bytes(uri: str) -> bytes:
    """The whole object at ``uri``; raises InputUnavailableError when missing or unreadable."""
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise InputUnavailableError(f"'{uri}' does not exist") from error
    except PermissionError as error:
        raise InputUnavailableError(f"'{uri}' cannot be read: permission denied") from error
    except OSError as error:
        raise StorageError(f"reading '{uri}' failed: {error}") from error


def write_bytes(uri: str, data: bytes) -> None:
    """Publishes ``data`` at ``uri`` atomically (see the module docstring)."""
    fs, path = filesystem(uri)
    try:
        if _is_local(fs):
            _write_local_atomic(path, data)
        else:
            fs.pipe_file(path, bytes(data))
            fs.invalidate_cache(path)
    except OSError as error:
        raise StorageError(f"writing '{uri}' failed: {error}") from error


def _write_local_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    try:
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
    """Whether an object exists at ``uri``, asking the backend, not a listing cache."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        return fs.exists(path)
    except OSError as error:
        raise StorageError(f"checking '{uri}' failed: {error}") from error


def list_files(uri: str) -> list[str]:
    """URIs of the objects directly under the prefix ``uri`` (empty when there is none), sorted."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise StorageError(f"listing '{uri}' failed: {error}") from error
    names = sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == "file")
    return [join(uri, name) for name in names if not name.endswith(".partial")]


def remove(uri: str) -> None:
    """Deletes the object at ``uri`` if it exists."""
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise StorageError(f"removing '{uri}' failed: {error}") from error


def read_json(uri: str) -> Any:
    """Parsed JSON object at ``uri``."""
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, value: Any) -> None:
    """Publishes ``value`` as indented UTF-8 JSON at ``uri``."""
    write_bytes(uri, (json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
