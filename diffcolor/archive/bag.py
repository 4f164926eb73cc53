"""Delivery of a run as a BagIt bag, for hand-off to a preservation system.

``diffcolor bag OUTPUT --run RUN_ID -o BAG_DIR`` copies what the run produced
into a new local folder and makes it a BagIt bag (RFC 8493, the Library of
Congress's ``bagit`` package) with sha256 and sha512 manifests, then
validates it:

- ``data/items/ITEM/versions/vNNNN/...``: each derivative of the run's done
  versions (master, access copy, the master's content-credentials sidecar when
  signed), each checked against the sha256 its record names before it goes in;
- ``data/items/ITEM/versions/vNNNN.json``: each version's record;
- ``data/runs/RUN_ID/``: the run's ``results.parquet``, ``results.csv`` and
  ``report.html``.

Paths under ``data/`` are the paths under OUTPUT, so the bag mirrors the
archive. Sources are never copied (they are the holding institution's
originals) and colour states stay in the archive (they are working data, not
deliverables). The output may be any storage the archive reads (local, S3);
the bag is written locally, into a folder that must not exist yet or be empty.
Every file read goes through :func:`diffcolor.archive.storage.confine`: a
run, record or derivative that a symbolic link (or ``..``) leads outside the
output is refused, never copied into the bag.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

from diffcolor import __version__
from diffcolor.archive import storage
from diffcolor.archive.layout import OutputLayout
from diffcolor.archive.results import read_results
from diffcolor.common.errors import PermanentError
from diffcolor.common.keys import sha256_hex

DELIVERED_ROLES = ("master", "access", "master_credentials")


class BagError(PermanentError):
    """The bag cannot be made: a missing or changed file, a bad destination, or a bag that does not validate."""

    error_class = "bag"


def _relative(output: str, uri: str) -> str:
    """``uri``'s path under ``output`` (refused when it is not under it)."""
    root = output.rstrip("/") + "/"
    if not uri.startswith(root):
        raise BagError(f"'{uri}' is not inside the output '{output}'")
    relative = posixpath.normpath(uri[len(root):])
    if relative.startswith("../") or relative.startswith("/") or relative == "..":
        raise BagError(f"'{uri}' is not inside the output '{output}'")
    return relative


def _inside(output: str, uri: str) -> str:
    """``uri``, refused (BagError) when it leads outside the output (:func:`diffcolor.archive.storage.confine`)."""
    try:
        return storage.confine(output, uri)
    except storage.OutsideRootError as error:
        raise BagError(f"{error}: not delivered") from None


def _put(bag: Path, relative: str, data: bytes) -> None:
    """Stages a file at its path under OUTPUT; ``make_bag`` then moves everything under ``data/``."""
    path = bag / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_bag(output: str, run_id: str, destination: str | os.PathLike, *,
              organization: str | None = None) -> dict:
    """Makes and validates the bag of run ``run_id`` of ``output`` in ``destination``; returns a summary.

    Raises BagError when the destination is not empty, the run has no
    results, a derivative is missing or differs from its recorded sha256, or
    the finished bag does not validate.
    """
    import bagit

    # 1. The destination and the run's records.
    output = storage.absolute(output)
    bag = Path(destination)
    if bag.exists() and any(bag.iterdir()):
        raise BagError(f"'{bag}' is not empty: a bag is made in a new folder")
    run = OutputLayout(output).run(run_id)
    results = _inside(output, run.results)
    if not storage.exists(results):
        raise BagError(f"run '{run_id}' has no results in '{output}'")
    records = [json.loads(text) for text in read_results(results).column("record_json").to_pylist()]
    done = [record for record in records if record.get("status") == "done"]

    # 2. Each done version's derivatives (checked against its record) and its record.
    bag.mkdir(parents=True, exist_ok=True)
    files = 0
    for record in done:
        for role in DELIVERED_ROLES:
            uri = (record.get("outputs") or {}).get(role)
            if not uri:
                continue
            relative = _relative(output, uri)
            data = storage.read_bytes(_inside(output, uri))
            expected = (record.get("output_sha256") or {}).get(role)
            if expected and sha256_hex(data) != expected:
                raise BagError(f"'{uri}' differs from the sha256 its record names: not delivered")
            _put(bag, relative, data)
            files += 1
        record_uri = OutputLayout(output).item(record["item_id"]).record(int(record["version"]))
        _put(bag, _relative(output, record_uri), storage.read_bytes(_inside(output, record_uri)))
        files += 1

    # 3. The run's own files.
    for uri in run.files:
        uri = _inside(output, uri)
        if storage.exists(uri):
            _put(bag, _relative(output, uri), storage.read_bytes(uri))
            files += 1

    # 4. Bag it, then check the bag as a receiving system would.
    info = {"External-Description": f"DiffColor Archive run {run_id}: {len(done)} colourised versions "
                                    "(AI colourisations of black-and-white sources) with their records",
            "External-Identifier": run_id, "Bag-Software-Agent": f"diffcolor-archive {__version__}"}
    if organization:
        info["Source-Organization"] = organization
    made = bagit.make_bag(str(bag), bag_info=info, checksums=["sha256", "sha512"])
    try:
        made.validate()
    except bagit.BagValidationError as error:
        raise BagError(f"the bag in '{bag}' does not validate: {error}") from None
    return {"bag": str(bag), "run_id": run_id, "versions": len(done), "files": files}
