"""What an eval shows: its HTML report and plots, its terminal summary, and two evals side by side.

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no
global backend switch), written as PNG files and embedded in the HTML as data
URIs, like the thumbnails, so a report opens offline from disk or a downloaded
object.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from diffcolor.archive import storage
from diffcolor.archive.images import read_image
from diffcolor.archive.layout import EvalLayout
from diffcolor.archive.pages import render_page
from diffcolor.tools.eval_metrics import METRICS

THUMBNAIL_SIDE = 160  # pixels, long side
PLOTS_MISSING = "plots need matplotlib: pip install 'diffcolor-archive[plots]'"
PLOT_DPI = 100


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    return buffer.getvalue()


def _data_uri(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def metric_distributions_png(rows: list[dict]) -> bytes:
    """One panel per metric: a histogram of its per-item values with each value ticked below."""
    from matplotlib.ticker import MaxNLocator

    done = [row for row in rows if row["status"] == "done"]
    names = [name for name in METRICS if _finite(row.get(name) for row in done)]
    columns = 4
    grid = max(1, math.ceil(len(names) / columns))
    figure = _figure(3.2 * columns, 2.4 * grid)
    for index, name in enumerate(names):
        axes = figure.add_subplot(grid, columns, index + 1)
        values = _finite(row.get(name) for row in done)
        axes.hist(values, bins=min(20, max(5, len(values) // 2)), color="#4a7bb7", edgecolor="white")
        axes.plot(values, [0] * len(values), "|", color="black", markersize=12)
        unit = METRICS[name][0]
        axes.set_title(f"{name}{f' ({unit})' if unit else ''}", fontsize=9)
        axes.tick_params(labelsize=7)
        axes.set_ylabel("items", fontsize=7)
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not names:
        figure.add_subplot(1, 1, 1).text(0.5, 0.5, "no finite metric values", ha="center")
    return _png(figure)


def colorfulness_png(rows: list[dict]) -> bytes:
    """Colourfulness of each output against its ground truth, with the line of equal colourfulness."""
    done = [row for row in rows if row["status"] == "done"
            and _finite([row.get("colorfulness")]) and _finite([row.get("colorfulness_ground_truth")])]
    figure = _figure(4.8, 4.4)
    axes = figure.add_subplot(1, 1, 1)
    truth = [row["colorfulness_ground_truth"] for row in done]
    produced = [row["colorfulness"] for row in done]
    top = max(truth + produced + [1.0]) * 1.1
    axes.plot([0, top], [0, top], "--", color="gray", linewidth=1, label="output = ground truth")
    axes.scatter(truth, produced, color="#c0504d", zorder=3)
    if len(done) <= 30:
        for row in done:
            axes.annotate(str(row["item_id"]), (row["colorfulness_ground_truth"], row["colorfulness"]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    axes.set_xlim(0, top)
    axes.set_ylim(0, top)
    axes.set_xlabel("ground truth colourfulness (Hasler-Suesstrunk)")
    axes.set_ylabel("output colourfulness")
    axes.legend(fontsize=8, loc="upper left")
    return _png(figure)


def _thumbnail(picture: Image.Image) -> str:
    picture = picture.copy()
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=85)
    return _data_uri(buffer.getvalue(), "jpeg")


def _row_thumbnails(row: dict) -> list[dict]:
    """The ground truth, gray input and output thumbnails as data URIs (an error name when one is unreadable)."""
    cells = []
    for role in ("ground_truth_uri", "gray_uri", "access_uri"):
        try:
            source = read_image(storage.read_bytes(row[role]), row[role])
            values = source.rgb if source.rgb is not None else np.repeat(source.gray[..., None], 3, axis=-1)
            picture = _thumbnail(Image.fromarray(np.round(values * 255).astype(np.uint8)))
            cells.append({"role": role, "picture": picture, "error": None})
        except Exception as error:  # one missing picture must not lose the rest of the report
            cells.append({"role": role, "picture": None, "error": type(error).__name__})
    return cells


def render_eval_report(rows: list[dict], summary: dict, plots: dict[str, bytes], *, max_rows: int = 1000) -> str:
    """The report's HTML: summary, missing metrics, plots, per-item rows, failures."""
    done = [row for row in rows if row["status"] == "done"]
    shown = [{"item_id": row["item_id"], "version": row.get("version"), "reused": bool(row.get("reused")),
              "thumbnails": _row_thumbnails(row), "prompt": row.get("prompt") or "",
              "metrics": [(name, row[name]) for name in METRICS if row.get(name) is not None]}
             for row in done[:max_rows]]
    return render_page(
        "eval_report.html",
        package="diffcolor.tools",
        title="DiffColor eval",
        summary=summary,
        counts=" · ".join(f"{status}: {count}" for status, count in sorted(summary["counts"].items())),
        statistics=[(name, stats) for name, stats in summary["metrics"].items() if stats["count"]],
        plots=[(name, _data_uri(data, "png")) for name, data in plots.items()],
        rows=shown,
        more=max(0, len(done) - max_rows),
        failures=[{name: row.get(name) for name in ("item_id", "status", "error_class", "error_message")}
                  for row in rows if row["status"] != "done"],
    )


