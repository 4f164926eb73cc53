"""The archive is the truth, the done-index a cache: lost work is redone, and ``diffcolor verify`` audits fixity."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from test_flows import _collection

from diffcolor.archive import storage
from diffcolor.archive.results import read_results
from diffcolor.cli import main


def _run(manifest, output) -> dict:
    from flows.collection import RunOptions, colorize_collection

    state = colorize_collection(str(manifest), str(output), "tiny", RunOptions(preset="smoke", pool="inline"),
                                return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def _statuses(summary: dict) -> dict[str, str]:
    return {row["item_id"]: row["status"] for row in read_results(summary["results"]).to_pylist()}


def _tree(root) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time (links not followed)."""
    found = {}
    for parent, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(parent, name)
            info = os.lstat(path)
            found[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def done_collection(prefect_server, tmp_path_factory):
    """A manifest of five items and an output where a run did them all (copied per test: see ``collection``)."""
    folder = tmp_path_factory.mktemp("verify")
    manifest = _collection(folder, count=5)
    _run(manifest, folder / "out")
    return manifest, folder / "out"


@pytest.fixture
def collection(done_collection, tmp_path):
    """A fresh copy of the done collection's output, at the same path (records name absolute URIs)."""
    manifest, out = done_collection
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine, symlinks=True)
    yield manifest, out
    shutil.rmtree(out)
    shutil.copytree(pristine, out, symlinks=True)


def _master(out, item):
    return out / "items" / item / "versions" / "v0001" / "master.tif"


def _access(out, item):
    return next((out / "items" / item / "versions" / "v0001").glob("access.*"))


