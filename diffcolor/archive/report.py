"""The run report: one self-contained HTML contact sheet per run.

Thumbnails are embedded as data URIs, so the page opens in a browser straight
from disk or from a downloaded S3 object, with no server. Each row shows the
gray source (the lightness of the derivative, which equals the source's), the
colourised derivative, the prompts and the key metrics; failures are listed
with their class and message. A smoke run (random-weight tiny bundle) is
labelled at the top.
"""

from __future__ import annotations

import base64
import io
from array import array
from collections import Counter
from typing import Iterable

import numpy as np
from PIL import Image

from diffcolor.archive import storage
from diffcolor.archive.pages import render_page

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


STATISTICS = ("max_delta_l", "colorfulness", "clip_score", "alignment_confidence", "gamut_clipped_fraction",
              "device_seconds")


def run_statistics(records: Iterable[dict]) -> tuple[Counter, dict[str, dict], int]:
    """Counts by status, the distribution of each of :data:`STATISTICS` over the done records, and the
    number of done records, in one pass that keeps only the numbers (8 bytes per value)."""
    counts: Counter = Counter()
    values = {name: array("d") for name in STATISTICS}
    done = 0
    for record in records:
        counts[record["status"]] += 1
        if record["status"] == "done":
            done += 1
            for name in STATISTICS:
                if record.get(name) is not None:
                    values[name].append(record[name])
    return counts, {name: summarise(list(column)) for name, column in values.items()}, done


def render_report(records: list[dict], *, run_id: str, title: str = "DiffColor Archive run", max_rows: int = 2000,
                  all_records: Iterable[dict] | None = None) -> str:
    """The report's HTML for ``records`` (at most ``max_rows`` thumbnail rows; all failures listed).

    ``all_records``, when given, is every record of the run (e.g. a
    :class:`diffcolor.archive.results.RecordSpool`, read once): the counts and the
    metric distributions are then the whole run's, while ``records`` (the
    first ones and the failures) are the rows shown.
    """
    counts, stats, done_count = run_statistics(records if all_records is None else all_records)
    done = [r for r in records if r["status"] == "done"]
    rows = []
    for record in done[:max_rows]:
        row = {name: record.get(name) for name in ("item_id", "version", "max_delta_l", "colorfulness", "clip_score",
                                                    "alignment_confidence", "gamut_clipped_fraction")}
        row.update(caption=record.get("caption", ""), thumbnails=None, thumbnail_error=None,
                   prompt=record.get("target_prompt") or f"(primary colourisation) {record.get('caption', '')}",
                   prompt_warning=record.get("prompt_warning"))
        try:
            row["thumbnails"] = _thumbnails(record["outputs"]["access"])
        except Exception as error:  # a missing access copy must not lose the rest of the report
            row["thumbnail_error"] = type(error).__name__
        rows.append(row)
    return render_page(
        "run_report.html",
        title=title,
        run_id=run_id,
        summary=" · ".join(f"{status}: {count}" for status, count in sorted(counts.items())),
        smoke=any(record.get("smoke_run") for record in records),
        statistics=[(name, values) for name, values in stats.items() if values.get("count")],
        rows=rows,
        more=done_count - len(rows) if done_count > len(rows) else 0,
        failures=[{name: record.get(name) for name in ("item_id", "status", "error_class", "error_message")}
                  for record in records if record["status"] in ("failed", "not_grayscale")],
    )


def write_report(records: list[dict], uri: str, *, run_id: str, all_records: Iterable[dict] | None = None) -> str:
    """Publishes the report at ``uri`` (see :func:`render_report`); returns ``uri``."""
    storage.write_bytes(uri, render_report(records, run_id=run_id, all_records=all_records).encode("utf-8"))
    return uri
