"""The run report: one self-contained HTML contact sheet per run.

Thumbnails are embedded as data URIs, so the page opens in a browser straight
from disk or from a downloaded S3 object, with no server. Each row shows the
item's catalogue fields (title, accession number, ...), the gray source (the
lightness of the derivative, which equals the source's), the colourised
derivative, the prompts as the curator wrote them, the key metrics and links
to the item's files (relative to the report, so they work on disk and in a
copied or served output folder). The metrics are explained once, above the
rows. Skipped items (already done) and failures are listed with their reason.
The top names the model (id and hash), the preset, the run's date (UTC) and the
code version; a smoke run (random-weight tiny bundle) is labelled there.
"""

from __future__ import annotations

import base64
import io
import posixpath
from array import array
from collections import Counter
from typing import Iterable

import numpy as np
from PIL import Image

from diffcolor.archive import storage
from diffcolor.archive.layout import record_beside
from diffcolor.archive.pages import render_page
from diffcolor.common import record as declarations

THUMBNAIL_SIDE = 192  # pixels, long side


def summarise(values: list[float]) -> dict:
    """Distribution of a per-item metric over a run, NaN and None ignored.

    Args:
        values: the metric's values, one per item.

    Returns:
        ``{"count", "mean", "median", "p5", "p95", "min", "max"}``; ``count`` is the
        number of finite-or-infinite (non-NaN) values, the others are NaN when
        ``count`` is 0.

    Raises:
        ValueError: if a value is not a number.
    """
    try:
        array = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"summarise needs numbers, got {values!r:.200}") from exc
    array = array[~np.isnan(array)]
    if array.size == 0:
        nan = float("nan")
        return {"count": 0, "mean": nan, "median": nan, "p5": nan, "p95": nan, "min": nan, "max": nan}
    return {
        "count": int(array.size),
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "p5": float(np.percentile(array, 5)),
        "p95": float(np.percentile(array, 95)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def _thumbnails(access_uri: str) -> tuple[str, str]:
    """Data URIs of the gray and colour thumbnails of a derivative's access copy."""
    with Image.open(io.BytesIO(storage.read_bytes(access_uri))) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        colour = image.copy()
    # The derivative's L* is the source's, so its luminance is the source's gray.
    gray = colour.convert("L")
    uris = []
    for picture in (gray, colour):
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        uris.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris[0], uris[1]


# What each metric means and which way is good, shown once on every report (docs/DESIGN.md §7), and which
# metrics the report summarises: both from the record's declarations (diffcolor.common.record).


def __getattr__(name: str):
    if name == "METRIC_EXPLANATIONS":  # the names older code imports
        return declarations.explanations()
    if name == "STATISTICS":
        return tuple(declared.name for declared in declarations.statistics())
    raise AttributeError(name)


STATUS_WORDS = {"done": "done", "skipped_done": "skipped (already done)", "failed": "failed",
                "not_grayscale": "not grayscale"}


def describe_counts(items: dict[str, int], versions_written: int) -> str:
    """A run's counts in one line, items and versions apart: "6 items: done 5, failed 1; 7 new versions written"."""
    total = sum(items.values())
    parts = ", ".join(f"{STATUS_WORDS.get(status, status)} {count}" for status, count in sorted(items.items()))
    return (f"{total} item{'' if total == 1 else 's'}: {parts or 'none'}; "
            f"{versions_written} new version{'' if versions_written == 1 else 's'} written")


def run_statistics(records: Iterable[dict]) -> tuple[Counter, dict[str, dict], int, Counter]:
    """Records by status, the distribution of each declared statistic over the done records, the
    number of done records (new versions) and items by outcome, in one pass that keeps only the numbers
    (8 bytes per value). An item's records arrive together (the flows add them so)."""
    counts: Counter = Counter()
    items: Counter = Counter()
    names = [declared.name for declared in declarations.statistics()]
    values = {name: array("d") for name in names}
    done = 0
    last_item = None
    for record in records:
        counts[record["status"]] += 1
        if record["item_id"] != last_item:
            items[record["status"]] += 1
            last_item = record["item_id"]
        if record["status"] == "done":
            done += 1
            for name in names:
                if record.get(name) is not None:
                    values[name].append(record[name])
    return counts, {name: summarise(list(column)) for name, column in values.items()}, done, items


CATALOGUE_SHOWN = ("title", "accession_number", "creator", "date", "collection", "rights")  # first, in this order
FILE_LINKS = ("master", "access", "state")


def _relative(report_uri: str, target: str | None) -> str | None:
    """A link from the report to ``target``: relative when both are in one place (a folder or a bucket)."""
    if not target:
        return None
    base, _, _ = report_uri.rpartition("/")
    report_scheme, _, report_path = base.rpartition("://")
    target_scheme, _, target_path = target.rpartition("://")
    if report_scheme != target_scheme:
        return None if target_scheme not in ("", "file", "http", "https") else target
    if report_scheme and report_path.split("/", 1)[0] != target_path.split("/", 1)[0]:
        return None  # another bucket: no link the page could follow
    return posixpath.relpath(target_path, report_path or "/")


def _catalogue(record: dict) -> list[tuple[str, str]]:
    """The catalogue fields of an item as (label, text), the usual ones first."""
    fields = {key: value for key, value in (record.get("catalogue") or {}).items() if value not in (None, "")}
    order = [key for key in CATALOGUE_SHOWN if key in fields] + sorted(set(fields) - set(CATALOGUE_SHOWN))
    return [(key.replace("_", " "), str(fields[key])) for key in order]


def _item_row(record: dict, report_uri: str | None) -> dict:
    row = {name: record.get(name) for name in ("item_id", "version")}
    row["metrics"] = [(declared.shown_label, record.get(declared.name),
                       3 if declared.digits is None else declared.digits) for declared in declarations.report_row()]
    outputs = record.get("outputs") or {}
    links = {role: _relative(report_uri, outputs.get(role)) for role in FILE_LINKS} if report_uri else {}
    if report_uri and outputs.get("master"):
        links["record"] = _relative(report_uri, record_beside(outputs["master"], int(record["version"]))
                                    if record.get("version") else None)
    row.update(caption=record.get("caption", ""), thumbnails=None, thumbnail_error=None,
               prompt=record.get("target_prompt") or f"(primary colourisation) {record.get('caption', '')}",
               prompt_warning=record.get("prompt_warning"), catalogue=_catalogue(record),
               decision={name: record.get(name) for name in ("decision", "decided_by", "decided_at", "decision_note")}
               if record.get("decision") else None,
               links=[(role, link) for role, link in links.items() if link])
    try:
        row["thumbnails"] = _thumbnails(outputs["access"])
    except Exception as error:  # a missing access copy must not lose the rest of the report
        row["thumbnail_error"] = type(error).__name__
    return row


def _git_commit() -> str | None:
    """The commit of the checkout this code runs from, when it runs from one (not an installed package)."""
    import subprocess
    from pathlib import Path

    folder = Path(__file__).resolve().parent
    try:  # this file tracked: an installed copy inside some other repository is not that repository's code
        tracked = subprocess.run(["git", "-C", str(folder), "ls-files", "--error-unmatch", "--", Path(__file__).name],
                                 capture_output=True, text=True, timeout=5, check=False)
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if tracked.returncode == 0 and done.returncode == 0 and commit else None


_GIT_COMMIT: list = []  # looked up once per process


def code_version(records: Iterable[dict] = ()) -> str:
    """The software that wrote ``records`` (their ``software_version``; this package's when none says), and
    the git commit of this code when it runs from a checkout: "diffcolor-archive 0.1.0 (git 0123456789ab)"."""
    from diffcolor import __version__

    versions = sorted({str(r["software_version"]) for r in records if r.get("software_version")}) or [__version__]
    if not _GIT_COMMIT:
        _GIT_COMMIT.append(_git_commit())
    return f"diffcolor-archive {', '.join(versions)}" + (f" (git {_GIT_COMMIT[0]})" if _GIT_COMMIT[0] else "")


def run_header(records: list[dict], run_id: str) -> dict:
    """What the top of a run's report says: the models (id and hash, as the records and ``diffcolor doctor``
    give them), the presets, the run's start (UTC, from the run id; else the first record) and the code version."""
    from datetime import datetime, timezone

    models = sorted({(str(r.get("model_id")), str(r.get("model_hash") or "–")) for r in records if r.get("model_id")})
    presets = sorted({str(r["preset"]) for r in records if r.get("preset")})
    try:
        started = datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        date = started.strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:  # a run id of another shape: the first record's time
        times = sorted(str(r["created_at"]) for r in records if r.get("created_at"))
        date = times[0].replace("T", " ").replace("+00:00", " UTC") if times else "–"
    return {"models": models, "presets": presets, "date": date, "code": code_version(records)}


def render_report(records: list[dict], *, run_id: str, title: str = "DiffColor Archive run", max_rows: int = 2000,
                  all_records: Iterable[dict] | None = None, report_uri: str | None = None,
                  smoke: bool | None = None) -> str:
    """The report's HTML for ``records`` (at most ``max_rows`` thumbnail rows and skipped rows; all failures).

    ``all_records``, when given, is every record of the run (e.g. a
    :class:`diffcolor.archive.results.RecordSpool`, read once): the counts and the
    metric distributions are then the whole run's, while ``records`` (the
    first ones and the failures) are the rows shown. ``report_uri`` is where
    the page goes: links to each item's files are relative to it (none without it).
    ``smoke`` says the run used random weights (a run that skipped every item
    has no record that says so); None: any record saying so.
    """
    counts, stats, done_count, items = run_statistics(records if all_records is None else all_records)
    done = [r for r in records if r["status"] == "done"]
    skipped = [r for r in records if r["status"] == "skipped_done"]
    return render_page(
        "run_report.html",
        title=title,
        run_id=run_id,
        header=run_header(records, run_id),
        summary=describe_counts(items, counts.get("done", 0)),
        smoke=any(record.get("smoke_run") for record in records) if smoke is None else smoke,
        statistics=[(name, values, declarations.field(name).explanation, declarations.field(name).unit)
                    for name, values in stats.items() if values.get("count")],
        rows=[_item_row(record, report_uri) for record in done[:max_rows]],
        more=max(0, done_count - min(len(done), max_rows)),
        skipped=[{"item_id": r["item_id"], "version": r.get("version"), "catalogue": _catalogue(r)}
                 for r in skipped[:max_rows]],
        more_skipped=max(0, counts.get("skipped_done", 0) - min(len(skipped), max_rows)),
        failures=[{name: record.get(name) for name in ("item_id", "status", "error_class", "error_message")}
                  for record in records if record["status"] in ("failed", "not_grayscale")],
    )


def write_report(records: list[dict], uri: str, *, run_id: str, all_records: Iterable[dict] | None = None,
                 smoke: bool | None = None) -> str:
    """Publishes the report at ``uri`` (see :func:`render_report`); returns ``uri``."""
    html = render_report(records, run_id=run_id, all_records=all_records, report_uri=uri, smoke=smoke)
    storage.write_bytes(uri, html.encode("utf-8"))
    return uri
