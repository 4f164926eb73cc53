"""Fault injection at every storage operation of one item (diffcolor.tools.faults), on local disk and a real S3 API.

The default suite keeps the fault table true, faults a spread of operations
with lost answers and kills on local disk, and the lease and the heartbeat in
every mode; ``-m slow`` adds every operation on local disk with a
transient error, a spread of them on S3, and the whole matrix (every
operation, every mode, both stores), which is what ``make test-faults`` (in CI)
runs as ``python -m diffcolor.tools.faults`` and prints as a table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diffcolor.tools.faults import BEGIN, END, MODES, doc_differences, record_operations, run_harness, summary_table
from diffcolor.tools.faults import main as faults_main


def _assert_all_held(store: str, operations: dict[str, list[str]], outcomes) -> None:
    assert outcomes, "no fault was injected"
    failed = [f"{o.group} {o.mode} op {o.at} ({o.operation}): {o.problems}" for o in outcomes if o.problems]
    assert failed == [], summary_table({store: operations}, outcomes) + "\n" + "\n".join(failed)


@pytest.mark.slow  # a part of the matrix that make test-faults runs whole
def test_every_operation_enumerated_and_faulted_on_local_disk(models, tmp_path):
    operations, outcomes = run_harness(models, str(tmp_path), store="local", modes=("error-before",))
    # The list is the pipeline's own: reads, the checkpoints, the state, both versions and their records.
    written = [op for op in operations["item"] if op.startswith("write_bytes")]
    assert any("checkpoints/" in op for op in written) and any("color-state.safetensors" in op for op in written)
    assert sum(op.endswith("result.json") for op in written) == 2 and any(op.endswith("v0002.json") for op in written)
    # The lease's conditional create and owner-checked removal are operations of the item like any other.
    assert operations["item"][1] == "create_exclusive reference/lock/lease-00000001.json"
    assert operations["item"][-1] == "remove_if_owner reference/lock/lease-00000001.json"
    # One heartbeat, a group of its own: no renewal counted among the item's operations, whatever the timing.
    assert [op.split()[0] for op in operations["heartbeat"]] == ["list_files", "replace_if_owner"]
    assert not any(op.startswith("replace_if_owner") for op in operations["item"])
    assert len(outcomes) == len(operations["item"]) + len(operations["heartbeat"])
    _assert_all_held("local", operations, outcomes)


def test_lost_answers_and_kills_on_local_disk(models, tmp_path):
    operations, outcomes = run_harness(models, str(tmp_path), store="local", modes=("error-after", "kill"),
                                       only=lambda k: k % 6 == 1)
    _assert_all_held("local", operations, outcomes)


@pytest.mark.slow  # a part of the matrix that make test-faults runs whole
def test_faults_on_a_real_s3_api(models, s3_bucket):
    operations, outcomes = run_harness(models, f"{s3_bucket}/faults", store="s3", modes=MODES,
                                       only=lambda k: k % 9 == 4 or k == 2)
    assert {outcome.mode for outcome in outcomes} == set(MODES)
    assert {(o.group, o.operation.split()[0]) for o in outcomes} >= {
        ("item", "create_exclusive"), ("heartbeat", "replace_if_owner")}
    _assert_all_held("s3", operations, outcomes)


def test_the_lease_create_and_the_heartbeat_are_faulted_in_every_mode(models, tmp_path):
    operations, outcomes = run_harness(
        models, str(tmp_path), store="local", modes=MODES,
        select=lambda group, k, operation: group == "heartbeat" or operation.startswith("create_exclusive"))
    assert sorted({(o.group, o.mode) for o in outcomes}) == sorted(
        {(group, mode) for group in ("item", "heartbeat") for mode in MODES})
    assert len(outcomes) == len(MODES) * (1 + len(operations["heartbeat"]))
    _assert_all_held("local", operations, outcomes)


def test_the_documented_fault_table_is_the_codes(models, tmp_path, s3_bucket):
    """docs/RELIABILITY.md's table lists what the matrix enumerates now; a stale one is found (also by --check)."""
    operations = {"local": record_operations(models, str(tmp_path))[0],
                  "s3": record_operations(models, f"{s3_bucket}/faults")[0]}
    doc = (Path(__file__).parents[1] / "docs" / "RELIABILITY.md").read_text(encoding="utf-8")
    assert doc_differences(doc, operations) == [], "regenerate: python -m diffcolor.tools.faults --markdown docs/RELIABILITY.md"
    count = len(operations["local"]["item"])
    stale = doc.replace(f"| local | item | kill | {count} | {count} |", f"| local | item | kill | {count - 4} | {count - 4} |")
    assert stale != doc and doc_differences(stale, operations) == [
        f"documented 'local | item | kill | {count - 4} | {count - 4}', the code gives 'local | item | kill | {count} | {count}'"]
    assert doc_differences(doc.replace("| s3 | heartbeat | kill", "| s3 | heartbeat | gone"), operations)
    assert doc_differences(doc.replace(BEGIN, ""), operations) == [f"no fault table between '{BEGIN}' and '{END}'"]
    # The tool's own check, on a stale copy: one line naming the difference, exit status 1.
    stale_file = tmp_path / "RELIABILITY.md"
    stale_file.write_text(stale, encoding="utf-8")
    assert faults_main(["--check", str(stale_file), "--stores", "local"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_the_whole_fault_matrix(models, tmp_path, request, store):
    root = str(tmp_path) if store == "local" else f"{request.getfixturevalue('s3_bucket')}/faults"
    operations, outcomes = run_harness(models, root, store=store, modes=MODES)
    assert len(outcomes) == len(MODES) * sum(len(group) for group in operations.values())
    _assert_all_held(store, operations, outcomes)