def plots_available() -> bool:
    """Whether matplotlib (the ``plots`` extra) is installed; without it reports are written without plots."""
    return importlib.util.find_spec("matplotlib") is not None


def write_eval_report(rows: list[dict], summary: dict, prefix: str, report_uri: str) -> dict[str, str]:
    """Writes the plots under ``PREFIX/plots/`` and the report at ``report_uri``; returns the plots' URIs by name.

    Without matplotlib the report has no plots and says so among the metrics not computed.
    """
    plots = {}
    if plots_available():
        plots = {"metric_distributions": metric_distributions_png(rows), "colorfulness": colorfulness_png(rows)}
    else:
        summary = dict(summary, missing={**summary["missing"], "plots": PLOTS_MISSING})
    uris = {}
    for name, data in plots.items():
        uris[f"plot_{name}"] = EvalLayout(prefix).plot(name)
        storage.write_bytes(uris[f"plot_{name}"], data)
    storage.write_bytes(report_uri, render_eval_report(rows, summary, plots).encode("utf-8"))
    return uris


# ---------------------------------------------------------------------------
# Comparing two evals.


def _pair_rows(rows_a: list[dict], rows_b: list[dict]) -> list[tuple[str, dict, dict]]:
    """Done rows of A and B paired by item id, then by order among the item's versions."""
    def keyed(rows):
        seen: dict[str, int] = {}
        result = {}
        for row in rows:
            if row["status"] != "done":
                continue
            index = seen.get(row["item_id"], 0)
            seen[row["item_id"]] = index + 1
            result[(row["item_id"], index)] = row
        return result

    a, b = keyed(rows_a), keyed(rows_b)
    return [(f"{item}" + (f" #{index + 1}" if index else ""), a[(item, index)], b[(item, index)])
            for item, index in a if (item, index) in b]


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def compare_evals(rows_a: list[dict], summary_a: dict, rows_b: list[dict], summary_b: dict) -> dict:
    """Per-metric differences B - A over the items both evals did, and per-item rows.

    Returns ``{"pairs": n, "metrics": {name: {"mean_a", "mean_b", "mean_diff", "median_diff", "b_better",
    "a_better", "count"}}, "items": [{"item_id", name_a, name_b, name_diff...}], "fid": {"a", "b", "diff"}}``.
    ``b_better``/``a_better`` count items where B (A) is strictly better, for metrics with a direction.
    """
    pairs = _pair_rows(rows_a, rows_b)
    metrics = {}
    for name, (_, higher) in METRICS.items():
        values = [(_float(a.get(name)), _float(b.get(name))) for _, a, b in pairs]
        values = [(x, y) for x, y in values if not (math.isnan(x) or math.isnan(y))]
        finite = [(x, y) for x, y in values if math.isfinite(x) and math.isfinite(y)]
        diffs = [y - x for x, y in finite]
        entry = {"count": len(values), "mean_a": float(np.mean([x for x, _ in finite])) if finite else float("nan"),
                 "mean_b": float(np.mean([y for _, y in finite])) if finite else float("nan"),
                 "mean_diff": float(np.mean(diffs)) if diffs else float("nan"),
                 "median_diff": float(np.median(diffs)) if diffs else float("nan"), "b_better": None, "a_better": None}
        if higher is not None:
            entry["b_better"] = sum(1 for x, y in values if (y > x if higher else y < x))
            entry["a_better"] = sum(1 for x, y in values if (x > y if higher else x < y))
        metrics[name] = entry
    items = []
    for label, a, b in pairs:
        item = {"item_id": label}
        for name in METRICS:
            x, y = _float(a.get(name)), _float(b.get(name))
            item.update({f"{name}_a": x, f"{name}_b": y, f"{name}_diff": y - x})
        items.append(item)
    fid_a, fid_b = summary_a.get("fid"), summary_b.get("fid")
    fid = {"a": fid_a, "b": fid_b, "diff": None if fid_a is None or fid_b is None else fid_b - fid_a}
    return {"pairs": len(pairs), "only_a": sum(1 for r in rows_a if r["status"] == "done") - len(pairs),
            "only_b": sum(1 for r in rows_b if r["status"] == "done") - len(pairs), "metrics": metrics, "items": items,
            "fid": fid}


