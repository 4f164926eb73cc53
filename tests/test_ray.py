"""Ray mode: the collection flow on a local Ray cluster that declares two GPUs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gray_scene
from PIL import Image
from test_flows import CAPTION, _run_dirs, write_manifest

from diffcolor.archive.results import read_results

ray = pytest.importorskip("ray", reason="Ray mode needs the ray extra: pip install -e '.[ray]'")


def test_two_concurrent_items_run_on_different_gpu_slots(prefect_server, tmp_path):
    from flows.collection import RunOptions, colorize_collection, ray_runner

    (tmp_path / "images").mkdir()
    rows = []
    for index in range(2):
        Image.fromarray(np.round(gray_scene(48, 64, seed=index) * 255).astype(np.uint8)).save(tmp_path / "images" / f"r{index}.png")
        rows.append({"item_id": f"r{index}", "image_uri": f"images/r{index}.png", "caption": CAPTION, "seed": index,
                     "accession_number": f"R.{index}"})
    manifest = write_manifest(tmp_path / "manifest.parquet", rows)

    # A local Ray cluster on this CPU machine that declares two GPU resources.
    runner = ray_runner(init_kwargs={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False})
    flow = colorize_collection.with_options(task_runner=runner)
    state = flow(str(manifest), str(tmp_path / "out"), "tiny", RunOptions(preset="smoke", pool="ray"), return_state=True)
    assert state.is_completed(), state.message

    rows = read_results(str(_run_dirs(tmp_path / "out")[0] / "results.parquet")).to_pylist()
    import json

    placements = [json.loads(row["record_json"])["placement"] for row in rows]
    assert [row["status"] for row in rows] == ["done", "done"]
    assert sorted(gpu for where in placements for gpu in where["ray_gpu_ids"]) == [0, 1]
    assert {where["cuda_visible_devices"] for where in placements} == {"0", "1"}
