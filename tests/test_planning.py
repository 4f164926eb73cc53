"""Planning as plain functions: plan keys, the done-index, windows, preset overrides."""

from __future__ import annotations

import pytest
from s3server import s3_bucket, s3_endpoint  # noqa: F401 (fixtures)

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


@pytest.mark.parametrize("store", ["local", "s3"])
def test_runs_updating_the_index_at_once_lose_no_entry_through_compactions(tmp_path, request, store):
    import threading

    from diffcolor.archive import planning, storage

    output = str(tmp_path / "out") if store == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    runs, per_run = 2 * (planning.COMPACT_AFTER_SHARDS + 4), 5  # enough shards for several compactions

    def run(number: int) -> None:
        update_done_index(output, [(f"r{number}-i{n}", f"key-{number}-{n}", "done", 1) for n in range(per_run)],
                          run_id=f"run-{number:03d}")

    threads = [threading.Thread(target=run, args=(number,)) for number in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = read_done_index(output)
    assert len(done) == runs * per_run and done["r7-i3"] == ("key-7-3", 1)
    assert storage.exists(planning.index_uri(output))  # compactions happened under the load
    assert storage.list_files(f"{output}/index/lock") == []
    assert planning.compact_done_index(output)  # one more folds every shard left, losing nothing
    assert storage.list_files(f"{output}/index/runs") == [] and read_done_index(output) == done


def test_planning_streams_and_submission_is_windowed(monkeypatch):
    import itertools
    from concurrent.futures import Future

    from flows import collection

    pulled = []

    def stream():
        for request in _requests(10_000):
            pulled.append(request.item_id)
            yield request

    planned = plan_items(stream(), {}, config_hash="c", model_hash="m")
    assert len(list(itertools.islice(planned, 16))) == 16 and len(pulled) == 16  # nothing read ahead

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
