"""Planning as plain functions: plan keys, the done-index, windows, preset overrides."""

from __future__ import annotations

import pytest
from s3server import s3_bucket, s3_endpoint  # noqa: F401 (fixtures)

from diffcolor.archive.layout import OutputLayout
from diffcolor.archive.planning import plan_items, read_done_index, update_done_index
from diffcolor.common.items import ItemRequest
from diffcolor.common.keys import config_hash, plan_key
from diffcolor.method.presets import apply_overrides, get_preset


def _requests(count):
    return [ItemRequest(item_id=f"i{n}", source_uri=f"s3://b/{n}.tif", caption="a dog on a bench", seed=n)
            for n in range(count)]


def test_done_items_are_skipped_and_changed_ones_are_not(tmp_path):
    output = str(tmp_path / "out")
    key = config_hash(get_preset("smoke").to_dict())
    requests = _requests(4)
    update_done_index(output, [(r.item_id, plan_key(r, key, "m"), "done", 1) for r in requests[:3]])
    update_done_index(output, [("i2", plan_key(requests[2], key, "m"), "failed", None)])  # newest entry wins
    changed = ItemRequest(item_id="i1", source_uri="s3://b/1.tif", caption="a red dog on a bench", seed=1)
    planned = list(plan_items([requests[0], changed, requests[2], requests[3]], read_done_index(output),
                              config_hash=key, model_hash="m"))
    assert [p.skip for p in planned] == [True, False, False, False]
    # Another model or configuration makes every key new; force redoes done items.
    assert not any(p.skip for p in plan_items(requests, read_done_index(output), config_hash=key, model_hash="other"))
    assert not any(p.skip for p in plan_items(requests, read_done_index(output), config_hash=key, model_hash="m", force=True))


_RUNS = """
import os, sys, time
from diffcolor.archive import planning
from diffcolor.archive.planning import update_done_index
output, markers, first, count, per_run = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
merge = planning._latest_entries

def compacting(*args):  # runs under the index's lease: two at once is an overlap of compactions
    marker = os.path.join(markers, "compacting")
    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    time.sleep(0.05)
    try:
        return merge(*args)
    finally:
        os.unlink(marker)

planning._latest_entries = compacting
open(os.path.join(markers, f"ready-{os.getpid()}"), "w").close()
while not os.path.exists(os.path.join(markers, "go")):
    time.sleep(0.01)
for number in range(first, first + count):
    update_done_index(output, [(f"r{number}-i{n}", f"key-{number}-{n}", "done", 1) for n in range(per_run)],
                      run_id=f"run-{number:03d}")
"""