def format_comparison(comparison: dict, label_a: str, label_b: str) -> str:
    """The comparison as a terminal table (one screen)."""
    lines = [f"A = {label_a}", f"B = {label_b}",
             f"{comparison['pairs']} items in both (only in A: {comparison['only_a']}, only in B: {comparison['only_b']})",
             f"{'metric':<26}{'A mean':>10}{'B mean':>10}{'B - A':>10}{'median':>10}  better (B/A)"]
    for name, entry in comparison["metrics"].items():
        if not entry["count"]:
            continue
        better = "" if entry["b_better"] is None else f"{entry['b_better']}/{entry['a_better']}"
        lines.append(f"{name:<26}{entry['mean_a']:>10.3f}{entry['mean_b']:>10.3f}{entry['mean_diff']:>+10.3f}"
                     f"{entry['median_diff']:>+10.3f}  {better}")
    fid = comparison["fid"]
    if fid["a"] is not None or fid["b"] is not None:
        a, b = ("missing" if value is None else f"{value:.3f}" for value in (fid["a"], fid["b"]))
        diff = "" if fid["diff"] is None else f"{fid['diff']:+.3f}"
        lines.append(f"{'fid (lower is better)':<26}{a:>10}{b:>10}{diff:>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The terminal summary.


def format_summary(summary: dict, uris: dict[str, str]) -> str:
    """One screen: counts, each metric's distribution, FID, what is missing and where the files are."""
    counts = ", ".join(f"{status} {count}" for status, count in sorted(summary["counts"].items()))
    smoke = "  SMOKE RUN (random tiny bundle: the numbers test the pipeline, not a model)" if summary.get("smoke_run") else ""
    lines = [f"eval: {counts} (preset {summary.get('preset') or '-'}, model {summary.get('model_id')}){smoke}",
             f"gray input: {summary['gray_method']} ({summary['gray_method_text']})",
             f"{'metric':<26}{'mean':>9}{'median':>9}{'p5':>9}{'p95':>9}{'n':>5}"]
    for name, stats in summary["metrics"].items():
        if not stats["count"]:
            continue
        unit = METRICS[name][0]
        lines.append(f"{name + (f' ({unit})' if unit else ''):<26}{stats['mean']:>9.3f}{stats['median']:>9.3f}"
                     f"{stats['p5']:>9.3f}{stats['p95']:>9.3f}{stats['count']:>5}")
    if summary.get("fid") is not None:
        note = " (fewer than 2048 images: biased; compare only evals of the same set)" if summary["fid_images"] < 2048 else ""
        lines.append(f"{'fid':<26}{summary['fid']:>9.3f}  over {summary['fid_images']} image pairs{note}")
    lines += list(summary["missing"].values())
    if summary.get("reused_rows"):
        lines.append(f"{summary['reused_rows']} rows reused from an earlier eval (same output, ground truth and settings)")
    lines += [f"report: {uris['report']}", f"table:  {uris['parquet']}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Two evals side by side.


def comparison_png(comparison: dict, label_a: str, label_b: str) -> bytes:
    """Per metric, each item's difference B - A (dots) and their mean (bar), zero marked."""
    names = [name for name, entry in comparison["metrics"].items() if entry["count"]]
    columns = 4
    grid = max(1, math.ceil(len(names) / columns))
    figure = _figure(3.2 * columns, 2.4 * grid)
    figure.suptitle(f"B - A   (A = {label_a},  B = {label_b})", fontsize=9)
    for index, name in enumerate(names):
        axes = figure.add_subplot(grid, columns, index + 1)
        diffs = _finite(item[f"{name}_diff"] for item in comparison["items"])
        axes.axhline(0.0, color="gray", linewidth=1)
        if diffs:
            axes.bar([0], [float(np.mean(diffs))], width=0.6, color="#9bbb59", alpha=0.7)
            spread = np.linspace(-0.2, 0.2, len(diffs)) if len(diffs) > 1 else [0.0]
            axes.scatter(spread, diffs, color="black", s=12, zorder=3)
        higher = METRICS[name][1]
        better = "" if higher is None else (" (up: B better)" if higher else " (down: B better)")
        axes.set_title(f"{name}{better}", fontsize=8)
        axes.set_xticks([])
        axes.tick_params(labelsize=7)
    if not names:
        figure.add_subplot(1, 1, 1).text(0.5, 0.5, "no items in both evals", ha="center")
    return _png(figure)


def write_comparison(comparison: dict, label_a: str, label_b: str, out: str) -> dict[str, str]:
    """Writes ``OUT/compare.png``, ``OUT/compare.html`` and ``OUT/compare.parquet`` (per-item differences).

    Without matplotlib there is no plot: ``uris["plot"]`` is None and the page says why.
    """
    uris = {"plot": None, "report": storage.join(out, "compare.html"), "parquet": storage.join(out, "compare.parquet")}
    plot = None
    if plots_available():
        uris["plot"] = storage.join(out, "compare.png")
        plot = comparison_png(comparison, label_a, label_b)
        storage.write_bytes(uris["plot"], plot)
    page = render_page("eval_compare.html", package="diffcolor.tools", title="DiffColor eval comparison",
                       text=format_comparison(comparison, label_a, label_b),
                       plot=None if plot is None else _data_uri(plot, "png"), plots_missing=PLOTS_MISSING)
    storage.write_bytes(uris["report"], page.encode("utf-8"))
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(comparison["items"]) if comparison["items"] else pa.table({"item_id": pa.array([], pa.string())}),
                   buffer, compression="zstd")
    storage.write_bytes(uris["parquet"], buffer.getvalue())
    return uris