def test_lost_work_is_found_by_the_plan_and_redone_not_skipped(collection, capsys):
    manifest, out = collection
    (out / "items" / "p0" / "result.json").unlink()
    shutil.rmtree(out / "items" / "p1")
    _access(out, "p2").unlink()

    code = main(["run", str(manifest), "--out", str(out), "--model", "tiny", "--preset", "smoke", "--pool", "inline"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "redone (missing from the archive though the done-index listed them) 3: p0, p1, p2" in printed
    assert "skipped (already done) 2" in printed and "done 3" in printed
    assert main(["verify", str(out)]) == 0  # every record holds again
    assert json.loads((out / "items" / "p2" / "result.json").read_text())["version"] == 2  # a new version
    assert (out / "items" / "p1" / "result.json").exists()


def test_a_clean_output_passes_and_nothing_is_written(collection, capsys, tmp_path):
    _, out = collection
    before = _tree(out)
    assert main(["verify", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 item(s)" in printed and "all records hold" in printed
    assert _tree(out) == before


def test_every_kind_of_damage_is_reported_per_file_and_exits_1(collection, capsys, tmp_path):
    _, out = collection
    _access(out, "p0").unlink()
    master = _master(out, "p1")
    data = bytearray(master.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    master.write_bytes(bytes(data))
    (out / "items" / "p2" / "result.json").unlink()
    (out / "items" / "p3" / "result.json").write_text('{"item_id": "p3", "status": "do')
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "master.tif").write_bytes(_master(out, "p4").read_bytes())  # even the right bytes: never read there
    _master(out, "p4").unlink()
    _master(out, "p4").symlink_to(outside / "master.tif")
    record = json.loads((out / "items" / "p1" / "versions" / "v0001.json").read_text())
    before = _tree(out)

    assert main(["verify", str(out), "--json", str(tmp_path / "audit.json")]) == 1
    lines = capsys.readouterr().out.splitlines()
    access_name = f"versions/v0001/{_access(out, 'p1').name}"
    assert any(line.startswith(f"p0: {access_name}: missing") for line in lines)
    assert (f"p1: versions/v0001/master.tif: sha256 differs from the record's (expected {record['output_sha256']['master']}"
            in "\n".join(lines))
    assert any(line.startswith("p2: result.json: missing") for line in lines)
    assert any(line.startswith("p3: result.json: does not parse as JSON") for line in lines)
    assert any(line.startswith("p4: versions/v0001/master.tif: symbolic link leaving the output root") for line in lines)
    assert "5 item(s)" in lines[-2] and "in 5 item(s)" in lines[-2]
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["ok"] is False and report["damaged_items"] == ["p0", "p1", "p2", "p3", "p4"]
    assert _tree(out) == before  # without --repair nothing is written under the output

    # The item folder itself a link out of the root: reported, never walked.
    shutil.rmtree(out / "items" / "p4")
    (out / "items" / "p4").symlink_to(outside)
    assert main(["verify", str(out)]) == 1
    assert "p4: (item): symbolic link leaving the output root" in capsys.readouterr().out


def test_repair_queues_exactly_the_damaged_items_and_the_next_run_redoes_them(collection, capsys):
    manifest, out = collection
    _access(out, "p0").unlink()
    master = _master(out, "p1")
    master.write_bytes(master.read_bytes()[:-1] + bytes([master.read_bytes()[-1] ^ 0xFF]))
    (out / "items" / "p3" / "result.json").write_text("not json")

    assert main(["verify", str(out), "--repair"]) == 1
    printed = capsys.readouterr().out
    assert "queued for the next run: p0, p1, p3" in printed
    reports = list((out / "verify").glob("*.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["queued"] == ["p0", "p1", "p3"]

    summary = _run(manifest, out)
    assert _statuses(summary) == {"p0": "done", "p1": "done", "p2": "skipped_done", "p3": "done", "p4": "skipped_done"}
    assert main(["verify", str(out)]) == 0


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing-here")]) == 2
    assert "holds no collection output" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["verify"])
    assert exited.value.code == 2


def test_verify_over_a_real_s3_api(models, smoke, s3_bucket, tmp_path, capsys):
    from conftest import gray_scene
    from PIL import Image

    from diffcolor.archive.fixity import REPAIR_STATUS
    from diffcolor.archive.layout import OutputLayout
    from diffcolor.archive.planning import read_done_index, update_done_index
    from diffcolor.common.items import ItemRequest
    from diffcolor.pipeline import colorize_item

    output = f"{s3_bucket}/archive"
    source = tmp_path / "p0.png"
    Image.fromarray((gray_scene(48, 64) * 255).round().astype("uint8")).save(source)
    request = ItemRequest(item_id="p0", source_uri=str(source), caption="a dog on a bench", seed=0)
    colorize_item(models, request, OutputLayout(output).item_prefix("p0"), smoke, preset="smoke")
    for copy in ("p1", "p2"):  # two more items: p0's objects, their records naming the copies
        for batch in storage.iter_objects(f"{output}/items/p0"):
            for name in batch:
                data = storage.read_bytes(f"{output}/items/p0/{name}")
                if name.endswith(".json"):
                    data = data.replace(b"/items/p0/", f"/items/{copy}/".encode())
                storage.write_bytes(f"{output}/items/{copy}/{name}", data)
    update_done_index(output, [(f"p{index}", f"key-{index}", "done", 1) for index in range(3)])
    assert main(["verify", output]) == 0
    capsys.readouterr()
    keys = sorted(storage.list_files(f"{output}/items/p2/versions/v0001"))

    storage.write_bytes(f"{output}/items/p0/versions/v0001/master.tif", b"not the master")
    storage.remove(f"{output}/items/p1/result.json")
    storage.write_bytes(f"{output}/items/p2/result.json", b"{")
    assert main(["verify", output]) == 1  # nothing written without --repair
    assert storage.list_files(f"{output}/verify") == [] and set(read_done_index(output)) == {"p0", "p1", "p2"}
    assert main(["verify", output, "--repair"]) == 1
    printed = capsys.readouterr().out
    assert "p0: versions/v0001/master.tif: sha256 differs" in printed and "p1: result.json: missing" in printed
    assert "p2: result.json: does not parse as JSON" in printed
    assert "queued for the next run: p0, p1, p2" in printed
    assert len(storage.list_files(f"{output}/verify")) == 1
    assert read_done_index(output) == {}  # the next run does all three again
    assert REPAIR_STATUS == "needs_repair" and sorted(storage.list_files(f"{output}/items/p2/versions/v0001")) == keys


def test_the_verify_flow_fails_on_damage_and_names_it(collection):
    from flows.verify import verify_output

    _, out = collection
    state = verify_output(str(out), return_state=True)
    assert state.is_completed() and state.result()["ok"]
    (out / "items" / "p1" / "result.json").unlink()
    state = verify_output(str(out), return_state=True)
    assert state.is_failed() and "1 problem(s) in 1 item(s)" in state.message
    assert state.result(raise_on_failure=False)["damaged_items"] == ["p1"]
    assert not (out / "verify").exists()  # an audit without repair writes nothing


def test_hostile_items_are_reported_without_reading_what_they_point_at(collection, capsys):
    _, out = collection
    master = _master(out, "p0")
    master.unlink()
    os.mkfifo(master)  # a FIFO would hang a reader for ever
    result = json.loads((out / "items" / "p1" / "result.json").read_text())
    result["outputs"]["access"] = "/etc/passwd"  # a record naming a file outside its item
    (out / "items" / "p1" / "result.json").write_text(json.dumps(result))
    (out / "items" / "p2" / "result.json").write_text(json.dumps({"status": "done", "version": "1; rm -rf /",
                                                                    "outputs": ["x"]}))
    (out / "items" / "p3" / "result.json").write_text("[1, 2]")

    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "p0: versions/v0001/master.tif: not a regular file" in printed
    assert "p1: /etc/passwd: the record of version 1 names a file outside the item's folder" in printed
    assert "p2: result.json: names no valid version ('1; rm -rf /')" in printed
    assert "p3: result.json: is not a JSON object (a list)" in printed
