"""A user's mistake is one line and exit 2; anything else is a bug, shown with its traceback and exit 1.

Every case runs the real command line in a fresh process: a user error from the
arguments, and a bug injected by patching a function before ``cli.main`` runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffcolor.common.errors import DiffColorError, PermanentError, UserError

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def _diffcolor(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffcolor", *arguments], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def _patched_main(target: str, exception: str, *arguments: str) -> subprocess.CompletedProcess:
    """``diffcolor ARGUMENTS`` with ``target`` (module.function) replaced by one that raises ``exception``."""
    module, _, name = target.rpartition(".")
    code = (f"import sys, importlib\n"
            f"def broken(*args, **kwargs):\n    raise {exception}\n"
            f"setattr(importlib.import_module({module!r}), {name!r}, broken)\n"
            "from diffcolor.cli import main\nsys.exit(main(sys.argv[1:]))")
    return _python(code, *arguments)


def _assert_user_error(done: subprocess.CompletedProcess, *named: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("diffcolor: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for word in named:
        assert word in lines[-1], (word, lines[-1])


def test_the_user_error_class_is_a_permanent_value_error():
    error = UserError("bad value 'x'")
    assert isinstance(error, ValueError) and isinstance(error, PermanentError) and isinstance(error, DiffColorError)


def test_a_bad_option_is_one_line_and_exit_2(tmp_path):
    done = _diffcolor("review", str(tmp_path), "--host", "0.0.0.0")
    _assert_user_error(done, "--host 0.0.0.0", "--token-file")


def test_a_credential_in_a_uri_is_one_line_and_exit_2(tmp_path):
    done = _diffcolor("verify", "http://user:secret@example.org/out")
    _assert_user_error(done, "carries credentials")
    assert "secret" not in done.stderr


def test_a_folder_without_a_collection_is_one_line_and_exit_2(tmp_path):
    done = _diffcolor("verify", str(tmp_path))
    _assert_user_error(done, "holds no collection output", str(tmp_path))


@pytest.mark.parametrize("exception", ["ValueError('boom in the audit')", "KeyError('boom in the audit')",
                                       "TypeError('boom in the audit')"])
def test_an_unexpected_exception_is_a_bug_with_its_traceback_and_exit_1(tmp_path, exception):
    (tmp_path / "items").mkdir()
    done = _patched_main("diffcolor.archive.fixity.audit_output", exception, "verify", str(tmp_path))
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback (most recent call last)" in done.stderr
    assert "boom in the audit" in done.stderr and "in broken" in done.stderr  # where it was raised
    last = done.stderr.strip().splitlines()[-1]
    assert "internal error" in last and "bug" in last and "report it" in last
    assert not done.stderr.startswith("diffcolor: error:")


def test_a_user_error_raised_deep_down_stays_one_line(tmp_path):
    (tmp_path / "items").mkdir()
    done = _patched_main("diffcolor.archive.fixity.audit_output",
                         "__import__('diffcolor.common.errors').common.errors.UserError('the audit cannot read x')",
                         "verify", str(tmp_path))
    _assert_user_error(done, "the audit cannot read x")


def test_a_flow_refuses_a_run_in_one_line_only_for_errors_raised_on_purpose():
    from flows.runs import refusal

    assert refusal(UserError("bad --set 'x'\nmore")) == "bad --set 'x'"
    assert refusal(ValueError("a bug")) is None  # a plain ValueError is a bug: it is raised, not summarised
    assert refusal(KeyError("a bug")) is None


def test_a_crashed_flow_is_reported_as_a_bug_and_a_refusal_as_one_line():
    from diffcolor import cli

    class State:  # what Prefect hands back for a flow whose body raised
        message = "boom"

        def __init__(self, result):
            self._result = result

        def result(self, raise_on_failure=False):
            return self._result

    with pytest.raises(ZeroDivisionError):
        cli._finish_flow(State(ZeroDivisionError("boom")))
    assert cli._finish_flow(State(UserError("a bad targets file"))) == 2


def _colourised(out: Path, item_id: str, caption: str, rewritten: str) -> None:
    """An item as a colourisation leaves it, as far as a reprocess's checks read it (its result.json)."""
    folder = out / "items" / item_id
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({
        "item_id": item_id, "version": 1, "status": "done", "caption": caption, "rewritten_caption": rewritten,
        "model_id": "no-such-model", "source_uri": str(out / f"{item_id}.png")}))


