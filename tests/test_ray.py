"""Ray mode: the collection flow on a local Ray cluster that declares two GPUs, writing to a real S3 API."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import gray_scene
from PIL import Image
from test_flows import CAPTION, write_manifest

from diffcolor.archive import storage
from diffcolor.archive.results import read_results

ray = pytest.importorskip("ray", reason="Ray mode needs the ray extra: pip install -e '.[ray]'")


def test_two_ray_workers_on_s3_fit_each_item_once_on_different_gpu_slots(prefect_server, s3_bucket, tmp_path):
    from flows.collection import RunOptions, colorize_collection, ray_runner

    rows = []
    for index in range(3):
        buffer = io.BytesIO()
        Image.fromarray(np.round(gray_scene(48, 64, seed=index) * 255).astype(np.uint8)).save(buffer, format="PNG")
        storage.write_bytes(f"{s3_bucket}/incoming/r{index}.png", buffer.getvalue())
        rows.append({"item_id": f"r{index}", "image_uri": f"{s3_bucket}/incoming/r{index}.png", "caption": CAPTION,
                     "seed": index, "accession_number": f"R.{index}"})
    manifest = write_manifest(tmp_path / "manifest.parquet", rows)
    output = f"{s3_bucket}/archive"

    # A local Ray cluster on this CPU machine that declares two GPU resources: two item tasks at once.
    runner = ray_runner(init_kwargs={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False})
    flow = colorize_collection.with_options(task_runner=runner)
    state = flow(str(manifest), output, "tiny", RunOptions(preset="smoke", pool="ray"), return_state=True)
    assert state.is_completed(), state.message

    summary = state.result()
    records = read_results(summary["results"]).to_pylist()
    assert sorted((row["item_id"], row["status"]) for row in records) == [("r0", "done"), ("r1", "done"), ("r2", "done")]
    assert all(row["finetune_steps_run"] > 0 for row in records)  # each fitted, once: one record per item
    placements = [json.loads(row["record_json"])["placement"] for row in records]
    assert {gpu for where in placements for gpu in where["ray_gpu_ids"]} == {0, 1}
    assert {where["cuda_visible_devices"] for where in placements} == {"0", "1"}
    for index in range(3):
        prefix = f"{output}/items/r{index}"
        assert storage.list_files(f"{prefix}/versions") == [f"{prefix}/versions/v0001.json"]
        assert storage.read_json(f"{prefix}/result.json")["status"] == "done"
        assert storage.list_files(f"{prefix}/lock") == []
