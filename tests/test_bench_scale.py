"""The bench of the large-scan and curator-loop goals: it runs the benches it names and reports each figure
against its goal, in JSON too; a bench that fails is named and makes the exit status non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(tmp_path, *arguments: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict | None]:
    report = tmp_path / "bench-scale.json"
    environment = {**os.environ, "PYTHONPATH": ROOT, "DIFFCOLOR_CACHE": os.environ.get("DIFFCOLOR_CACHE", "")}
    if not environment["DIFFCOLOR_CACHE"]:
        environment.pop("DIFFCOLOR_CACHE")
    done = subprocess.run([sys.executable, "-m", "diffcolor.tools.bench_scale", *arguments, "--json", str(report)],
                          cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=timeout)
    return done, (json.loads(report.read_text()) if report.is_file() else None)


def test_the_merge_part_reports_its_ratio_against_the_goal(tmp_path):
    done, report = _bench(tmp_path, "--only", "merge", "--megapixels", "0.25")
    assert done.returncode == 0, done.stderr[-2000:]
    [figure] = report["figures"]
    merge = report["parts"]["merge"]
    assert figure["part"] == "merge" and figure["goal"] == 1.5 and figure["unit"] == "x"
    assert figure["value"] == pytest.approx(merge["merge_best_s"] / merge["rgb2lab_best_s"])
    assert figure["met"] == (figure["value"] <= 1.5)
    assert report["failed"] == [] and "merge of 0 Mpx over rgb2lab" in done.stdout  # the table printed


def test_a_part_that_fails_is_named_and_fails_the_bench(tmp_path):
    # The review bench cannot generate its records where a file lies: its part fails, the merge part reports.
    (tmp_path / "a-file").write_text("not a folder")
    done, report = _bench(tmp_path, "--only", "merge,review", "--megapixels", "0.25", "--items", "1000",
                          "--review-output", str(tmp_path / "a-file"))
    assert done.returncode == 1
    assert report["failed"] == ["review"] and [figure["part"] for figure in report["figures"]] == ["merge"]
    assert "review: the bench failed" in done.stdout


def test_unknown_parts_are_refused_in_one_line(tmp_path):
    done, report = _bench(tmp_path, "--only", "merge,speed")
    assert done.returncode == 2 and report is None
    assert "--only takes parts among merge, scan, recolor, review" in done.stderr


@pytest.mark.slow
def test_every_part_at_small_sizes(tmp_path):
    done, report = _bench(tmp_path, "--megapixels", "2", "--large", "4", "--repeats", "1", "--items", "5000",
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = {figure["part"] for figure in report["figures"]}
    assert parts == {"merge", "scan", "recolor", "review"}
    assert all(figure["value"] is not None and figure["value"] > 0 for figure in report["figures"])
    names = [figure["figure"] for figure in report["figures"]]
    assert "recolor of 2 Mpx over a 512 px photograph" in names and "colorize of 4 Mpx, peak RSS" in names
    goals = {figure["figure"]: figure["goal"] for figure in report["figures"]}
    assert goals["recolor of 2 Mpx over a 512 px photograph"] == 2.0
    assert goals["recolor of 4 Mpx, peak RSS"] == 1.5 and goals["second recolour from the review API over the first"] == 0.2
    assert any(name.startswith("review first page at 5,000 records") for name in names)
