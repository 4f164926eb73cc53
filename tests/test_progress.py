"""Honest progress for large items: the merge and the writes of a version report their progress, the time
left weighs each item's work by its pixels, and a log never sits silent on a long phase."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
import torch

from diffcolor.common.items import ItemRequest
from diffcolor.method.merge import MergeConfig, merge_full_resolution
from diffcolor.pipeline import colorize_item
from flows.progress import PHASE_LINE_SECONDS, LogDisplay, TerminalDisplay, WorkEstimate


class Clock:
    """A fake monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _done(item: str, width: int, height: int, **seconds: float) -> list[dict]:
    """The record of an item done, timed as the pipeline times it."""
    return [{"item_id": item, "status": "done", "version": 1, "seconds": seconds,
             "source": {"width": width, "height": height}}]


# ---------------------------------------------------------------------------
# The merge and the pipeline report their progress.


def test_the_merge_reports_every_strip_monotonically_up_to_its_total():
    rng = np.random.default_rng(0)
    gray = rng.random((301, 200))
    chroma = torch.from_numpy(rng.normal(0, 20, (2, 30, 20)).astype(np.float32))
    calls = []
    merged = merge_full_resolution(gray, chroma, 16, MergeConfig(strip_pixels=40 * 200),
                                   progress=lambda done, total: calls.append((done, total)))
    steps = [done for done, _ in calls]
    assert {total for _, total in calls} == {2 * 301}  # two passes over the rows
    assert len(calls) >= 2 * 301 // 40 and steps == sorted(set(steps)) and steps[-1] == 2 * 301
    # The same image as without a callback: reporting changes nothing.
    np.testing.assert_array_equal(merged.rgb, merge_full_resolution(gray, chroma, 16,
                                                                    MergeConfig(strip_pixels=40 * 200)).rgb)


class Stopped(Exception):
    pass


def test_what_the_merge_callback_raises_stops_the_merge_there():
    gray = np.random.default_rng(1).random((120, 100))
    chroma = torch.zeros((2, 12, 10))
    calls = []

    def stop_halfway(done: int, total: int) -> None:
        calls.append(done)
        if done >= total // 2:
            raise Stopped("stopped")

    with pytest.raises(Stopped):
        merge_full_resolution(gray, chroma, 8, MergeConfig(strip_pixels=20 * 100), progress=stop_halfway)
    assert calls[-1] == 120 and max(calls) == 120  # the first pass, then nothing more


def test_a_larger_scan_reports_its_size_then_its_merge_and_encodes(models, smoke, tmp_path, gray_tiff16):
    steps = []
    request = ItemRequest(item_id="scan16", source_uri=str(gray_tiff16), caption="a dog sitting on a wooden bench")
    [record] = colorize_item(models, request, str(tmp_path / "out"), smoke, preset="smoke",
                             progress=lambda *step: steps.append(step))
    assert record["status"] == "done"
    assert steps[0] == ("read", 1200 * 900, 1200 * 900)  # the size first, before any fit
    # The version: its merge strip by strip up to its total (the master's strips encoded as they come), then the
    # access copy, the writes.
    phases = steps[steps.index(("versions", 1, 1)) + 1:]
    merge = [step for phase, step, _ in phases if phase == "merge"]
    assert len(merge) > 4 and merge == sorted(merge) and merge[-1] == 2 * 900
    assert [phase for phase, _, _ in phases[len(merge):]] == ["access", "write"]


# ---------------------------------------------------------------------------
# Time left, each item weighted by its pixels.


def _one_small_item_done(clock: Clock, total: int) -> WorkEstimate:
    """A run of ``total`` items whose first, a 1 Mpx photograph, took 20 s: 14 of fit, 6 of pixel work."""
    estimate = WorkEstimate(clock)
    estimate.start(total)
    estimate.step("small", "read", 1_000_000, 1_000_000)
    clock.now += 20
    estimate.finish(1, total, _done("small", 1000, 1000, read=1.0, stage1=8.0, stage2=6.0, merge=4.0, write=1.0))
    return estimate


def test_a_waiting_large_item_has_more_time_left_than_a_small_one():
    lefts = {}
    for pixels in (1_000_000, 100_000_000):
        clock = Clock()
        estimate = _one_small_item_done(clock, 2)
        estimate.size("next", pixels)  # known before it starts
        lefts[pixels] = estimate.left()
    assert lefts[1_000_000] == pytest.approx(20, rel=0.01)  # as long as the first
    # 14 s of fit and 100 times the pixel work: far longer, not "the same as the first".
    assert lefts[100_000_000] >= 14 + 100 * 6 * 0.9


def test_a_large_item_under_way_at_the_end_is_not_given_a_small_items_time():
    clock = Clock()
    estimate = _one_small_item_done(clock, 2)
    # The one item left starts, a 24 Mpx scan: its size alone makes the estimate long (its fit, then 24
    # times the small item's merge and writes; its read is behind it).
    estimate.step("scan", "read", 24_000_000, 24_000_000)
    assert estimate.left() == pytest.approx(14 + 24 * 5)
    # Later, in its merge: 300 rows of 1000 in 120 s since its first report, so 240 s to go at its own pace
    # (not what the small item's rate says), then its writes.
    clock.now += 600
    estimate.step("scan", "merge", 100, 1000)
    clock.now += 120
    estimate.step("scan", "merge", 400, 1000)
    assert estimate.left() == pytest.approx(240 + 24, abs=1)
    # Writing, past every figure: it says it does not know, never "0s left".
    estimate.step("scan", "master", 0, 1)
    clock.now += 10
    assert estimate.left() == pytest.approx(24 - 10, abs=1)
    clock.now += 10_000
    assert estimate.left() is None


