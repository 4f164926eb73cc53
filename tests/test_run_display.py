"""What a run shows: one terminal display (log lines above the bars, never in them), the count of the items
it goes through, and its Prefect summary."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.progress import TerminalDisplay

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "manifests" / "demo.parquet"
BAR = "━"


def _final_lines(raw: str) -> list[str]:
    """The lines as a terminal leaves them: the text after each line's last carriage return or erase, no colours."""
    lines = raw.replace("\r\n", "\n").split("\n")  # a pseudo-terminal ends lines with CR LF
    return [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", re.split(r"\r|\x1b\[2K", line)[-1]) for line in lines]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_print_through_the_display_above_its_bars_and_their_handlers_come_back():
    from prefect.logging.handlers import PrefectConsoleHandler

    stream = _Terminal()
    prefect_handler, plain_handler = PrefectConsoleHandler(stream=stream), logging.StreamHandler(stream)
    logger = logging.getLogger("diffcolor-test-display")
    logger.propagate, logger.level = False, logging.INFO
    logger.handlers = [prefect_handler, plain_handler]
    try:
        display = TerminalDisplay(stream)
        display.start("r1", 3)
        display.stage("camera", "finetune", 1, 4)
        time.sleep(0.3)  # the bars are drawn
        logger.info("a line logged under the bars")
        display.close()
        shown = stream.getvalue()
        logged = [line for line in _final_lines(shown) if "a line logged under the bars" in line]
        assert len(logged) == 2 and not any(BAR in line for line in logged), logged
        # Put back once the display closes: the handlers write to the stream itself again.
        assert prefect_handler.stream is stream and prefect_handler.console.file is stream
        assert plain_handler.stream is stream
    finally:
        logger.handlers = []


def _on_a_terminal(*args: str, cwd: Path) -> str:
    """The command run with stderr on a pseudo-terminal (as an operator's shell has it); what it showed there."""
    import pty

    from prefect.settings import PREFECT_API_URL

    leader, follower = pty.openpty()
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), COLUMNS="120")
    process = subprocess.Popen([sys.executable, "-m", "diffcolor", *args], stdout=subprocess.DEVNULL,
                               stderr=follower, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the command ended and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_the_header_counts_the_distinct_items_that_items_selects():
    from diffcolor.cli import _selected_count

    assert _selected_count(str(DEMO), None) == "6 items"
    assert _selected_count(str(DEMO), "camera,coins,camera") == "2 items (selected by --items)"
    assert _selected_count(str(DEMO), "coins") == "1 item (selected by --items)"


@pytest.mark.slow  # a real run through the command line on a pseudo-terminal
def test_a_run_of_selected_items_on_a_terminal(prefect_server, tmp_path):
    shown = _on_a_terminal("run", str(DEMO), "--items", "camera,camera", "--out", "out", "--model", "tiny",
                           "--preset", "smoke", cwd=tmp_path)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
    # The header and the bar count the items --items selects, not the manifest's six.
    assert "run: 1 item (selected by --items) of " in plain, plain[-3000:]
    assert "1/1" in plain and "/6" not in plain
    # Prefect's console lines print above the bars, each on its own line, none written into a bar's line.
    prefect_lines = [line for line in _final_lines(shown) if re.search(r" \| (INFO|WARNING|ERROR) +\| ", line)]
    assert any("Finished in state" in line for line in prefect_lines), plain[-3000:]
    assert not [line for line in prefect_lines if BAR in line or "run " in line.split(" | ")[0]], prefect_lines


def test_the_prefect_summary_of_a_smoke_run_says_so_first(prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.context import get_run_context

    from flows.runs import publish_summary

    @flow
    def publish(smoke: bool):
        summary = {"run_id": "r", "items": {"done": 1}, "versions_written": 1, "results": "out/results.parquet",
                   "results_csv": "out/results.csv", "report": "out/report.html", "smoke": smoke}
        publish_summary(summary, [{"item_id": "a", "status": "done", "version": 1, "smoke_run": smoke}])
        return get_run_context().flow_run.id

    markdown = {}
    for smoke in (True, False):
        run_id = publish(smoke)
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        [markdown[smoke]] = [a.data for a in artifacts if a.key == "colorize-collection-summary"]
    assert markdown[True].startswith("## SMOKE RUN") and "not colourisations" in markdown[True]
    assert "SMOKE" not in markdown[False] and markdown[False].startswith("### Run r")
