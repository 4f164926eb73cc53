"""Collection and reprocess flows on a real Prefect server, with the tiny bundle on CPU."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import gray_scene
from PIL import Image

from diffcolor.archive import storage
from diffcolor.archive.results import read_results
from diffcolor.cli import main
from diffcolor.common.record import VersionRecord

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


def test_mixed_manifest_gets_statuses_results_report_and_nonzero_exit(prefect_server, mixed_collection, tmp_path):
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
    # Every field a real run writes is declared in the typed record.
    assert all(set(json.loads(row["record_json"])) <= set(VersionRecord.__annotations__) for row in table)

    # A second run of the same manifest does no fine-tuning at all.
    code = main(["run", str(mixed_collection), "--out", str(out), "--model", "tiny", "--preset", "smoke"])
    assert code == 1  # the corrupt item is still corrupt
    second = read_results(str(_run_dirs(out)[-1] / "results.parquet")).to_pylist()
    by_id = {row["item_id"]: row for row in second}
    assert by_id["good"]["status"] == by_id["good2"]["status"] == "skipped_done"
    assert sum(row["finetune_steps_run"] or 0 for row in second) == 0
    assert json.loads((out / "items" / "good" / "result.json").read_text())["version"] == 1


def _collection(tmp_path, count=3):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rows = []
    for index in range(count):
        Image.fromarray(np.round(gray_scene(48, 64, seed=index) * 255).astype(np.uint8)).save(images / f"p{index}.png")
        rows.append({"item_id": f"p{index}", "image_uri": f"images/p{index}.png", "caption": CAPTION, "seed": index,
                     "accession_number": f"B.{index}"})
    return write_manifest(tmp_path / "manifest.parquet", rows)


def test_two_runs_at_once_do_each_item_once_and_lose_no_record(prefect_server, tmp_path):
    import threading

    from flows.collection import RunOptions, colorize_collection

    manifest, out = _collection(tmp_path), tmp_path / "out"
    states = []

    def start():
        states.append(colorize_collection(str(manifest), str(out), "tiny", RunOptions(preset="smoke", device="cpu"),
                                          return_state=True))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert len(states) == 2 and all(state.is_completed() for state in states)
    runs = [read_results(str(run / "results.parquet")).to_pylist() for run in _run_dirs(out)]
    assert len(runs) == 2
    for item in ("p0", "p1", "p2"):
        rows = [row for run in runs for row in run if row["item_id"] == item]
        assert len(rows) == 2, "each run records every item"
        assert sorted(row["status"] for row in rows) == ["done", "skipped_done"]
        assert sum(1 for row in rows if (row["finetune_steps_run"] or 0) > 0) == 1
        assert [p.name for p in sorted((out / "items" / item / "versions").glob("*.json"))] == ["v0001.json"]
        assert not list((out / "items" / item / "lock").glob("lease-*"))


def test_worker_killed_mid_fit_is_retried_and_ends_identical(prefect_server, models, tmp_path):
    import os
    import signal
    import threading
    import time

    import tifffile

    from diffcolor.archive.manifest import read_items
    from diffcolor.method.presets import apply_overrides, get_preset
    from diffcolor.pipeline import colorize_item
    from flows.collection import RunOptions, colorize_collection
    from flows.runs import live_pools

    manifest = _collection(tmp_path, count=1)
    overrides = {"stage1.steps": 40, "stage1.checkpoints.every": 4}
    options = RunOptions(preset="smoke", device="cpu", overrides=overrides, retry_delay_seconds=[0.5])
    # The uninterrupted reference, computed in this process with the same models and configuration.
    [request] = list(read_items(str(manifest)))
    [expected] = colorize_item(models, request, str(tmp_path / "reference"), apply_overrides(get_preset("smoke"), overrides))

    out = tmp_path / "out"
    killed = []

    def kill_when_a_checkpoint_appears():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            checkpoints = list((out / "items" / "p0" / "checkpoints" / "stage1").glob("step-*.safetensors"))
            pools = live_pools()
            if checkpoints and pools:
                for pid in pools[0].worker_pids():
                    os.kill(pid, signal.SIGKILL)  # a real kill, in the middle of stage 1
                    killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_a_checkpoint_appears)
    killer.start()
    state = colorize_collection(str(manifest), str(out), "tiny", options, return_state=True)
    killer.join()
    assert killed, "the worker was never killed"
    assert state.is_completed()
    [row] = read_results(str(_run_dirs(out)[0] / "results.parquet")).to_pylist()
    assert row["status"] == "done"
    assert 0 < row["finetune_steps_run"] < 40 + 4 + 4, "the retried item resumed from its checkpoint"
    done = json.loads((out / "items" / "p0" / "result.json").read_text())
    assert done["output_sha256"]["state"] == expected["output_sha256"]["state"]
    assert np.array_equal(tifffile.imread(done["outputs"]["master"]), tifffile.imread(expected["outputs"]["master"]))


def test_transient_storage_error_is_retried_and_a_bad_image_is_not(prefect_server, tmp_path, monkeypatch):
    from diffcolor.common.errors import StorageError
    from flows import worker
    from flows.collection import RunOptions, colorize_collection

    manifest = _collection(tmp_path, count=1)
    (tmp_path / "images" / "bad.png").write_bytes(b"not an image at all")
    table = pq.read_table(manifest).to_pylist()
    table.append({"item_id": "bad", "image_uri": "images/bad.png", "caption": CAPTION, "seed": 9, "accession_number": "B.9"})
    write_manifest(manifest, table)

    calls: dict[str, int] = {}
    real_run = worker.run_colorize
    monkeypatch.setattr(worker, "run_colorize", lambda request, *a: (
        calls.__setitem__(request.item_id, calls.get(request.item_id, 0) + 1), real_run(request, *a))[1])
    failures = {"left": 1}
    real_publish = storage.publish_file

    def flaky_publish(uri, local):  # the master is written into a staging file, then published from it
        if uri.endswith("master.tif") and failures["left"]:
            failures["left"] -= 1
            raise StorageError(f"writing '{uri}' failed: 503 Slow Down")
        return real_publish(uri, local)

    monkeypatch.setattr(storage, "publish_file", flaky_publish)
    options = RunOptions(preset="smoke", pool="inline", retry_delay_seconds=[0.2])
    state = colorize_collection(str(manifest), str(tmp_path / "out"), "tiny", options, return_state=True)
    assert state.is_failed()  # the bad image fails the run...
    rows = {row["item_id"]: row for row in read_results(str(_run_dirs(tmp_path / "out")[0] / "results.parquet")).to_pylist()}
    assert failures["left"] == 0 and rows["p0"]["status"] == "done" and calls["p0"] == 2  # ...the blip was retried
    assert rows["bad"]["error_class"] == "bad_image" and calls["bad"] == 1  # ...a bad image never is


def test_the_same_run_against_a_real_s3_api(prefect_server, s3_bucket, tmp_path):
    from flows.collection import RunOptions, colorize_collection

    local = tmp_path / "local"
    local.mkdir()
    manifest = _collection(local, count=2)
    for path in sorted((local / "images").iterdir()):
        storage.write_bytes(f"{s3_bucket}/incoming/images/{path.name}", path.read_bytes())
    storage.write_bytes(f"{s3_bucket}/incoming/manifest.parquet", manifest.read_bytes())

    output = f"{s3_bucket}/archive"
    options = RunOptions(preset="smoke", pool="inline")
    state = colorize_collection(f"{s3_bucket}/incoming/manifest.parquet", output, "tiny", options, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    table = read_results(summary["results"]).to_pylist()
    assert sorted((row["item_id"], row["status"]) for row in table) == [("p0", "done"), ("p1", "done")]
    record = storage.read_json(f"{output}/items/p0/result.json")
    assert record["outputs"]["master"].startswith(f"{s3_bucket}/archive/items/p0/versions/v0001/")
    import hashlib

    assert hashlib.sha256(storage.read_bytes(record["outputs"]["master"])).hexdigest() == record["output_sha256"]["master"]
    assert storage.exists(summary["report"]) and storage.list_files(f"{output}/items/p0/lock") == []
    # The nightly rerun skips both from the done-index, without GPU work.
    again = colorize_collection(f"{s3_bucket}/incoming/manifest.parquet", output, "tiny", options, return_state=True)
    assert {row["status"] for row in read_results(again.result()["results"]).to_pylist()} == {"skipped_done"}
    # Throughput as device time: one device over the two items that did work; nothing for a run of skips.
    assert summary["seconds"]["items"] > 0
    assert summary["device_seconds_per_item"] == pytest.approx(summary["seconds"]["items"] / 2)
    assert again.result()["device_seconds_per_item"] is None


def test_pool_places_workers_round_robin_over_gpus_and_splits_the_cpu(monkeypatch):
    from flows import pool as pool_module

    made = []

    class Recorded:  # a slot that records its placement instead of starting a process
        def __init__(self, index, device, visible, spec, threads, sharing=1, progress=None):
            made.append((index, device, visible, threads, sharing))

    monkeypatch.setattr(pool_module, "_Slot", Recorded)
    monkeypatch.setattr(pool_module, "visible_gpus", lambda: [0, 1])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    spec = pool_module.ModelSpec(model="tiny")
    pool = pool_module.DevicePool(spec, workers_per_device=2)
    assert made == [(0, "cuda", "3", None, 2), (1, "cuda", "5", None, 2), (2, "cuda", "3", None, 2), (3, "cuda", "5", None, 2)]
    assert pool.size == 4 and pool.workers_per_device == 2
    made.clear()
    pool_module.DevicePool(spec, device="cpu", cpu_threads=8, workers_per_device=3)
    assert made == [(i, "cpu", None, 2, 3) for i in range(3)]  # 8 cores over 3 workers: 2 threads each
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers_per_device"):
            pool_module.DevicePool(spec, device="cpu", workers_per_device=bad)


def test_a_ray_task_on_a_gpu_share_counts_the_tasks_sharing_its_gpu(monkeypatch):
    import sys
    import types

    from flows import worker

    context = types.SimpleNamespace(get_node_id=lambda: "node-1", get_assigned_resources=lambda: {"GPU": 0.5, "CPU": 1})
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, get_gpu_ids=lambda: [1],
                                     get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    record = worker.placed({"item_id": "a", "seconds": {"stage1": 3.0, "write": 1.0}})
    assert record["placement"]["ray_gpu_ids"] == [1] and record["placement"]["workers_on_device"] == 2
    assert record["device_seconds"] == 2.0
    context.get_assigned_resources = lambda: {"GPU": 1.0}
    assert worker.placed({"item_id": "a", "seconds": {"stage1": 3.0}})["placement"]["workers_on_device"] == 1


def test_two_workers_share_one_device_and_records_carry_their_share(prefect_server, tmp_path):
    manifest, out = _collection(tmp_path, count=2), tmp_path / "out"
    completed = _diffcolor("run", str(manifest), "--out", str(out), "--model", "tiny", "--preset", "smoke",
                           "--device", "cpu", "--workers-per-device", "2")
    assert completed.returncode == 0, completed.stderr
    assert "device seconds per item:" in completed.stdout
    [run] = _run_dirs(out)
    rows = read_results(str(run / "results.parquet")).to_pylist()
    assert sorted(row["status"] for row in rows) == ["done", "done"]
    placements = [json.loads(row["record_json"])["placement"] for row in rows]
    assert len({where["pid"] for where in placements}) == 2, "each item ran on its own worker"
    assert {where["workers_on_device"] for where in placements} == {2}
    for row in rows:
        assert row["device_seconds"] == pytest.approx(sum(seconds for _, seconds in row["seconds"]) / 2)
        assert row["device_seconds"] > 0
    refused = _diffcolor("run", str(manifest), "--out", str(out), "--model", "tiny", "--workers-per-device", "0")
    assert refused.returncode == 2 and "--workers-per-device" in refused.stderr


def test_reprocess_renders_new_targets_from_colour_states(prefect_server, tmp_path):
    from flows.collection import RunOptions, colorize_collection

    manifest, out = _collection(tmp_path, count=2), tmp_path / "out"
    assert colorize_collection(str(manifest), str(out), "tiny", RunOptions(preset="smoke", pool="inline"),
                               return_state=True).is_completed()
    code = main(["reprocess", str(out), "--items", "p0,p1", "--color-map", '{"dog": "red"}', "--device", "cpu",
                 "--weight-dtype", "bf16",  # the CUDA default's weight storage, through the flow to its workers
                 "--workers-per-device", "2"])
    assert code == 0
    rows = read_results(str(_run_dirs(out)[-1] / "results.parquet")).to_pylist()  # the reprocess run's
    assert sorted((row["version"], json.loads(row["record_json"])["placement"]["workers_on_device"]) for row in rows) == [(2, 2), (2, 2)]
    run = _run_dirs(out)[-1]
    assert {json.loads(row["record_json"])["run_config"] for row in rows} == {str(run / "config.json")}
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "reprocess" and config["models"] == ["tiny"] and config["preset"] == "default"
    for item in ("p0", "p1"):
        record = json.loads((out / "items" / item / "result.json").read_text())
        assert record["version"] == 2 and record["finetune_steps_run"] == 0
        assert record["weight_dtype"] == "bfloat16"
        assert json.loads((out / "items" / item / "versions" / "v0001.json").read_text())["weight_dtype"] == "float32"
        assert record["target_prompt"].startswith("a red dog")
        assert (out / "items" / item / "versions" / "v0001" / "master.tif").exists()


def test_a_run_reads_its_manifest_once_and_records_its_resolved_configuration(prefect_server, tmp_path, monkeypatch):
    from diffcolor.archive import manifest as manifest_module
    from diffcolor.method.presets import apply_overrides, get_preset
    from flows.collection import RunOptions, colorize_collection
    from flows.runs import pipeline_config, read_run_config

    manifest, out = _collection(tmp_path, count=2), tmp_path / "out"
    reads, scans = [], []
    open_source, validate = manifest_module._open_source, manifest_module._validate
    monkeypatch.setattr(manifest_module, "_open_source", lambda uri: reads.append(uri) or open_source(uri))
    monkeypatch.setattr(manifest_module, "_validate", lambda *a, **k: scans.append(1) or validate(*a, **k))
    overrides = {"stage1.steps": 6, "render.alpha": 0.5}
    with pytest.warns(FutureWarning, match="render.eta") as warned:  # a former name: warned of once, applied once
        code = main(["run", str(manifest), "--out", str(out), "--model", "tiny", "--preset", "smoke", "--device", "cpu",
                     "--items", "p0,p1", "--set", "stage1.steps=6", "--set", "render.eta=0.5"])
    assert code == 0
    assert len([w for w in warned if issubclass(w.category, FutureWarning)]) == 1
    # The command line's checks (validation, --items, count) and the flow's plan share one read and one validation.
    assert reads == [str(manifest)] and len(scans) == 1

    [run] = _run_dirs(out)
    config = read_run_config(str(run / "config.json"))
    assert config["preset"] == "smoke" and config["overrides"] == {"stage1.steps": 6, "render.eta": 0.5}
    assert pipeline_config(config) == apply_overrides(get_preset("smoke"), overrides)
    assert config["model"] == "tiny" and len(config["model_hash"]) == 64 and config["software_version"]
    assert config["device"] == "cpu" and config["pool"] == "local" and config["run_id"] == run.name
    first = {row["item_id"]: json.loads(row["record_json"]) for row in read_results(str(run / "results.parquet")).to_pylist()}
    assert {record["status"] for record in first.values()} == {"done"}
    assert {record["run_config"] for record in first.values()} == {str(run / "config.json")}

    # A rerun with the recorded configuration alone (no command line: the flow reads its manifest itself, once)
    # plans the same keys, so every item is found done.
    reads.clear()
    options = RunOptions.model_validate(config["options"])
    state = colorize_collection(config["manifest"], str(out), config["model"], options, return_state=True)
    assert state.is_completed() and reads == [str(manifest)]
    rerun = _run_dirs(out)[-1]
    second = {row["item_id"]: json.loads(row["record_json"]) for row in read_results(str(rerun / "results.parquet")).to_pylist()}
    assert {record["status"] for record in second.values()} == {"skipped_done"}
    assert {item: record["plan_key"] for item, record in second.items()} == \
        {item: record["plan_key"] for item, record in first.items()}
    assert read_run_config(str(rerun / "config.json"))["config"] == config["config"]


def _diffcolor(*args, cwd=None):
    """The installed command in a subprocess, against the session's Prefect server."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    return subprocess.run([sys.executable, "-m", "diffcolor", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def test_run_with_a_missing_model_or_bad_manifest_stops_before_any_item(prefect_server, mixed_collection, tmp_path):
    out = tmp_path / "out"
    missing = _diffcolor("run", str(mixed_collection), "--out", str(out), "--model", str(tmp_path / "no-model"))
    assert missing.returncode == 2 and "no-model' does not exist" in missing.stderr
    bad = write_manifest(tmp_path / "bad.parquet", [
        {"item_id": "../../etc", "image_uri": "x.png", "caption": CAPTION, "seed": 1, "accession_number": "1"},
        {"item_id": "a", "image_uri": "x.png", "caption": " ", "seed": 1, "accession_number": "2"},
    ])
    refused = _diffcolor("run", str(bad), "--out", str(out), "--model", "tiny", "--preset", "smoke")
    # Every problem, one line each, as `manifest validate` lists them; no flow started, so no Prefect traceback.
    lines = refused.stdout.splitlines()
    assert refused.returncode == 1 and "Traceback" not in refused.stdout + refused.stderr
    assert [line.split(",")[0] for line in lines[:-1]] == ["row 1", "row 2"] and "'../../etc'" in lines[0]
    assert lines[-1].endswith("nothing run: 2 problem(s) in '" + str(bad) + "'")
    assert not out.exists() and "Beginning flow run" not in refused.stderr
