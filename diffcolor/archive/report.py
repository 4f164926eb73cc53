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
import html
import io
from array import array
from collections import Counter
from typing import Iterable

import numpy as np
from PIL import Image

from diffcolor.archive import storage

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


def _number(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


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
    smoke = any(record.get("smoke_run") for record in records)
    done = [r for r in records if r["status"] == "done"]
    failed = [r for r in records if r["status"] in ("failed", "not_grayscale")]

    rows = []
    for record in done[:max_rows]:
        try:
            gray, colour = _thumbnails(record["outputs"]["access"])
            pictures = f"<td><img src='{gray}' alt='gray'></td><td><img src='{colour}' alt='colour'></td>"
        except Exception as error:  # a missing access copy must not lose the rest of the report
            pictures = f"<td colspan=2>thumbnail unavailable: {html.escape(type(error).__name__)}</td>"
        prompt = record.get("target_prompt") or f"(primary colourisation) {record.get('caption', '')}"
        rows.append(
            f"<tr><td>{html.escape(str(record['item_id']))}<br><small>v{record.get('version')}</small></td>{pictures}"
            f"<td><b>caption</b> {html.escape(str(record.get('caption', '')))}<br><b>prompt</b> {html.escape(prompt)}</td>"
            f"<td>max ΔL* {_number(record.get('max_delta_l'))}<br>colourfulness {_number(record.get('colorfulness'), 1)}"
            f"<br>CLIP {_number(record.get('clip_score'), 1)}<br>alignment {_number(record.get('alignment_confidence'))}"
            f"<br>gamut-clipped {_number(record.get('gamut_clipped_fraction'), 3)}</td></tr>"
        )
    failures = "".join(
        f"<tr><td>{html.escape(str(r['item_id']))}</td><td>{html.escape(r['status'])}</td>"
        f"<td>{html.escape(str(r.get('error_class')))}</td><td>{html.escape(str(r.get('error_message')))}</td></tr>"
        for r in failed
    )
    summary = " · ".join(f"{status}: {count}" for status, count in sorted(counts.items()))
    stat_rows = "".join(
        f"<tr><td>{name}</td><td>{values['count']}</td>"
        + "".join(f"<td>{_number(values.get(k), 3)}</td>" for k in ("median", "p5", "p95", "max")) + "</tr>"
        for name, values in stats.items() if values.get("count")
    )
    banner = ("<p class=smoke><b>SMOKE RUN</b>: random-weight tiny bundle. These images test the pipeline; "
              "they are not colourisations.</p>") if smoke else ""
    shown = min(len(done), max_rows)
    more = f"<p>{done_count - shown} more done items are in results.parquet.</p>" if done_count > shown else ""
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{html.escape(title)} {html.escape(run_id)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}} .smoke{{background:#fdd;padding:8px}}</style></head>
<body><h1>{html.escape(title)}</h1><p>run <code>{html.escape(run_id)}</code> — {html.escape(summary)}</p>{banner}
<h2>Metrics of done items</h2><table id=metrics><tr><th>metric</th><th>items</th><th>median</th><th>p5</th><th>p95</th><th>max</th></tr>{stat_rows}</table>
<h2>Items</h2><table id=items><tr><th>item</th><th>gray</th><th>colour</th><th>prompts</th><th>metrics</th></tr>{''.join(rows)}</table>{more}
<h2>Failures and skips</h2><table id=failures><tr><th>item</th><th>status</th><th>class</th><th>reason</th></tr>{failures}</table>
</body></html>
"""


def write_report(records: list[dict], uri: str, *, run_id: str, all_records: Iterable[dict] | None = None) -> str:
    """Publishes the report at ``uri`` (see :func:`render_report`); returns ``uri``."""
    storage.write_bytes(uri, render_report(records, run_id=run_id, all_records=all_records).encode("utf-8"))
    return uri
