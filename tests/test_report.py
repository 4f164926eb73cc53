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
    assert "done: 10 · failed: 2" in html
    # median, p5, p95 and max of 0.0, 0.1, ..., 0.9 over all ten done items, not the three shown
    assert "<tr><td>max_delta_l</td><td>10</td><td>0.450</td><td>0.045</td><td>0.855</td><td>0.900</td></tr>" in html
    assert "<tr><td>device_seconds</td><td>10</td><td>4.500</td>" in html
    assert "7 more done items are in results.parquet" in html
    assert html.count("thumbnail unavailable") == 3 and html.count("truncated") == 2
    spool.close()
