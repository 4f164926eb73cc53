"""A run delivered as a BagIt bag: complete, checked against the records, valid."""

from __future__ import annotations

import bagit
import pytest

from diffcolor.archive.bag import BagError, write_bag
from diffcolor.archive.layout import OutputLayout
from diffcolor.archive.report import write_report
from diffcolor.archive.results import write_results
from diffcolor.cli import main
from diffcolor.common.items import ItemRequest
from diffcolor.pipeline import colorize_item


@pytest.fixture
def run_output(models, smoke, tmp_path, gray_png):
    """An output with one run: an item of two versions, a failed item, the run's results and report."""
    out = str(tmp_path / "out")
    records = colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption="a dog on a bench",
                                                targets=("a brown dog on a bench",), color_map={"bench": "green"}),
                            f"{out}/items/bench", smoke)
    records.append({"item_id": "broken", "status": "failed", "error_class": "bad_image", "error_message": "truncated"})
    write_results(records, OutputLayout(out).run("r1").results)
    write_report(records, OutputLayout(out).run("r1").report, run_id="r1")
    return out, records


def test_a_run_becomes_a_valid_bag_mirroring_the_archive(run_output, tmp_path, capsys):
    out, records = run_output
    assert main(["bag", out, "--run", "r1", "-o", str(tmp_path / "bag"), "--organization", "Test Museum"]) == 0
    assert "2 versions" in capsys.readouterr().out
    bag = bagit.Bag(str(tmp_path / "bag"))
    bag.validate()  # raises when any file is missing or changed
    assert set(bag.algorithms) == {"sha256", "sha512"} and bag.info["Source-Organization"] == "Test Museum"
    delivered = set(bag.payload_files())
    for record in records[:2]:
        version = f"items/bench/versions/v{record['version']:04d}"
        assert {f"data/{version}/master.tif", f"data/{version}/access.jpg", f"data/{version}.json"} <= delivered
    assert {"data/runs/r1/results.parquet", "data/runs/r1/results.csv", "data/runs/r1/report.html"} <= delivered
    assert not any("state" in path or path.endswith(".png") for path in delivered)  # no colour state, no source

    # The check a receiving system runs does fail on a changed file.
    (tmp_path / "bag" / "data" / "items" / "bench" / "versions" / "v0001" / "master.tif").write_bytes(b"changed")
    with pytest.raises(bagit.BagValidationError):
        bagit.Bag(str(tmp_path / "bag")).validate()


def test_a_changed_derivative_or_a_used_folder_is_refused(run_output, tmp_path):
    out, records = run_output
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    with pytest.raises(BagError, match="is not empty"):
        write_bag(out, "r1", used)
    with open(records[0]["outputs"]["access"], "ab") as access:
        access.write(b"\0")
    with pytest.raises(BagError, match="differs from the sha256 its record names"):
        write_bag(out, "r1", tmp_path / "bag")
    with pytest.raises(BagError, match="has no results"):
        write_bag(out, "no-such-run", tmp_path / "other")
