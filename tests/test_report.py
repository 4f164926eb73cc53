"""The run report's counts and distributions cover the whole run, not only the rows it shows."""

from __future__ import annotations

from diffcolor.archive.report import render_report
from diffcolor.archive.results import RecordSpool


def test_counts_and_distributions_cover_every_record_beyond_the_rows_shown(tmp_path):
    spool = RecordSpool(keep_head=3)
    for index in range(10):
        spool.add({"item_id": f"i{index}", "status": "done", "version": 1, "max_delta_l": index / 10,
                   "device_seconds": float(index), "outputs": {"access": str(tmp_path / "missing.jpg")}})
    for index in range(2):
        spool.add({"item_id": f"bad{index}", "status": "failed", "error_class": "bad_image", "error_message": "truncated"})
    shown = spool.head + spool.failures

    html = render_report(shown, run_id="r", all_records=spool)
    assert "12 items: done 10, failed 2; 10 new versions written" in html
    # median, p5, p95 and max of 0.0, 0.1, ..., 0.9 over all ten done items, not the three shown
    assert "<td>10</td><td>0.450</td><td>0.045</td><td>0.855</td><td>0.900</td></tr>" in html  # max_delta_l
    assert "in this run</td><td>10</td><td>4.500</td>" in html  # device_seconds
    assert "7 more done items are in results.parquet" in html
    assert html.count("thumbnail unavailable") == 3 and html.count("truncated") == 2
    spool.close()


def _done(item_id: str, root, **fields) -> dict:
    prefix = f"{root}/items/{item_id}"
    record = {"item_id": item_id, "status": "done", "version": 2, "caption": "a dog on a bench", "max_delta_l": 0.2,
              "outputs": {"master": f"{prefix}/versions/v0002/master.tif", "access": f"{prefix}/versions/v0002/access.jpg",
                          "state": f"{prefix}/state/color-state.safetensors"},
              "catalogue": {"rights": "CC0", "accession_number": "1921.4.7", "title": "Dog on a <bench>", "photographer": "A. N."}}
    record.update(fields)
    return record


def test_report_shows_catalogue_fields_explained_metrics_file_links_and_skipped_items(tmp_path):
    root = str(tmp_path / "out")
    records = [_done("dog", root), dict(_done("cat", root), status="skipped_done", version=1)]
    html = render_report(records, run_id="r", report_uri=f"{root}/runs/r/report.html")

    # Catalogue fields, the usual ones first and escaped.
    assert "title: Dog on a &lt;bench&gt;</small><br><small>accession number: 1921.4.7" in html
    assert "rights: CC0</small><br><small>photographer: A. N." in html
    # Every metric shown is explained.
    assert "<td>max_delta_l</td><td>CIE L*, 0 to 100</td><td class=explain>largest change of lightness" in html
    # Links relative to the report: they work on disk and in a copied or served output folder.
    assert '<a href="../../items/dog/versions/v0002/master.tif">master</a>' in html
    assert '<a href="../../items/dog/state/color-state.safetensors">state</a>' in html
    assert '<a href="../../items/dog/versions/v0002.json">record</a>' in html
    # The skipped item is listed; no failures table when nothing failed.
    assert "<h2>Skipped: already done" in html and "<td>cat</td><td>v1</td>" in html
    assert "<h2>Failures" not in html and "id=failures" not in html


def test_links_on_object_storage_stay_inside_the_bucket():
    record = _done("dog", "s3://museum/out")
    html = render_report([record], run_id="r", report_uri="s3://museum/out/runs/r/report.html")
    assert '<a href="../../items/dog/versions/v0002/access.jpg">access</a>' in html
    other = dict(record, outputs={"master": "s3://elsewhere/m.tif"})
    assert "elsewhere" not in render_report([other], run_id="r", report_uri="s3://museum/out/runs/r/report.html")


def test_the_top_names_the_model_preset_date_code_version_and_a_smoke_run(tmp_path):
    from diffcolor import __version__

    records = [_done("dog", tmp_path, model_id="/models/sd15", model_hash="sha256:" + "ab" * 32, preset="paper-scale",
                     software_version=__version__, smoke_run=True, created_at="2026-12-07T03:50:09+00:00"),
               dict(_done("cat", tmp_path), status="skipped_done", version=1)]
    html = render_report(records, run_id="20261207T035003Z-0a1b2c")
    header = html[html.index("<table id=header>"):html.index("</table>", html.index("<table id=header>"))]
    assert "/models/sd15 <small>hash <code>sha256:" + "ab" * 32 + "</code>" in header
    assert "<th>preset</th><td>paper-scale</td>" in header
    assert "<th>started</th><td>2026-12-07 03:50:03 UTC</td>" in header
    assert f"<th>code</th><td>diffcolor-archive {__version__}" in header
    assert "SMOKE RUN" in html

    # A run id of another shape dates the run by its first record; an unknown model says so.
    other = render_report([dict(records[0], model_id=None)], run_id="my-run", smoke=False)
    assert "<th>started</th><td>2026-12-07 03:50:09 UTC</td>" in other and "<th>model</th><td>–</td>" in other
    assert "SMOKE RUN" not in other


def test_the_code_version_names_the_git_commit_of_a_checkout():
    import subprocess
    from pathlib import Path

    from diffcolor.archive.report import code_version

    checkout = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True)
    version = code_version([{"software_version": "9.9"}])
    assert version.startswith("diffcolor-archive 9.9")
    if checkout.returncode == 0:  # a source checkout (an sdist has no .git)
        assert version.endswith(f"(git {checkout.stdout.strip()})")