@pytest.fixture
def two_items(tmp_path):
    out = tmp_path / "out"
    _colourised(out, "camera", "a camera on a table", "a sks camera on a sks table")
    _colourised(out, "coat", "a man in a coat", "a sks man in a sks coat")
    return out


def test_reprocess_names_the_item_whose_caption_lacks_a_colour_word_before_any_model(two_items, tmp_path):
    missing_model = tmp_path / "no-model"
    done = _diffcolor("reprocess", str(two_items), "--items", "camera,coat", "--color-map", '{"coat": "gray"}',
                      "--model", str(missing_model))
    _assert_user_error(done, "item 'camera'", "'coat'")
    assert "item 'coat'" not in done.stderr  # the coat's caption has the word
    assert str(missing_model) not in done.stderr, "refused before the model was even checked"
    assert not (two_items / "runs").exists()


def test_reprocess_checks_each_row_of_a_targets_file_against_its_own_item(two_items, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    suitable = tmp_path / "suitable.parquet"
    pq.write_table(pa.table({"item_id": ["camera", "coat"],
                             "color_map": [json.dumps({"camera": "black"}), json.dumps({"coat": "gray"})]}), suitable)
    done = _diffcolor("reprocess", str(two_items), "--targets", str(suitable), "--model", str(tmp_path / "no-model"))
    assert done.returncode == 2 and "no-model" in done.stderr and "item '" not in done.stderr  # on to the model

    crossed = tmp_path / "crossed.parquet"
    pq.write_table(pa.table({"item_id": ["camera", "coat"], "color_map": [json.dumps({"coat": "gray"}), None],
                             "target_prompt": [None, "a man in a green coat"]}), crossed)
    done = _diffcolor("reprocess", str(two_items), "--targets", str(crossed), "--model", str(tmp_path / "no-model"))
    _assert_user_error(done, "item 'camera'", "'coat'")
    assert "item 'coat'" not in done.stderr and "no-model" not in done.stderr


def test_reprocess_refuses_a_target_and_a_colour_map_together(two_items):
    done = _diffcolor("reprocess", str(two_items), "--items", "coat", "--color-map", '{"coat": "gray"}',
                      "--target", "a man in a gray coat")
    _assert_user_error(done, "item 'coat'", "not both")


def test_a_corrupt_record_is_one_line_naming_it(tmp_path):
    item = tmp_path / "dog"
    item.mkdir()
    (item / "result.json").write_text("{not json")
    done = _diffcolor("recolor", str(item), "--target", "a red dog")
    _assert_user_error(done, str(item / "result.json"), "is not JSON")


def test_a_file_the_system_refuses_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the bundle's folder should go")
    done = _diffcolor("tiny-bundle", str(blocker / "tiny"))
    _assert_user_error(done, str(blocker))


def test_reprocess_refuses_a_targets_file_mixed_with_targets_for_every_item(two_items, tmp_path):
    done = _diffcolor("reprocess", str(two_items), "--targets", str(tmp_path / "t.parquet"), "--items", "coat")
    _assert_user_error(done, "--targets", "--items")


def test_the_exit_status_survives_the_interpreter_teardown(tmp_path):
    # A refused targets file leaves an Arrow table in the exception's frames; freed at teardown beside torch,
    # Arrow's threads aborted the process (exit 134) in about a third of the runs. Six runs, one after another.
    import pyarrow as pa
    import pyarrow.parquet as pq

    targets = tmp_path / "targets.parquet"
    pq.write_table(pa.table({"item_id": ["../../../etc"], "target_prompt": ["a red dog"]}), targets)
    (tmp_path / "out").mkdir()
    command = [sys.executable, "-m", "diffcolor", "reprocess", str(tmp_path / "out"), "--targets", str(targets)]
    environment = dict(os.environ, PREFECT_API_URL="http://127.0.0.1:9/api")  # never reached: refused before
    finished = [subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300) for _ in range(6)]
    assert all(run.returncode == 2 and "unsafe item_id" in run.stderr and "terminate called" not in run.stderr
               for run in finished), [(run.returncode, run.stderr[-300:]) for run in finished]
