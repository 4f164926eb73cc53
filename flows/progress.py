"""What an operator sees while a collection or reprocess run is under way.

The flows tell their progress listeners (``flows.runs.PROGRESS_LISTENERS``) when
a run starts, when each item ends and every step of the items under way; the
command line hangs one of these displays there:

- on a terminal, :class:`TerminalDisplay` (rich): one bar for the run (items
  done of total, rate, time left) and one bar per item under way with its
  current stage (``stage1``, ``embedding``, ``finetune``, ``versions``);
- otherwise (a log file, a cron job, CI), :class:`LogDisplay`: one plain line
  per item (or per percent of a large run, at most one a second), with the
  same figures, so logs stay readable and grep-able.

On a terminal, log lines (Prefect's console lines among them) print through the
display, above its bars; they reach Prefect's API logs as before.

A display never fails a run: the flows ignore a listener that raises.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from typing import TextIO

STAGES = {"stage1": "colour prior", "embedding": "embedding", "finetune": "fine-tune", "versions": "writing"}
ITEM_LINES_UP_TO = 200  # runs of up to this many items get one log line per item; larger ones one per percent


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s")


class _Rate:
    """Items per second since the first item started, and the time left at that rate."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def figures(self, done: int, total: int) -> tuple[float | None, float | None]:
        elapsed = time.monotonic() - self.started
        if done <= 0 or elapsed <= 0:
            return None, None
        rate = done / elapsed
        return rate, max(0, total - done) / rate


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
    """Plain progress lines for a log: ``[12/100] camera done v1 · 0.4 items/s · 3m41s left``."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.rate = _Rate()
        self.last_line = 0.0
        self.run_id = ""

    def start(self, run_id: str, total: int) -> None:
        self.run_id, self.rate = run_id, _Rate()
        print(f"run {run_id}: {total} item{'' if total == 1 else 's'} to go through", file=self.stream, flush=True)

    def item(self, done: int, total: int, records: list[dict]) -> None:
        record = records[-1]
        every = 1 if total <= ITEM_LINES_UP_TO else max(1, total // 100)
        failed = record.get("status") not in ("done", "skipped_done")
        if not failed and done % every and done != total:
            return
        if not failed and total > ITEM_LINES_UP_TO and time.monotonic() - self.last_line < 1.0 and done != total:
            return
        self.last_line = time.monotonic()
        rate, left = self.rate.figures(done, total)
        speed = f"{rate:.2f} items/s" if rate is not None else "? items/s"
        print(f"[{done}/{total}] {record.get('item_id')} {_outcome(records)} · {speed} · {_duration(left)} left",
              file=self.stream, flush=True)

    def stage(self, item_id: str, phase: str, step: int, total: int) -> None:
        pass  # a log gets items, not steps

    def close(self) -> None:
        pass


class TerminalDisplay:
    """rich bars: the run's items, and one bar per item under way with its stage."""

    def __init__(self, stream: TextIO | None = None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(file=stream or sys.stderr)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self.run_task = None
        self.items: dict[str, int] = {}
        self.rate = _Rate()
        self.lock = threading.Lock()  # steps arrive on the pool's thread, items on the flow's
        self.progress.start()
        self.rerouted = _route_log_handlers(stream or sys.stderr, self.console)

    def start(self, run_id: str, total: int) -> None:
        with self.lock:
            self.rate = _Rate()
            self.run_task = self.progress.add_task(f"run {run_id}", total=total, note="")

    def item(self, done: int, total: int, records: list[dict]) -> None:
        record = records[-1]
        with self.lock:
            task = self.items.pop(record.get("item_id"), None)
            if task is not None:
                self.progress.remove_task(task)
            if record.get("status") not in ("done", "skipped_done"):
                self.console.print(f"[red]{record.get('item_id')}: {_outcome(records)}[/red]", markup=True,
                                   highlight=False)
            if self.run_task is not None:
                rate, _ = self.rate.figures(done, total)
                self.progress.update(self.run_task, completed=done, total=total,
                                     note=f"{rate:.2f} items/s" if rate else "")

    def stage(self, item_id: str, phase: str, step: int, total: int) -> None:
        with self.lock:
            task = self.items.get(item_id)
            label = f"  {item_id}: {STAGES.get(phase, phase)}"
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
