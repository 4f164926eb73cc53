"""Collection and reprocess flows on a real Prefect server, with the tiny bundle on CPU."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffcolor import storage
from diffcolor.results import read_results
from flows.cli import main

from conftest import gray_scene

CAPTION = "a dog sitting on a wooden bench"


def write_manifest(path, rows):
    table = pa.Table.from_pylist(rows, schema=pa.schema([("item_id", pa.string()), ("image_uri", pa.string()),
                                                        ("caption", pa.string()), ("seed", pa.int64()),
                                                        ("accession_number", pa.string())]))
    pq.write_table(table, path)
    return path


@pytest.fixture
def mixed_collection(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.round(gray_scene(48, 64) * 255).astype(np.uint8)).save(images / "good.png")
    Image.fromarray(np.round(gray_scene(64, 48, seed=1) * 255).astype(np.uint8)).save(images / "good2.png")
    ys, xs = np.mgrid[0:48, 0:64]
    Image.fromarray(np.stack([xs * 4, ys * 5, 255 - xs * 3], -1).astype(np.uint8)).save(images / "colour.png")
    (images / "corrupt.png").write_bytes((images / "good.png").read_bytes()[:120])
    rows = [
        {"item_id": "good", "image_uri": "images/good.png", "caption": CAPTION, "seed": 1, "accession_number": "A.1"},
        {"item_id": "colour", "image_uri": "images/colour.png", "caption": CAPTION, "seed": 2, "accession_number": "A.2"},
        {"item_id": "corrupt", "image_uri": "images/corrupt.png", "caption": CAPTION, "seed": 3, "accession_number": "A.3"},
        {"item_id": "good2", "image_uri": "images/good2.png", "caption": "a cat on a chair", "seed": 4, "accession_number": "A.4"},
    ]
    return write_manifest(tmp_path / "manifest.parquet", rows)


def _run_dirs(out):
    return sorted(p for p in (out / "runs").iterdir())


def test_mixed_manifest_gets_statuses_results_report_and_nonzero_exit(prefect_server, mixed_collection, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(mixed_collection), "--out", str(out), "--model", "tiny", "--preset", "smoke"])
    assert code == 1
    [run] = _run_dirs(out)
    table = read_results(str(run / "results.parquet")).to_pylist()
    statuses = {row["item_id"]: (row["status"], row["error_class"]) for row in table}
    assert statuses == {"good": ("done", None), "good2": ("done", None), "colour": ("not_grayscale", "not_grayscale"),
                        "corrupt": ("failed", "bad_image")}
    report = (run / "report.html").read_text()
    assert "corrupt.png" in report and "SMOKE RUN" in report and report.count("data:image/jpeg;base64") == 4
    good = json.loads((out / "items" / "good" / "result.json").read_text())
    assert good["catalogue"]["accession_number"] == "A.1" and good["finetune_steps_run"] > 0
    printed = capsys.readouterr().out
    assert "failed 1" in printed and "corrupt" in printed

    # A second run of the same manifest does no fine-tuning at all.
    code = main(["run", str(mixed_collection), "--out", str(out), "--model", "tiny", "--preset", "smoke"])
    assert code == 1  # the corrupt item is still corrupt
    second = read_results(str(_run_dirs(out)[-1] / "results.parquet")).to_pylist()
    by_id = {row["item_id"]: row for row in second}
    assert by_id["good"]["status"] == by_id["good2"]["status"] == "skipped_done"
    assert sum(row["finetune_steps_run"] or 0 for row in second) == 0
    assert json.loads((out / "items" / "good" / "result.json").read_text())["version"] == 1
