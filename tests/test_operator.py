"""What an operator sees: notices, counts, progress, files and refusals, through the real command line."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_flows import _diffcolor

from diffcolor.cli import SMOKE_BANNER, main
from flows.progress import LogDisplay, TerminalDisplay, make_display

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "manifests" / "demo.parquet"


def _empty_folders(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_dir() and not any(path.iterdir())]


def test_a_collection_run_and_its_rerun_as_an_operator_sees_them(prefect_server, tmp_path):
    # A relative --out, as people type it; the demo's six photographs, one with two targets.
    first = _diffcolor("run", str(DEMO), "--out", "out", "--model", "tiny", "--preset", "smoke", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    [run] = sorted((out / "runs").iterdir())

    # The smoke notice, before and after; items and versions counted apart, the same in every place.
    assert first.stderr.count(SMOKE_BANNER) == 1 and SMOKE_BANNER in first.stdout
    counts = "6 items: done 6; 7 new versions written"
    assert f"run {run.name}: {counts}" in first.stdout
    assert counts in (run / "report.html").read_text()
    # Plain progress lines (stderr is not a terminal): one per item, all of an item's versions on it.
    progress = re.findall(r"\[(\d)/6\] (\w+) ([^·]+) ·", first.stderr)
    assert [n for n, _, _ in progress] == ["1", "2", "3", "4", "5", "6"]  # items in the order they ended
    assert sorted(item for _, item, _ in progress) == ["astronaut", "camera", "chelsea", "coffee", "coins", "rocket"]
    assert dict((item, outcome.strip()) for _, item, outcome in progress)["astronaut"] == "done v1, v2"

    # The flow run is named with the run id, so the Prefect UI lists runs by the id the folders carry.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        named = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run.name])))
    assert [flow_run.name for flow_run in named] == [run.name]

    # Every URI in the records is absolute, sources and outputs alike; no empty folder is left behind.
    for result in (out / "items").glob("*/result.json"):
        record = json.loads(result.read_text())
        uris = [record["source_uri"], *record["outputs"].values()]
        assert all(os.path.isabs(uri) and os.path.exists(uri) for uri in uris), uris
    assert _empty_folders(out) == []

    # results.csv beside results.parquet, row for row.
    table = pq.read_table(run / "results.parquet")
    rows = list(csv.DictReader(io.StringIO((run / "results.csv").read_text(encoding="utf-8-sig"))))
    assert [row["item_id"] for row in rows] == table.column("item_id").to_pylist() and len(rows) == 7

    # The rerun skips everything, says so, and is still a smoke run in the terminal and the report.
    second = _diffcolor("run", str(DEMO), "--out", "out", "--model", "tiny", "--preset", "smoke", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    rerun = sorted((out / "runs").iterdir())[-1]
    assert "6 items: skipped (already done) 6; 0 new versions written" in second.stdout
    assert SMOKE_BANNER in second.stderr and "SMOKE RUN" in (rerun / "report.html").read_text()
    assert "<h2>Skipped: already done" in (rerun / "report.html").read_text()
    # The done-index names the version each item's result.json names, after the skip-only run too.
    from diffcolor.archive.planning import read_done_index

    for item, entry in read_done_index(str(out)).items():
        assert entry.version == json.loads((out / "items" / item / "result.json").read_text())["version"], item
    assert _empty_folders(out) == []


# ---------------------------------------------------------------------------
# Refusals before any model loads.


@pytest.mark.parametrize("caption, color_map, message", [
    ("a dog on a bench", "{dog: brown}", "--color-map is not valid JSON"),
    ("a dog on a bench", '{"cat": "brown"}', "colour map key 'cat' is not a content word of the caption"),
    ("the of and", None, "has no content word"),
])
def test_colorize_refuses_bad_arguments_before_loading_models(tmp_path, gray_png, capsys, monkeypatch, caption,
                                                             color_map, message):
    import diffcolor.cli as cli

    monkeypatch.setattr(cli, "_load_models", lambda *_: pytest.fail("models loaded for refused arguments"))
    command = ["colorize", str(gray_png), "--caption", caption, "--out", str(tmp_path / "o"), "--model", "tiny"]
    assert main(command + (["--color-map", color_map] if color_map else [])) == 2
    assert message in capsys.readouterr().err
    missing = main(["colorize", str(tmp_path / "nowhere.tif"), "--caption", "a dog", "--out", str(tmp_path / "o"),
                    "--model", "tiny"])
    assert missing == 2 and "nowhere.tif' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# The two progress displays.


def _records(item: str, *versions: int, status: str = "done") -> list[dict]:
    if status != "done":
        return [{"item_id": item, "status": status, "error_class": "bad_image", "error_message": "truncated"}]
    return [{"item_id": item, "status": "done", "version": v} for v in versions]


def test_log_lines_name_each_item_its_outcome_the_rate_and_the_time_left():
    stream = io.StringIO()
    display = make_display(stream)
    assert isinstance(display, LogDisplay)
    display.start("r1", 3)
    display.stage("a", "stage1", 1, 4)  # steps are not logged
    display.item(1, 3, _records("a", 1, 2))
    display.item(2, 3, _records("b", status="failed"))
    display.item(3, 3, [{"item_id": "c", "status": "skipped_done", "version": 1}])
    lines = stream.getvalue().splitlines()
    assert lines[0] == "run r1: 3 items to go through"
    assert re.fullmatch(r"\[1/3\] a done v1, v2 · [\d.]+ items/s · \d+s left", lines[1])
    assert lines[2].startswith("[2/3] b failed: bad_image truncated ·")
    assert lines[3].startswith("[3/3] c skipped (already done) ·") and len(lines) == 4


def test_a_large_run_logs_about_once_a_percent_but_every_failure():
    stream = io.StringIO()
    display = LogDisplay(stream)
    display.start("r", 10_000)
    for done in range(1, 10_001):
        display.item(done, 10_000, _records(f"i{done}", status="failed" if done == 5 else "done", *(1,)))
    lines = stream.getvalue().splitlines()[1:]
    assert 2 <= len(lines) <= 102 and any(line.startswith("[5/10000] i5 failed") for line in lines)
    assert lines[-1].startswith("[10000/10000]")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_run_bar_and_one_bar_per_item_under_way():
    stream = _Terminal()
    display = make_display(stream)
    assert isinstance(display, TerminalDisplay)
    display.start("r1", 2)
    display.stage("camera", "finetune", 3, 4)
    assert [task.description for task in display.progress.tasks] == ["run r1", "  camera: fine-tune"]
    assert display.progress.tasks[1].completed == 3 and display.progress.tasks[1].total == 4
    display.item(1, 2, _records("camera", 1))
    display.item(2, 2, _records("coins", status="failed"))
    assert [task.description for task in display.progress.tasks] == ["run r1"]
    assert display.progress.tasks[0].completed == 2
    display.close()
    shown = stream.getvalue()
    assert "coins: failed: bad_image truncated" in shown and "2/2" in shown
