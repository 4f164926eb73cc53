"""Checks a run makes before it starts Prefect or loads a model: can it write its output at all?

Imports no Prefect, so the command line runs it first; the flows run it
again as their first step (a deployment's run has no command line before it).
"""

from __future__ import annotations

import uuid

from diffcolor.archive import storage
from diffcolor.common.errors import DiffColorError, StorageError
from diffcolor.common.redact import redact


class OutputNotWritableError(StorageError):
    """The output root cannot be written (read-only folder, missing bucket, no write permission, unreachable)."""

    error_class = "storage"


def check_output_writable(output: str) -> None:
    """Writes a small object under ``output`` and removes it again; OutputNotWritableError, one line, if that fails.

    Local and S3-compatible stores alike: a read-only or missing folder that
    cannot be created, a missing bucket, an invalid bucket name, denied
    credentials and an unreachable endpoint are all found here, before any
    model loads.
    """
    probe = storage.join(output, f".diffcolor-write-probe-{uuid.uuid4().hex[:12]}")
    try:
        storage.write_bytes(probe, b"diffcolor write probe: safe to delete\n")
        storage.remove(probe)
    except (DiffColorError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise OutputNotWritableError(f"output '{redact(output)}' cannot be written: {redact(reason)}") from None
