"""The output root's layout: where every object of a collection lives. Every path under an output is built here.

A collection's output root (any storage URI) holds::

    OUTPUT/items/ITEM_ID/...              one item (ItemLayout, below)
    OUTPUT/runs/RUN_ID/results.parquet    a run's records (results.csv beside it, for spreadsheets)
    OUTPUT/runs/RUN_ID/report.html        the run's contact sheet
    OUTPUT/runs/RUN_ID/summary.json       the run's counts and where its files are
    OUTPUT/runs/RUN_ID/config.json        the run's configuration
    OUTPUT/index/items.parquet            the done-index: the latest plan key and status per item (compacted)
    OUTPUT/index/runs/NAME.parquet        the entries each run added since the last compaction
    OUTPUT/index/lock/...                 the lease of the index's compaction
    OUTPUT/iiif/manifest.json             the published IIIF manifest (``diffcolor iiif``)
    OUTPUT/verify/TIME.json               a repairing audit's report (``diffcolor verify --repair``)
    OUTPUT/eval/...                       an eval (EvalLayout, below)

One item's folder, ``OUTPUT/items/ITEM_ID`` (or any prefix an item is
colourised under)::

    result.json                           the latest version's record (written last: marks the item done)
    versions/v0001.json                   every version's record, never overwritten
    versions/v0001/master.tif             archival master (16-bit when the source was 16-bit)
    versions/v0001/access.jpg             access copy
    versions/v0001/master.c2pa            the master's content credentials (signed runs, sidecar mode)
    state/color-state.safetensors         the colour state (and state.json, a readable copy)
    state/lora/...                        its adapter as a diffusers LoRA file (LoRA mode)
    checkpoints/...                       loop checkpoints while a fit is under way
    attempts/TIME-ID.json                 every failed attempt's record, never overwritten
    lock/lease-GGGGGGGG.json              the item's lease while a worker holds it
    decisions/NNNNNNNN.json               curators' decisions, one object each, never overwritten
    approved.json                         the approved-version pointer the decisions give
    published/NAME.jpg                    an approved version's access copy with the decision in its XMP

The names are this module's constants; the other modules hold none of them
(a test checks the sources). Item ids reach storage through
:meth:`OutputLayout.item`, which applies the item-id rule
(:func:`diffcolor.common.ids.normalize_item_id`): nothing is ever read or
written outside ``OUTPUT/items/`` for an id.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffcolor.archive import storage
from diffcolor.common.ids import normalize_item_id

# The output root's folders and files.
ITEMS = "items"
RUNS = "runs"
INDEX = "index"
INDEX_TABLE = "items.parquet"
INDEX_SHARDS = "runs"
IIIF = "iiif"
IIIF_MANIFEST = "manifest.json"
VERIFY = "verify"
EVAL = "eval"

# A run's files.
RESULTS = "results.parquet"
RESULTS_CSV = "results.csv"
REPORT = "report.html"
SUMMARY = "summary.json"
CONFIG = "config.json"

# An item's folders and files.
RESULT = "result.json"
VERSIONS = "versions"
MASTER = "master.tif"
MASTER_CREDENTIALS = "master.c2pa"  # the master's content-credentials sidecar, when signed
ACCESS = "access"  # the access copy's stem: access.jpg, access.png, ...
STATE = "state"
STATE_FILE = "color-state.safetensors"
STATE_DESCRIPTION = "state.json"
CHECKPOINTS = "checkpoints"
ATTEMPTS = "attempts"
LOCK = "lock"
DECISIONS = "decisions"
APPROVED = "approved.json"
PUBLISHED = "published"

# An eval's folders and files (under OUTPUT/eval; its items under OUTPUT/eval/items, laid out as above).
EVAL_INPUTS = "inputs"
EVAL_ROWS = "rows"
EVAL_FEATURES = "features"
EVAL_PLOTS = "plots"
EVAL_TABLE = "eval.parquet"

NAMES = frozenset({
    ITEMS, RUNS, INDEX, INDEX_TABLE, INDEX_SHARDS, IIIF, IIIF_MANIFEST, VERIFY, EVAL,
    RESULTS, RESULTS_CSV, REPORT, SUMMARY, CONFIG,
    RESULT, VERSIONS, MASTER, MASTER_CREDENTIALS, STATE, STATE_FILE, STATE_DESCRIPTION, CHECKPOINTS, ATTEMPTS, LOCK,
    DECISIONS, APPROVED, PUBLISHED,
    EVAL_INPUTS, EVAL_ROWS, EVAL_FEATURES, EVAL_PLOTS, EVAL_TABLE,
})
"""Every folder and file name of the layout (a test finds none of them spelled out elsewhere)."""


def version_name(version: int) -> str:
    """A version's folder name and its record's stem: ``v0001``."""
    return f"v{version:04d}"


def record_path(version: int) -> str:
    """A version's record, relative to its item's folder: ``versions/v0001.json``."""
    return f"{VERSIONS}/{version_name(version)}.json"


def version_path(version: int) -> str:
    """A version's folder, relative to its item's folder: ``versions/v0001``."""
    return f"{VERSIONS}/{version_name(version)}"


def is_record_path(path: str) -> bool:
    """Whether ``path`` (relative to an item's folder) is in the place of a version record (``versions/*.json``)."""
    return path.startswith(f"{VERSIONS}/") and path.count("/") == 1 and path.endswith(".json")


def version_number(record_uri: str) -> int:
    """The version number of a version record's URI (``.../versions/v0012.json`` -> 12)."""
    return int(record_uri.rsplit("/v", 1)[1][:4])


def record_beside(output_uri: str, version: int) -> str:
    """The record of the version whose output is ``output_uri`` (``.../versions/v0001/master.tif``)."""
    return output_uri.rsplit("/", 2)[0] + f"/{version_name(version)}.json"


def path_in_item(uri: str, item_id: str) -> str | None:
    """The path of ``uri`` inside the folder of item ``item_id`` (records name absolute URIs; the output may have
    moved since), or None when it names no file of this item."""
    marker = f"/{ITEMS}/{item_id}/"
    if marker not in uri:
        return None
    name = uri.rsplit(marker, 1)[1]
    parts = name.split("/")
    if not name or any(part in ("", ".", "..") for part in parts):
        return None
    return name


def item_id_from(prefix: str) -> str:
    """The item id of the item whose folder is ``prefix`` (its last part, as the folder is named).

    The reverse of :meth:`OutputLayout.item_prefix`; the id is as the folder
    names it, not checked again (a reader that uses it for storage checks it).
    """
    return str(prefix).rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ItemLayout:
    """The URIs of one item's objects under its output prefix."""

    prefix: str

    @property
    def item_id(self) -> str:
        return item_id_from(self.prefix)

    @property
    def result(self) -> str:
        return storage.join(self.prefix, RESULT)

    @property
    def versions(self) -> str:
        return storage.join(self.prefix, VERSIONS)

    def record(self, version: int) -> str:
        return storage.join(self.prefix, record_path(version))

    def version(self, version: int) -> str:
        """The folder of a version's outputs."""
        return storage.join(self.prefix, version_path(version))

    def output(self, version: int, name: str) -> str:
        return storage.join(self.version(version), name)

    def master(self, version: int) -> str:
        return self.output(version, MASTER)

    def master_credentials(self, version: int) -> str:
        return self.output(version, MASTER_CREDENTIALS)

    def access(self, version: int, extension: str) -> str:
        """The access copy, ``extension`` without its dot (``jpg``)."""
        return self.output(version, f"{ACCESS}.{extension}")

    @property
    def state(self) -> str:
        """The folder of the colour state (the state object, state.json and the LoRA folder ``lora/``)."""
        return storage.join(self.prefix, STATE)

    @property
    def state_object(self) -> str:
        """The colour state itself: one safetensors object."""
        return storage.join(self.state, STATE_FILE)

    @property
    def checkpoints(self) -> str:
        return storage.join(self.prefix, CHECKPOINTS)

    @property
    def attempts(self) -> str:
        return storage.join(self.prefix, ATTEMPTS)

    @property
    def lock(self) -> str:
        """The folder of the item's lease (:mod:`diffcolor.archive.leases`)."""
        return lock_folder(self.prefix)

    @property
    def decisions(self) -> str:
        return storage.join(self.prefix, DECISIONS)

    @property
    def approved(self) -> str:
        """The approved-version pointer (:mod:`diffcolor.archive.decisions`)."""
        return storage.join(self.prefix, APPROVED)

    def published(self, name: str) -> str:
        """A published access copy (JPEG) named ``name``."""
        return storage.join(self.prefix, PUBLISHED, f"{name}.jpg")

    def version_records(self) -> list[str]:
        """The URIs of every version record, oldest first."""
        return [uri for uri in storage.list_files(self.versions) if uri.endswith(".json")]

    def next_version(self) -> int:
        """One more than the highest version recorded so far."""
        return max(map(version_number, self.version_records()), default=0) + 1


def lock_folder(prefix: str) -> str:
    """The lease folder of whatever ``prefix`` names (an item, or the done-index)."""
    return storage.join(prefix, LOCK)


def state_object(folder: str) -> str:
    """The colour state in a state folder."""
    return storage.join(folder, STATE_FILE)


def state_description(folder: str) -> str:
    """The readable copy of the state's description in a state folder."""
    return storage.join(folder, STATE_DESCRIPTION)


@dataclass(frozen=True)
class RunLayout:
    """The URIs of one run's files under its prefix (``OUTPUT/runs/RUN_ID``)."""

    prefix: str

    @property
    def run_id(self) -> str:
        return str(self.prefix).rstrip("/").rsplit("/", 1)[-1]

    @property
    def results(self) -> str:
        return storage.join(self.prefix, RESULTS)

    @property
    def results_csv(self) -> str:
        return storage.join(self.prefix, RESULTS_CSV)

    @property
    def report(self) -> str:
        return storage.join(self.prefix, REPORT)

    @property
    def summary(self) -> str:
        return storage.join(self.prefix, SUMMARY)

    @property
    def config(self) -> str:
        return storage.join(self.prefix, CONFIG)

    @property
    def files(self) -> tuple[str, ...]:
        """The run's delivered files: results table, its CSV copy, report."""
        return self.results, self.results_csv, self.report


@dataclass(frozen=True)
class EvalLayout:
    """The URIs of an eval's objects under its prefix (``OUTPUT/eval``)."""

    prefix: str

    @property
    def items(self) -> "OutputLayout":
        """The eval's own items, laid out as a collection's."""
        return OutputLayout(self.prefix)

    def input(self, item_id: str) -> str:
        """The gray made from an item's ground truth."""
        return storage.join(self.prefix, EVAL_INPUTS, f"{item_id}.png")

    def row(self, item_id: str, version: int) -> str:
        return storage.join(self.prefix, EVAL_ROWS, item_id, f"{version_name(version)}.json")

    def features(self, item_id: str, version: int) -> str:
        return storage.join(self.prefix, EVAL_FEATURES, item_id, f"{version_name(version)}.safetensors")

    def plot(self, name: str) -> str:
        return storage.join(self.prefix, EVAL_PLOTS, f"{name}.png")

    @property
    def table(self) -> str:
        return storage.join(self.prefix, EVAL_TABLE)

    @property
    def summary(self) -> str:
        return storage.join(self.prefix, SUMMARY)

    @property
    def report(self) -> str:
        return storage.join(self.prefix, REPORT)


def eval_table_candidates(location: str) -> list[str]:
    """Where an eval's table is, given an output root or an eval's folder."""
    return [EvalLayout(storage.join(location, EVAL)).table, EvalLayout(location).table]


def summary_beside(table_uri: str) -> str:
    """The summary beside a results or eval table."""
    return table_uri.rsplit("/", 1)[0] + f"/{SUMMARY}"


@dataclass(frozen=True)
class OutputLayout:
    """The URIs of a collection's objects under its output root."""

    root: str

    @property
    def items(self) -> str:
        """The folder of every item's folder."""
        return storage.join(self.root, ITEMS)

    def item_prefix(self, item_id: str) -> str:
        """Where an item's objects live. Every id that reaches storage passes here, so every one goes through the
        item-id rule: an unsafe id (``../..``, a separator, a device name) raises UnsafeItemIdError."""
        return storage.join(self.root, ITEMS, normalize_item_id(item_id))

    def item(self, item_id: str) -> ItemLayout:
        return ItemLayout(self.item_prefix(item_id))

    def listed_item(self, name: str) -> ItemLayout:
        """The item whose folder a listing of ``items/`` found as ``name`` (not checked by the item-id rule: an
        audit reads whatever is there)."""
        return ItemLayout(storage.join(self.root, ITEMS, name))

    def item_id_from(self, uri: str) -> str:
        """The item id of ``uri``: an item's folder or any object in it. ValueError when it is not under ``items/``."""
        root = self.items + "/"
        if not str(uri).startswith(root) or not str(uri)[len(root):].split("/", 1)[0]:
            raise ValueError(f"'{uri}' is not inside an item's folder under '{self.items}'")
        return str(uri)[len(root):].split("/", 1)[0]

    @property
    def runs(self) -> str:
        return storage.join(self.root, RUNS)

    def run(self, run_id: str) -> RunLayout:
        return RunLayout(storage.join(self.root, RUNS, run_id))

    def run_prefix(self, run_id: str) -> str:
        return self.run(run_id).prefix

    @property
    def index(self) -> str:
        """The done-index's folder (its lease's prefix too)."""
        return storage.join(self.root, INDEX)

    @property
    def index_table(self) -> str:
        """The compacted done-index."""
        return storage.join(self.index, INDEX_TABLE)

    @property
    def index_shards(self) -> str:
        """The folder of the entries each run added since the last compaction."""
        return storage.join(self.index, INDEX_SHARDS)

    def index_shard(self, name: str) -> str:
        return storage.join(self.index_shards, f"{name}.parquet")

    @property
    def iiif_manifest(self) -> str:
        return storage.join(self.root, IIIF, IIIF_MANIFEST)

    def verify_report(self, stamp: str) -> str:
        return storage.join(self.root, VERIFY, f"{stamp}.json")

    @property
    def eval(self) -> EvalLayout:
        return EvalLayout(storage.join(self.root, EVAL))
