"""What an operator sees while a collection or reprocess run is under way.

The flows tell their progress listeners (``flows.runs.PROGRESS_LISTENERS``) when
a run starts, when each item ends and every step of the items under way; the
command line hangs one of these displays there:

- on a terminal, :class:`TerminalDisplay` (rich): one bar for the run (items
  done of total, rate, time left) and one bar per item under way with its
  current stage (``stage1``, ``embedding``, ``finetune``, ``versions``, then per
  version ``merge`` with its percentage, ``master`` and ``access`` encodes and
  ``write``);
- otherwise (a log file, a cron job, CI), :class:`LogDisplay`: one plain line
  per item (or per percent of a large run, at most one a second), with the
  same figures, so logs stay readable and grep-able; and when no line has been
  printed for ``PHASE_LINE_SECONDS`` while items are under way (a large scan's
  merge, a long fine-tune), one line per item under way saying where it is, so
  a log never sits silent on a long phase.

On a terminal, log lines (Prefect's console lines among them) print through the
display, above its bars; they reach Prefect's API logs as before.

Time left (:class:`WorkEstimate`). An item's work has two parts: the fit (stage
1, alignment, stage 2, renders), whose cost does not depend on the scan's size,
and the pixel work (read, full-resolution merge, encodes and writes), which
grows with its pixels. The records of each finished item time both
(``seconds``) and give its size (``source``), so the estimate learns from the
items done the mean fit seconds per item F and the read's, merge's and writes'
seconds per pixel. An item's pixels are its own once it reports them (phase
``read``, right after its source is read) or when a flow knows them before (a
listener's ``size(item_id, pixels)``), else the mean size seen so far.

- An item not started has F plus its pixels' read, merge and writes to do.
- An item under way has what is left of its current phase, then the phases
  after it: in the fit, the rest of F (at least what its loop's own pace says)
  then its merge and writes; in its merge, what the merge's own pace says (a
  merge at 40 % after two minutes has three to go), else its expected merge
  less the time it has run, then its writes; in its writes, its expected writes
  less the time they have run.

The run's pace turns that work into time: wall time elapsed over the work done
(finished items' timed work plus the time of the items under way), which
counts the workers running side by side and whatever the records do not time.
The time left is the work left at that pace, never less than the longest item
under way has left nor than the largest waiting item takes on its own: a large
item left at the end is not shared out among idle workers. Until an item has
finished with timed records it is items left over items per second; when every
item left is under way and past what it was expected to take, it is unknown
(``?``), not zero. The per-pixel rates learned from small photographs carry
their fixed overheads, so a large scan's first estimate errs long; its merge's
own pace corrects it as soon as the merge reports.

A display never fails a run: the flows ignore a listener that raises.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, TextIO

STAGES = {"read": "preparing", "stage1": "colour prior", "embedding": "embedding", "finetune": "fine-tune",
          "versions": "rendering", "merge": "merge", "master": "master encode", "access": "access encode",
          "write": "writing"}
ITEM_LINES_UP_TO = 200  # runs of up to this many items get one log line per item; larger ones one per percent
PHASE_LINE_SECONDS = 60.0  # a log silent this long while items are under way gets one line per item under way
_WRITES = ("master", "access", "write")  # the phases of a version's writes, after its merge
PIXEL_SECONDS = ("read", "merge", "write")  # the record's ``seconds`` that grow with the pixels (the rest: the fit)
FINISHED_KEPT = 10_000  # ids of finished items remembered, so a step that arrives after its item ended is ignored


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s")


def _timed_work(records: list[dict]) -> tuple[float, dict[str, float], int] | None:
    """(fit seconds, {"read", "merge", "write": seconds}, pixels) of a finished item from its records'
    ``seconds`` and ``source``; None when they time nothing (a skipped or failed item). Every version's record
    repeats the fit's and the read's seconds: they count once, the renders, merges and writes once per version."""
    timed = [record for record in records if record.get("status") == "done" and record.get("seconds")]
    if not timed:
        return None
    fit, pixel = 0.0, dict.fromkeys(PIXEL_SECONDS, 0.0)
    for index, record in enumerate(timed):
        for key, value in record["seconds"].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                continue
            if key in PIXEL_SECONDS:
                if key != "read" or index == 0:
                    pixel[key] += value
            elif index == 0 or key == "render":
                fit += value
    source = timed[0].get("source") or {}
    try:
        pixels = max(0, int(source.get("width") or 0) * int(source.get("height") or 0))
    except (TypeError, ValueError):
        pixels = 0
    return fit, pixel, pixels


@dataclass
class _UnderWay:
    """An item under way, as its steps tell it."""

    started: float  # when its first step arrived
    phase: str = ""
    phase_started: float = 0.0  # when the phase's first step arrived
    first_step: int = 0  # the phase's step then
    step: int = 0
    total: int = 0
    last_step: float = 0.0  # when the latest step arrived
    writes_started: float = 0.0  # when the current version's master encode began

    def phase_left(self, now: float) -> float | None:
        """Seconds the current phase has left at its own pace since its first step; None without a pace."""
        if self.total <= 0 or self.step <= self.first_step or self.last_step <= self.phase_started:
            return None
        pace = (self.step - self.first_step) / (self.last_step - self.phase_started)  # steps per second
        return max(0.0, max(0, self.total - self.step) / pace - (now - self.last_step))

    def describe(self, steps: bool = True) -> str:
        """``merge 40%``, ``fine-tune 30/100`` (``fine-tune`` without ``steps``), ``master encode``."""
        name = STAGES.get(self.phase, self.phase)
        if self.phase == "merge" and self.total > 0:
            return f"{name} {min(100, 100 * self.step // self.total)}%"
        if steps and self.total > 1 and self.phase != "read":
            return f"{name} {self.step}/{self.total}"
        return name


@dataclass
class WorkEstimate:
    """The time left of a run, each item's work weighted by its pixels (see the module docstring).

    Thread-safe: steps arrive on the pool's thread, items on the flow's, a display's refresh on its own.
    ``clock`` is the time source (tests pass a fake one).
    """

    clock: Callable[[], float] = time.monotonic
    started: float = 0.0
    total: int = 0
    done: int = 0
    under_way: dict = field(default_factory=dict)  # item id -> _UnderWay
    sizes: dict = field(default_factory=dict)  # item id -> pixels, of items not yet finished
    finished: OrderedDict = field(default_factory=OrderedDict)  # ids of the last FINISHED_KEPT finished items
    fit_seconds: float = 0.0  # learned from the timed items: their fit seconds,
    pixel_seconds: dict = field(default_factory=lambda: dict.fromkeys(PIXEL_SECONDS, 0.0))  # pixel work's,
    timed_pixels: int = 0  # and pixels
    timed_items: int = 0
    work_done: float = 0.0  # seconds of work of the finished items (timed, else as they ran under way)
    seen_pixels: int = 0  # sizes reported so far, for the items of unknown size
    seen_items: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def start(self, total: int) -> None:
        with self.lock:
            self.started, self.total, self.done = self.clock(), total, 0
            self.under_way.clear()
            self.finished.clear()

    def size(self, item_id: str, pixels: int) -> None:
        """``item_id``'s source has ``pixels`` (known before it starts, or reported once read)."""
        with self.lock:
            self._size(item_id, pixels)

    def _size(self, item_id: str, pixels: int) -> None:
        if item_id in self.finished or pixels <= 0 or item_id in self.sizes:
            return
        self.sizes[item_id] = pixels
        self.seen_pixels += pixels
        self.seen_items += 1

    def step(self, item_id: str, phase: str, step: int, total: int) -> _UnderWay | None:
        """A step of an item under way; returns its state (None for an item already finished)."""
        now = self.clock()
        with self.lock:
            if item_id in self.finished:
                return None  # a step that arrived after its item ended
            item = self.under_way.get(item_id)
            if item is None:
                item = self.under_way[item_id] = _UnderWay(started=now)
            if phase == "read":
                self._size(item_id, total)
            if phase != item.phase or step < item.step:  # a new phase, or the same one again (the next version's)
                if phase in _WRITES and (item.phase not in _WRITES or step < item.step):
                    item.writes_started = now  # the version's writes begin (its master is encoded with its merge)
                item.phase, item.phase_started, item.first_step = phase, now, step
            item.step, item.total, item.last_step = step, total, now
            return item

    def finish(self, done: int, total: int, records: list[dict]) -> None:
        """An item ended with ``records``; ``done`` of ``total`` have."""
        now = self.clock()
        item_id = records[-1].get("item_id") if records else None
        with self.lock:
            self.done, self.total = done, total
            item = self.under_way.pop(item_id, None)
            pixels = self.sizes.pop(item_id, None)
            self.finished[item_id] = True
            while len(self.finished) > FINISHED_KEPT:
                self.finished.popitem(last=False)
            timed = _timed_work(records)
            if timed is None:
                self.work_done += 0.0 if item is None else now - item.started
                return
            fit, pixel, measured = timed
            measured = measured or pixels or 0
            if measured:
                for key, seconds in pixel.items():
                    self.pixel_seconds[key] += seconds
                self.timed_pixels += measured
            else:  # no size to share the pixel work by: it counts as the item's own
                fit += sum(pixel.values())
            self.fit_seconds += fit
            self.timed_items += 1
            self.work_done += fit + sum(pixel.values())

    def left(self) -> float | None:
        """Seconds the run has left; None when unknown."""
        now = self.clock()
        with self.lock:
            elapsed = now - self.started
            if self.timed_items == 0:  # nothing learned yet: items left over items per second
                if self.done <= 0 or elapsed <= 0:
                    return None
                return max(0, self.total - self.done) * elapsed / self.done
            fit = self.fit_seconds / self.timed_items
            per_pixel = {key: seconds / self.timed_pixels if self.timed_pixels else 0.0
                         for key, seconds in self.pixel_seconds.items()}
            mean_pixels = (self.seen_pixels / self.seen_items if self.seen_items
                           else self.timed_pixels / self.timed_items)

            def expected(pixels: float | None) -> float:
                return fit + sum(per_pixel.values()) * (mean_pixels if pixels is None else pixels)

            # 1. Items under way: what their phase has left (at its own pace when it has steps), and the rest.
            spent, under_way_left = 0.0, []
            for item_id, item in self.under_way.items():
                spent += now - item.started
                pixels = self.sizes.get(item_id, mean_pixels)
                writes = per_pixel["write"] * pixels
                if item.phase in _WRITES:
                    under_way_left.append(max(0.0, writes - (now - item.writes_started)))
                elif item.phase == "merge":
                    merge = item.phase_left(now)
                    if merge is None:
                        merge = max(0.0, per_pixel["merge"] * pixels - (now - item.phase_started))
                    under_way_left.append(merge + writes)
                else:  # the read, the fit's loops, a render: the fit's rest, then the merge and the writes
                    under_way_left.append(max(0.0, fit - (now - item.started), item.phase_left(now) or 0.0)
                                          + per_pixel["merge"] * pixels + writes)
            # 2. Items not started: their own size when known, else the mean.
            waiting = max(0, self.total - self.done - len(self.under_way))
            known = [pixels for item_id, pixels in self.sizes.items() if item_id not in self.under_way][:waiting]
            waiting_work = [expected(pixels) for pixels in known]
            work_left = sum(under_way_left) + sum(waiting_work) + (waiting - len(known)) * expected(None)
            # 3. At the run's pace, never less than one item's own share.
            work_so_far = self.work_done + spent
            if work_so_far <= 0:
                return None
            left = max([work_left * elapsed / work_so_far, *under_way_left, *waiting_work])
            if left < 0.5 and self.under_way and not waiting:
                return None  # the items under way are past their expected time: unknown, not "0s left"
            return left

    def figures(self, done: int, total: int) -> tuple[float | None, float | None]:
        """Items per second since the run started, and the time left."""
        elapsed = self.clock() - self.started
        rate = done / elapsed if done > 0 and elapsed > 0 else None
        return rate, self.left()


