"""Checks a run makes before it starts Prefect or loads a model: can it write its output at all?

Imports no Prefect, so the command line runs it first; the flows run it
again as their first step (a deployment's run has no command line before it).
What the command line read and resolved for its checks (the manifest, the
preset with its overrides) it hands over to the flow it starts in this process
(:func:`handing_over`), so that a run reads its manifest and applies its
overrides once.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

from diffcolor.archive import storage
from diffcolor.common.errors import DiffColorError, StorageError
from diffcolor.archive.manifest import ManifestFile
from diffcolor.common.redact import redact
from diffcolor.method.presets import PipelineConfig


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


@dataclass(frozen=True)
class Checked:
    """What the command line read and resolved before it started a flow: the manifest (read once, validated),
    and ``preset`` with ``overrides`` applied (``config``). The flow takes each only where its own parameters
    name the same (flows.runs.Run)."""

    manifest: ManifestFile | None = None
    preset: str | None = None
    overrides: dict = field(default_factory=dict)
    config: PipelineConfig | None = None


_CHECKED: ContextVar[Checked | None] = ContextVar("diffcolor_checked", default=None)


@contextmanager
def handing_over(checked: Checked) -> Iterator[None]:
    """Within the block, the flows started in this context find ``checked`` (:func:`handed_over`)."""
    token = _CHECKED.set(checked)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def handed_over() -> Checked | None:
    """What the command line handed over to the flow under way, if anything."""
    return _CHECKED.get()