@pytest.mark.parametrize("store", ["local", "s3"])
def test_runs_updating_the_index_at_once_lose_no_entry_through_compactions(tmp_path, request, store):
    import subprocess
    import sys
    import time

    from diffcolor.archive import planning, storage

    output = str(tmp_path / "out") if store == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    # 20 runs in 4 worker processes, started at once: enough shards for several compactions, some at once.
    processes, runs_each, per_run = 4, 5, 5
    earlier = planning.COMPACT_AFTER_SHARDS  # runs that finished before: each worker's first run compacts, all at once
    for number in range(earlier):
        update_done_index(output, [(f"e{number}", f"key-e{number}", "done", 1)], run_id=f"earlier-{number:03d}")
    markers = tmp_path / "markers"
    markers.mkdir()
    workers = [subprocess.Popen([sys.executable, "-c", _RUNS, output, str(markers), str(number * runs_each),
                                 str(runs_each), str(per_run)], stderr=subprocess.PIPE, text=True)
               for number in range(processes)]
    deadline = time.monotonic() + 120
    while len(list(markers.glob("ready-*"))) < processes and time.monotonic() < deadline:
        time.sleep(0.05)
    (markers / "go").touch()
    errors = [worker.communicate(timeout=300)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * processes, "\n".join(errors)
    done = read_done_index(output)
    assert len(done) == processes * runs_each * per_run + earlier and done["r7-i3"] == ("key-7-3", 1)
    assert storage.exists(OutputLayout(output).index_table)  # compactions happened under the load
    assert storage.list_files(f"{output}/index/lock") == []
    assert planning.compact_done_index(output)  # one more folds every shard left, losing nothing
    assert storage.list_files(f"{output}/index/runs") == [] and read_done_index(output) == done


def test_a_compaction_that_lost_the_index_lease_writes_no_index(tmp_path, monkeypatch):
    from diffcolor.archive import leases, planning, storage

    output = str(tmp_path / "out")
    for number in range(3):
        update_done_index(output, [(f"i{number}", f"key-{number}", "done", 1)], run_id=f"run-{number}")

    def lost(self, *_):
        raise leases.LeaseLostError("lease lost: taken over (injected)")

    monkeypatch.setattr(leases.Lease, "check", lost)
    assert planning.compact_done_index(output) is False
    assert not storage.exists(OutputLayout(output).index_table)
    assert len(storage.list_files(OutputLayout(output).index_shards)) == 3
    assert storage.list_files(f"{output}/index/lock") == [] and len(read_done_index(output)) == 3


def test_planning_streams_and_submission_is_windowed(monkeypatch):
    import itertools
    from concurrent.futures import Future

    from diffcolor.archive import planning
    from flows import collection

    pulled = []

    def stream():
        for request in _requests(10_000):
            pulled.append(request.item_id)
            yield request

    planned = plan_items(stream(), {}, config_hash="c", model_hash="m")
    assert len(list(itertools.islice(planned, 16))) == 16 and len(pulled) == planning.PLAN_BATCH  # one batch read ahead

    # run_items never holds more than `window` submitted items, however long the manifest.
    in_flight, peak = set(), [0]

    class FakeTask:
        def with_options(self, **_):
            return self

        def submit(self, run_id, spec, request, *rest):
            future = Future()
            future.set_result([{"item_id": request.item_id, "status": "done"}])
            in_flight.add(future)
            peak[0] = max(peak[0], len(in_flight))
            return future

    def as_completed(futures):
        for future in futures:
            in_flight.discard(future)
            yield future

    monkeypatch.setattr(collection, "colorize_item_task", FakeTask())
    monkeypatch.setattr(collection, "as_completed", as_completed)
    seen = []
    collection.run_items("run", None, plan_items(stream(), {}, config_hash="c", model_hash="m"), "out", {}, "smoke",
                         window=8, retries=0, retry_delays=[], on_record=seen.append)
    assert len(seen) == 10_000 and peak[0] <= 8


def test_overrides_change_nested_fields_and_name_unknown_ones():
    config = apply_overrides(get_preset("smoke"), {"stage1.steps": 40, "stage1.checkpoints.every": 4, "render.alpha": 0.5})
    assert config.stage1.steps == 40 and config.stage1.checkpoints.every == 4 and config.render.alpha == 0.5
    assert get_preset("smoke").stage1.steps == 4  # presets are not modified
    with pytest.raises(ValueError, match="'stage1.nope'"):
        apply_overrides(config, {"stage1.nope": 1})


def _archive_item(output: str, item_id: str, version: int = 1) -> None:
    """The objects a done item's plan check looks for (empty files: the plan lists, it never reads)."""
    from diffcolor.archive import storage

    prefix = f"{output}/items/{item_id}"
    for name in ("result.json", f"versions/v{version:04d}.json", f"versions/v{version:04d}/master.tif",
                 f"versions/v{version:04d}/access.jpg", "state/color-state.safetensors"):
        storage.write_bytes(f"{prefix}/{name}", b"{}")


@pytest.mark.parametrize("store", ["local", "s3"])
def test_done_items_missing_from_the_archive_are_found_by_listing_and_not_skipped(tmp_path, request, store,
                                                                                  monkeypatch):
    from diffcolor.archive import planning, storage
    from diffcolor.archive.planning import missing_done_items

    output = str(tmp_path / "out") if store == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    monkeypatch.setattr(planning, "LIST_SHARD_ITEMS", 3)  # S3: several listing ranges, listed in parallel
    ids = ["a", "a-b", "a.b", "b", "c", "d", "e", "f", "g", "h", "i"]  # '-' and '.' sort before '/'
    for item in ids:
        _archive_item(output, item)
    _archive_item(output, "not-in-index")
    storage.write_bytes(f"{output}/items/b/versions/v0001/access.png", b"png")
    storage.remove(f"{output}/items/b/versions/v0001/access.jpg")  # an access copy in another format counts
    update_done_index(output, [(item, f"k-{item}", "done", 1) for item in ids])
    done = read_done_index(output)
    assert missing_done_items(output, done) == set()

    storage.remove(f"{output}/items/a/result.json")
    storage.remove(f"{output}/items/a.b/versions/v0001/access.jpg")
    storage.remove(f"{output}/items/e/versions/v0001/master.tif")
    storage.remove(f"{output}/items/g/versions/v0001.json")
    for name in ("result.json", "versions/v0001.json", "versions/v0001/master.tif", "versions/v0001/access.jpg",
                 "state/color-state.safetensors"):
        storage.remove(f"{output}/items/i/{name}")  # the whole folder
    storage.remove_empty_folders(f"{output}/items/i")
    assert missing_done_items(output, done) == {"a", "a.b", "e", "g", "i"}

    # No request per item: the plan lists, it never checks or reads an item's object.
    for name in ("exists", "read_bytes", "modified_time"):
        monkeypatch.setattr(storage, name, lambda *_: pytest.fail(f"planning called storage.{name}"))
    assert missing_done_items(output, done) == {"a", "a.b", "e", "g", "i"}


def test_a_missing_item_is_planned_again_and_marked(tmp_path):
    requests = _requests(2)
    done = {r.item_id: plan_key(r, "c", "m") for r in requests}
    done = {item: planning_entry(key) for item, key in done.items()}
    planned = list(plan_items(requests, done, config_hash="c", model_hash="m", missing={"i1"}))
    assert [(p.skip, p.missing) for p in planned] == [(True, False), (False, True)]


def planning_entry(key):
    from diffcolor.archive.planning import DoneEntry

    return DoneEntry(key, 1)


def test_listing_an_output_recursively_never_follows_links_and_hides_staging_files(tmp_path):
    from diffcolor.archive import storage

    root = tmp_path / "items"
    for name in ("a/result.json", "a/versions/v0001/master.tif", "b/result.json", "a/.result.json.x.partial"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "secret").write_bytes(b"s")
    (root / "b" / "versions").symlink_to(outside)  # listed as an entry, never walked into
    names = sorted(name for batch in storage.iter_objects(str(root)) for name in batch)
    assert names == ["a/result.json", "a/versions/v0001/master.tif", "b/result.json", "b/versions"]
    assert list(storage.iter_objects(str(tmp_path / "none"))) == []


def _plan_key_per_row(request: ItemRequest, config: str, model: str) -> str:
    """The plan key as it was first written: one json.dumps per row (the reference plan_keys must equal)."""
    import hashlib
    import json

    catalogue = request.catalogue or {}
    return hashlib.sha256(json.dumps([
        request.item_id, request.source_uri, request.caption, list(request.targets),
        dict(sorted(request.color_map.items())), int(request.seed), bool(request.force),
        catalogue.get("image_sha256"), catalogue.get("image_etag"), config, model,
    ], sort_keys=True, default=str).encode()).hexdigest()


def test_plan_keys_by_column_equal_the_per_row_keys_byte_for_byte(tmp_path):
    import datetime

    import pyarrow as pa

    from diffcolor.archive.manifest import read_items, write_manifest
    from diffcolor.archive.planning import PLAN_BATCH
    from diffcolor.common.keys import plan_keys

    rows = 2 * PLAN_BATCH + 7  # more than one batch, and a ragged last one
    captions = ["a dog on a bench", 'a "quoted" café in Zürich \\ back', "ein Hund 🐕 auf der Bank", "犬 dog\tby a\nlake"]
    table = pa.table({
        "item_id": [f"Item-{n}" if n % 5 else f"Éloïse-{n}" for n in range(rows)],
        "image_uri": [f"scans/{n}.tif" if n % 3 else f"s3://b/ü/{n}\u00e9.tif" for n in range(rows)],
        "caption": [captions[n % 4] for n in range(rows)],
        "target_prompts": pa.array([None if n % 4 == 0 else [] if n % 4 == 1 else ["red 🍎", 'say "hi"'][: n % 3 + 1]
                                    for n in range(rows)], pa.list_(pa.string())),
        "color_map": pa.array([None if n % 3 else [("dog", "brown"), ("bench", "grün")] if n % 4 == 0 else [("café", "blue")]
                               for n in range(rows)], pa.map_(pa.string(), pa.string())),
        "seed": pa.array([None if n % 7 == 0 else n * 7919 if n % 2 else 2**63 - 1 for n in range(rows)], pa.int64()),
        "image_sha256": [None if n % 2 else f"{n:064x}" for n in range(rows)],
        "image_etag": pa.array([n if n % 3 == 0 else None for n in range(rows)], pa.int64()),
    })
    # colour-map words must be words of the caption: keep the maps only where they fit
    fits = [cap == captions[0] or cap == captions[1] for cap in table["caption"].to_pylist()]
    maps = [value if fit and value is not None and all(k in cap for k, _ in value) else None
            for value, fit, cap in zip(table["color_map"].to_pylist(), fits, table["caption"].to_pylist())]
    table = table.set_column(4, "color_map", pa.array(maps, pa.map_(pa.string(), pa.string())))
    write_manifest(table, str(tmp_path / "m.parquet"))
    requests = list(read_items(str(tmp_path / "m.parquet"), force=False))
    requests += [ItemRequest("odd", "u", "c", targets=("x",), color_map={"b": "2", "a": "1"}, seed=True, force=1,
                             catalogue={"image_sha256": 5, "image_etag": datetime.date(2020, 1, 2)}),
                 ItemRequest("none", "u", "c", catalogue=None, force=True),
                 ItemRequest("ctl\x01\u2028", "\ud800x", "c\x7f", catalogue={"image_etag": ["a", {"k": None}]})]
    assert any(r.color_map for r in requests) and any(r.targets for r in requests)
    for config, model in (("c" * 64, "m"), ('{"a": 1}', "modèle")):
        expected = [_plan_key_per_row(request, config, model) for request in requests]
        assert plan_keys(requests, config, model) == expected
        assert [plan_key(request, config, model) for request in requests] == expected
        assert [item.plan_key for item in plan_items(iter(requests), {}, config_hash=config, model_hash=model)] == expected