def test_until_an_item_is_timed_the_time_left_counts_items():
    clock = Clock()
    estimate = WorkEstimate(clock)
    estimate.start(4)
    assert estimate.left() is None
    clock.now += 10
    estimate.finish(1, 4, [{"item_id": "a", "status": "skipped_done", "version": 1}])
    assert estimate.left() == pytest.approx(30)


def test_a_step_after_its_item_ended_brings_no_item_back():
    clock = Clock()
    estimate = _one_small_item_done(clock, 1)
    assert estimate.step("small", "write", 0, 1) is None and not estimate.under_way


# ---------------------------------------------------------------------------
# The displays.


def test_a_log_prints_where_a_long_item_is_when_it_would_be_silent_but_never_spams():
    clock, stream = Clock(), io.StringIO()
    display = LogDisplay(stream, clock=clock, tick_seconds=None)
    display.start("r1", 2)
    display.stage("small", "read", 1_000_000, 1_000_000)
    clock.now += 20
    display.item(1, 2, _done("small", 1000, 1000, read=1.0, stage1=8.0, stage2=6.0, merge=4.0, write=1.0))
    display.stage("astronaut", "read", 24_000_000, 24_000_000)
    display.stage("astronaut", "merge", 10, 1000)
    assert len(stream.getvalue().splitlines()) == 2  # the header and the small item's line
    clock.now += PHASE_LINE_SECONDS + 1
    display.stage("astronaut", "merge", 400, 1000)
    for _ in range(5):  # more steps soon after: no more lines
        clock.now += 1
        display.stage("astronaut", "merge", 410, 1000)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(r"  astronaut: merge 40% · 1m0\ds on it · 1 of 2 done · \d+m\d\ds left", lines[2]), lines[2]
    # A phase with no steps of its own (the master's encode): the ticks keep the log going.
    display.stage("astronaut", "master", 0, 1)
    clock.now += PHASE_LINE_SECONDS + 1
    display.tick()
    display.tick()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[3].startswith("  astronaut: master encode · 2m"), lines
    display.item(2, 2, _done("astronaut", 6000, 4000, read=3.0, stage1=8.0, stage2=6.0, merge=300.0, write=50.0))
    clock.now += 10 * PHASE_LINE_SECONDS
    display.tick()  # nothing under way: nothing to say
    assert stream.getvalue().splitlines()[-1].startswith("[2/2] astronaut done v1")


def test_the_log_display_ticks_on_its_own_thread():
    clock, stream = Clock(), io.StringIO()
    display = LogDisplay(stream, clock=clock, tick_seconds=0.01)
    display.start("r1", 1)
    display.stage("astronaut", "access", 0, 1)
    clock.now += PHASE_LINE_SECONDS + 1
    try:
        deadline = time.monotonic() + 30
        while "astronaut: access encode" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "  astronaut: access encode · 1m01s on it · 0 of 1 done · ? left" in stream.getvalue()
    finally:
        display.close()
    assert display.stopped.is_set()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_merge_shows_its_percentage_and_the_run_bar_the_pixel_weighted_time_left():
    clock = Clock()
    display = TerminalDisplay(_Terminal(), clock=clock)
    try:
        display.start("r1", 2)
        display.stage("small", "read", 1_000_000, 1_000_000)
        clock.now += 20
        display.item(1, 2, _done("small", 1000, 1000, read=1.0, stage1=8.0, stage2=6.0, merge=4.0, write=1.0))
        display.stage("astronaut", "read", 100_000_000, 100_000_000)
        display.stage("astronaut", "merge", 400, 1000)
        tasks = {task.id: task for task in display.progress.tasks}
        assert [task.description for task in tasks.values()] == ["run r1", "  astronaut: merge 40%"]
        column = display.progress.columns[-1]
        shown = column.render(tasks[display.run_task]).plain
        hours, minutes, seconds = map(int, shown.split(":"))
        # The merge and writes of 100 Mpx at the small item's rate, not the 20 s the small item took.
        assert hours * 3600 + minutes * 60 + seconds >= 100 * 5 * 0.9
    finally:
        display.close()


def test_the_single_image_bars_start_a_new_merge_per_version_and_fill_each_encode(capsys):
    from diffcolor.cli import _Bars

    bars = _Bars(True)
    bars("read", 1_000_000, 1_000_000)  # the size, not a loop: no bar
    seen = []
    for version in (1, 2):
        bars("versions", version, 2)
        for rows in (400, 800, 1200, 1800):
            bars("merge", rows, 1800)
        seen.append(bars.bars["merge"])
        for phase in ("master", "access", "write"):
            bars(phase, 0, 1)
            seen.append(bars.bars[phase])
    bars.close()
    assert "read" not in bars.bars
    first_merge, second_merge = seen[0], seen[4]
    assert first_merge is not second_merge and first_merge.n == second_merge.n == 1800
    assert all(bar.n == bar.total == 1 for bar in seen if bar.total == 1)  # every encode's bar filled
    capsys.readouterr()