def _outcome(records: list[dict]) -> str:
    """How an item ended, from its records: "done v1, v2", "skipped (already done)", "failed: bad_image ..."."""
    record = records[-1]
    status = record.get("status", "?")
    if status == "done":
        return "done " + ", ".join(f"v{r.get('version')}" for r in records if r.get("status") == "done")
    if status == "skipped_done":
        return "skipped (already done)"
    return f"{status}: {record.get('error_class', '')} {record.get('error_message', '')}".strip()


class LogDisplay:
    """Plain progress lines for a log: ``[12/100] camera done v1 · 0.4 items/s · 3m41s left``, and while
    the log would otherwise be silent, ``  astronaut: merge 40% · 12m05s on it · 11 of 100 done · 3m41s left``.

    ``clock`` is the time source (tests pass a fake one); ``tick_seconds`` how often a thread looks for a
    silent log while the run is under way (None: no thread, :meth:`tick` is called by hand)."""

    def __init__(self, stream: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic,
                 tick_seconds: float | None = 5.0):
        self.stream = stream or sys.stderr
        self.clock, self.tick_seconds = clock, tick_seconds
        self.estimate = WorkEstimate(clock)
        self.last_line = clock()
        self.run_id = ""
        self.lock = threading.RLock()  # steps arrive on the pool's thread, items on the flow's, ticks on their own
        self.stopped = threading.Event()
        self.ticker: threading.Thread | None = None

    def _print(self, line: str) -> None:
        self.last_line = self.clock()
        print(line, file=self.stream, flush=True)

    def start(self, run_id: str, total: int) -> None:
        with self.lock:
            self.run_id = run_id
            self.estimate.start(total)
            self._print(f"run {run_id}: {total} item{'' if total == 1 else 's'} to go through")
        if self.tick_seconds and self.ticker is None:
            self.ticker = threading.Thread(target=self._ticking, daemon=True, name="progress-log")
            self.ticker.start()

    def size(self, item_id: str, pixels: int) -> None:
        self.estimate.size(item_id, pixels)

    def item(self, done: int, total: int, records: list[dict]) -> None:
        self.estimate.finish(done, total, records)
        record = records[-1]
        every = 1 if total <= ITEM_LINES_UP_TO else max(1, total // 100)
        failed = record.get("status") not in ("done", "skipped_done")
        with self.lock:
            if not failed and done % every and done != total:
                return
            if not failed and total > ITEM_LINES_UP_TO and self.clock() - self.last_line < 1.0 and done != total:
                return
            rate, left = self.estimate.figures(done, total)
            speed = f"{rate:.2f} items/s" if rate is not None else "? items/s"
            self._print(f"[{done}/{total}] {record.get('item_id')} {_outcome(records)} · {speed} · "
                        f"{_duration(left)} left")

    def stage(self, item_id: str, phase: str, step: int, total: int) -> None:
        self.estimate.step(item_id, phase, step, total)
        self.tick()

    def tick(self) -> None:
        """One line per item under way when the log has been silent for ``PHASE_LINE_SECONDS``."""
        with self.lock:
            now = self.clock()
            if now - self.last_line < PHASE_LINE_SECONDS:
                return
            with self.estimate.lock:
                under_way = sorted(self.estimate.under_way.items(), key=lambda pair: pair[1].started)
                lines = [(item_id, item.describe(), now - item.started) for item_id, item in under_way]
                done, total = self.estimate.done, self.estimate.total
            if not lines:
                return
            left = _duration(self.estimate.left())
            for item_id, where, running in lines:
                self._print(f"  {item_id}: {where} · {_duration(running)} on it · {done} of {total} done · "
                            f"{left} left")

    def _ticking(self) -> None:
        while not self.stopped.wait(self.tick_seconds):
            try:
                self.tick()
            except Exception:  # a display never fails a run, nor stops its own ticks
                pass

    def close(self) -> None:
        self.stopped.set()


def _run_time_left_column(display: "TerminalDisplay"):
    """rich's time-left column, the run's bar showing :class:`WorkEstimate`'s figure instead of rich's own
    (rich's counts items per second, whatever their size); an item's bar keeps rich's (its loop's pace)."""
    from rich.progress import TimeRemainingColumn
    from rich.text import Text

    class RunTimeLeft(TimeRemainingColumn):
        def render(self, task):
            if task.id != display.run_task or task.finished:
                return super().render(task)
            left = display.estimate.left()
            if left is None:
                return Text("-:--:--", style="progress.remaining")
            minutes, seconds = divmod(int(left), 60)
            hours, minutes = divmod(minutes, 60)
            return Text(f"{hours:d}:{minutes:02d}:{seconds:02d}", style="progress.remaining")

    return RunTimeLeft()


class TerminalDisplay:
    """rich bars: the run's items, and one bar per item under way with its stage."""

    def __init__(self, stream: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(file=stream or sys.stderr)
        self.estimate = WorkEstimate(clock)
        self.run_task = None
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), _run_time_left_column(self),
                                 console=self.console, transient=False)
        self.items: dict[str, int] = {}
        self.lock = threading.Lock()  # steps arrive on the pool's thread, items on the flow's
        self.progress.start()
        self.rerouted = _route_log_handlers(stream or sys.stderr, self.console)

    def start(self, run_id: str, total: int) -> None:
        with self.lock:
            self.estimate.start(total)
            self.run_task = self.progress.add_task(f"run {run_id}", total=total, note="")

    def size(self, item_id: str, pixels: int) -> None:
        self.estimate.size(item_id, pixels)

    def item(self, done: int, total: int, records: list[dict]) -> None:
        self.estimate.finish(done, total, records)
        record = records[-1]
        with self.lock:
            task = self.items.pop(record.get("item_id"), None)
            if task is not None:
                self.progress.remove_task(task)
            if record.get("status") not in ("done", "skipped_done"):
                self.console.print(f"[red]{record.get('item_id')}: {_outcome(records)}[/red]", markup=True,
                                   highlight=False)
            if self.run_task is not None:
                rate, _ = self.estimate.figures(done, total)
                self.progress.update(self.run_task, completed=done, total=total,
                                     note=f"{rate:.2f} items/s" if rate else "")

    def stage(self, item_id: str, phase: str, step: int, total: int) -> None:
        state = self.estimate.step(item_id, phase, step, total)
        if state is None:
            return  # the item has ended: no bar comes back for it
        with self.lock:
            task = self.items.get(item_id)
            label = f"  {item_id}: {state.describe(steps=False)}"  # the bar counts the steps
            if task is None:
                self.items[item_id] = self.progress.add_task(label, total=total, completed=step, note="")
            else:
                self.progress.update(task, description=label, total=total, completed=step)

    def close(self) -> None:
        with self.lock:
            for task in self.items.values():
                self.progress.remove_task(task)
            self.items.clear()
            _restore_log_handlers(self.rerouted)
            self.rerouted = []
            self.progress.stop()


