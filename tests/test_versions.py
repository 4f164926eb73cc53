"""Versions are committed once: a retry never duplicates one, a failure never hides the current good one."""

from __future__ import annotations

import hashlib
import json

import pytest

from diffcolor.archive import storage
from diffcolor.archive.items import ItemLayout
from diffcolor.common.errors import PromptError, StorageError
from diffcolor.common.items import ItemRequest
from diffcolor.pipeline import colorize_item, recolor_item

CAPTION = "a dog sitting on a wooden bench"


def _versions(prefix) -> list[str]:
    return [uri.rsplit("/", 1)[-1] for uri in ItemLayout(str(prefix)).version_records()]


def _fail_once(monkeypatch, suffix: str) -> dict:
    """The first write of an object whose URI ends with ``suffix`` fails as the store would (transient)."""
    real_write, state = storage.write_bytes, {"failed": 0}

    def write(uri, data):
        if uri.endswith(suffix) and not state["failed"]:
            state["failed"] += 1
            raise StorageError(f"writing '{uri}' failed: 503 Slow Down (injected)")
        return real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", write)
    return state


def _check_outputs_match_records(prefix) -> None:
    for uri in ItemLayout(str(prefix)).version_records():
        record = storage.read_json(uri)
        for role, output in record["outputs"].items():
            assert hashlib.sha256(storage.read_bytes(output)).hexdigest() == record["output_sha256"][role], (uri, role)


def test_a_retry_after_a_failure_between_the_version_record_and_result_json_adds_no_version(
        models, smoke, tmp_path, gray_png, monkeypatch):
    request = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION, targets=("a brown dog",),
                          color_map={"bench": "black"})
    prefix = tmp_path / "item"
    failing = _fail_once(monkeypatch, "/result.json")
    with pytest.raises(StorageError):
        colorize_item(models, request, str(prefix), smoke)
    assert failing["failed"] == 1 and _versions(prefix) == ["v0001.json"]  # v1 committed, then result.json failed

    records = colorize_item(models, request, str(prefix), smoke)  # the retry

    assert _versions(prefix) == ["v0001.json", "v0002.json"]  # v1 reused, v2 made: no duplicate
    assert [r["version"] for r in records] == [1, 2] and records[1]["finetune_steps_run"] == 0
    current = storage.read_json(str(prefix / "result.json"))
    assert current["status"] == "done" and current["version"] == 2
    _check_outputs_match_records(prefix)
    # The failed attempt is on record beside the versions.
    [attempt] = storage.list_files(str(prefix / "attempts"))
    assert storage.read_json(attempt)["error_class"] == "storage"


def test_a_retry_after_every_version_was_committed_only_rewrites_result_json(models, smoke, tmp_path, gray_png,
                                                                              monkeypatch):
    request = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION)
    prefix = tmp_path / "item"
    failing = _fail_once(monkeypatch, "/result.json")
    with pytest.raises(StorageError):
        colorize_item(models, request, str(prefix), smoke)
    assert failing["failed"] == 1
    real_write, calls = storage.write_bytes, []

    def write(uri, data):
        calls.append(uri.rsplit("/", 1)[-1])
        return real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", write)
    [record] = colorize_item(models, request, str(prefix), smoke)
    assert record["version"] == 1 and _versions(prefix) == ["v0001.json"]
    assert "master.tif" not in calls and "color-state.safetensors" not in calls  # nothing was made again
    assert storage.read_json(str(prefix / "result.json"))["version"] == 1


def test_a_failed_rerun_of_a_done_item_keeps_its_current_version(models, smoke, tmp_path, gray_png):
    prefix = tmp_path / "item"
    done = colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION),
                         str(prefix), smoke)[-1]
    before = (prefix / "result.json").read_bytes()

    bad = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION, color_map={"horse": "brown"})
    with pytest.raises(PromptError):
        colorize_item(models, bad, str(prefix), smoke)

    assert (prefix / "result.json").read_bytes() == before  # still names the good version
    assert storage.read_json(str(prefix / "result.json"))["version"] == done["version"]
    [attempt] = storage.list_files(str(prefix / "attempts"))
    failed = storage.read_json(attempt)
    assert failed["status"] == "failed" and failed["error_class"] == "bad_prompt" and "'horse'" in failed["error_message"]


