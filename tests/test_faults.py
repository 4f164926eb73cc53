"""Fault injection at every storage operation of one item (diffcolor.tools.faults), on local disk and a real S3 API.

The default suite faults every operation on local disk with a transient error,
and a spread of them with the other modes and on S3; ``-m slow`` runs the
whole matrix (every operation, every mode, both stores), which is also what
``python -m diffcolor.tools.faults`` prints as a table.
"""

from __future__ import annotations

import pytest

from diffcolor.tools.faults import MODES, run_harness, summary_table


def _assert_all_held(store: str, operations: list[str], outcomes) -> None:
    assert outcomes, "no fault was injected"
    failed = [f"{o.mode} op {o.at} ({o.operation}): {o.problems}" for o in outcomes if o.problems]
    assert failed == [], summary_table({store: operations}, outcomes) + "\n" + "\n".join(failed)


def test_every_operation_enumerated_and_faulted_on_local_disk(models, tmp_path):
    operations, outcomes = run_harness(models, str(tmp_path), store="local", modes=("error-before",))
    # The list is the pipeline's own: reads, the checkpoints, the state, both versions and their records.
    written = [op for op in operations if op.startswith("write_bytes")]
    assert any("checkpoints/" in op for op in written) and any("color-state.safetensors" in op for op in written)
    assert sum(op.endswith("result.json") for op in written) == 2 and any(op.endswith("v0002.json") for op in written)
    assert len(outcomes) == len(operations)
    _assert_all_held("local", operations, outcomes)


def test_lost_answers_and_kills_on_local_disk(models, tmp_path):
    operations, outcomes = run_harness(models, str(tmp_path), store="local", modes=("error-after", "kill"),
                                       only=lambda k: k % 6 == 1)
    _assert_all_held("local", operations, outcomes)


def test_faults_on_a_real_s3_api(models, s3_bucket):
    operations, outcomes = run_harness(models, f"{s3_bucket}/faults", store="s3", modes=MODES,
                                       only=lambda k: k % 9 == 4)
    assert {outcome.mode for outcome in outcomes} == set(MODES)
    _assert_all_held("s3", operations, outcomes)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_the_whole_fault_matrix(models, tmp_path, request, store):
    root = str(tmp_path) if store == "local" else f"{request.getfixturevalue('s3_bucket')}/faults"
    operations, outcomes = run_harness(models, root, store=store, modes=MODES)
    assert len(outcomes) == len(MODES) * len(operations)
    _assert_all_held(store, operations, outcomes)