def _same_file(one, other) -> bool:
    if one is other:
        return True
    try:
        return one.fileno() == other.fileno()
    except (AttributeError, OSError, ValueError):  # a StringIO, a closed file
        return False


class _ThroughConsole(io.TextIOBase):
    """A text stream whose lines ``console`` prints (above its live bars), their colours kept."""

    def __init__(self, console, stream: TextIO):
        from rich.ansi import AnsiDecoder

        self.console, self.stream, self.decoder, self.pending = console, stream, AnsiDecoder(), ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.console.print(self.decoder.decode_line(line), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.console.print(self.decoder.decode_line(self.pending), soft_wrap=True)
            self.pending = ""

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.stream.fileno()


def _route_log_handlers(stream: TextIO, console) -> list[tuple]:
    """Every logging handler that writes to ``stream`` (Prefect's console handler, a library's stderr
    handler) writes through ``console`` instead, so its lines print above the live bars rather than into
    them; Prefect's API log handlers are untouched. Returns what :func:`_restore_log_handlers` puts back."""
    import logging

    proxy = _ThroughConsole(console, stream)
    loggers = [logging.getLogger()] + [logger for logger in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(logger, logging.Logger)]
    rerouted = []
    for handler in {handler for logger in loggers for handler in logger.handlers}:
        if not isinstance(handler, logging.StreamHandler) or not _same_file(handler.stream, stream):
            continue
        own_console = getattr(handler, "console", None)  # Prefect's handler prints through its own rich Console
        rerouted.append((handler, handler.stream, own_console))
        handler.setStream(proxy)
        if own_console is not None and hasattr(own_console, "file"):
            own_console.file = proxy
    return rerouted


def _restore_log_handlers(rerouted: list[tuple]) -> None:
    for handler, stream, own_console in rerouted:
        handler.setStream(stream)
        if own_console is not None and hasattr(own_console, "file"):
            own_console.file = stream


def make_display(stream: TextIO | None = None):
    """A :class:`TerminalDisplay` when ``stream`` (stderr) is a terminal, else a :class:`LogDisplay`."""
    stream = stream or sys.stderr
    return TerminalDisplay(stream) if stream.isatty() else LogDisplay(stream)