def test_a_failure_before_any_good_version_is_what_result_json_says(models, smoke, tmp_path):
    prefix = tmp_path / "item"
    with pytest.raises(Exception):
        colorize_item(models, ItemRequest(item_id="gone", source_uri=str(tmp_path / "missing.tif"), caption=CAPTION),
                      str(prefix), smoke)
    assert storage.read_json(str(prefix / "result.json"))["error_class"] == "input_unavailable"


def test_the_same_recolour_asked_twice_is_one_version(models, smoke, tmp_path, gray_png, monkeypatch):
    prefix = tmp_path / "item"
    colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION), str(prefix), smoke)
    failing = _fail_once(monkeypatch, "/result.json")
    with pytest.raises(StorageError):
        recolor_item(models, str(prefix), color_map={"dog": "brown"})
    assert failing["failed"] == 1
    first = recolor_item(models, str(prefix), color_map={"dog": "brown"})
    again = recolor_item(models, str(prefix), color_map={"dog": "brown"})
    assert first["version"] == again["version"] == 2 and _versions(prefix) == ["v0001.json", "v0002.json"]
    other = recolor_item(models, str(prefix), color_map={"dog": "black"})
    assert other["version"] == 3
    assert json.loads((prefix / "result.json").read_text())["version"] == 3
    _check_outputs_match_records(prefix)


def test_a_recolour_checks_only_the_version_it_might_reuse(models, smoke, tmp_path, gray_png, monkeypatch):
    # An item with several versions (each a scan's master of hundreds of MB): a new recolour reads none of
    # their outputs, the same recolour asked again reads only its own version's; a damaged one is made again.
    prefix = tmp_path / "item"
    colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION), str(prefix), smoke)
    recolor_item(models, str(prefix), color_map={"dog": "brown"})
    recolor_item(models, str(prefix), color_map={"dog": "black"})
    checked, real_hash = [], storage.sha256_bounded

    def counted(uri, limits):
        checked.append(uri)
        return real_hash(uri, limits)

    monkeypatch.setattr(storage, "sha256_bounded", counted)
    new = recolor_item(models, str(prefix), color_map={"dog": "white"})
    assert new["version"] == 4 and checked == []
    again = recolor_item(models, str(prefix), color_map={"dog": "brown"})
    assert again["version"] == 2
    assert sorted(checked) == sorted(uri for role, uri in again["outputs"].items() if role != "state")
    with open(again["outputs"]["master"], "r+b") as master:  # one byte of the reused version's master changed
        master.seek(100)
        master.write(b"\xff" if master.read(1) != b"\xff" else b"\x00")
    redone = recolor_item(models, str(prefix), color_map={"dog": "brown"})
    assert redone["version"] == 5 and redone["outputs"]["master"] != again["outputs"]["master"]
    with open(redone["outputs"]["master"], "rb") as master:
        assert hashlib.sha256(master.read()).hexdigest() == redone["output_sha256"]["master"]


def test_a_colour_state_with_incomplete_metadata_is_a_named_state_error(tmp_path):
    from safetensors.torch import save

    import torch

    from diffcolor.common.errors import StateError
    from diffcolor.method.state import state_from_bytes

    data = save({"embedding": torch.zeros(1, 2)}, metadata={"diffcolor": json.dumps({"format": 1, "caption": "a dog"})})
    with pytest.raises(StateError, match="colour state 'x.safetensors' is incomplete: KeyError"):
        state_from_bytes(data, "x.safetensors")
    with pytest.raises(StateError, match="unreadable"):
        state_from_bytes(b"not a safetensors file", "x.safetensors")
