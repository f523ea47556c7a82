"""The one place progress reaches the terminal: a live display on stderr.

On a TTY it is a rich display (a bar with a percentage and an ETA, or one line of
text) that redraws itself in place and is gone when it closes; a log record written
meanwhile goes above it, never through it.  Anywhere else (a pipe, a CI log) it is a
log line at most every `every` seconds.  Its feeds say what to show: a kernel
build (lab.kernels.kbuild.Progress) and a run's targets (lab.session.Progress).

stdout is never written: with --json it carries the document alone.  `-q` (logging
above INFO) silences the display as it silences every other line of narration.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any

from lab.run import log

# rich allows one live display at a time; a second one while it is up shows plain lines
_active_lock = threading.Lock()
_active: Display | None = None


class Display:
    """Progress on stderr, from any thread.  bar: a label, for a bar (update's completed and
    total); None for one line of text.  refresh: a TTY's redraws per second; every: seconds
    between plain lines.  Close it
    (or use it as a context manager) so that Ctrl-C or an error leaves no line behind."""

    def __init__(self, enabled: bool, *, every: float = 10.0, bar: str | None = None,
                 refresh: float = 2.0, stream: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and log.isEnabledFor(logging.INFO)
        self.tty = self.enabled and self.stream.isatty()
        self.every = every
        self.bar = bar
        self.refresh = refresh
        self.clock = clock                  # for the throttle of plain lines
        self.closed = False
        self._lock = threading.RLock()      # re-entered when Ctrl-C lands inside update()
        self._last: float | None = None
        self._rich: Any = None
        self._task: Any = None
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    def update(self, text: str | Callable[[], str], *, completed: float = 0, total: float | None = None,
               current: str = "") -> None:
        """What to show now: text (or a function giving it; called only when it is shown) and,
        for a bar, its position.  On a TTY the display redraws it; elsewhere a log line, at
        most every `every` seconds (the first at once)."""
        if not self.enabled:
            return
        with self._lock:
            if self.closed:
                return
            if self.tty and self._live():
                if self.bar is None:
                    self._rich.update(self._task, description=text() if callable(text) else text)
                else:
                    self._rich.update(self._task, completed=completed, total=total, current=current)
                if not self._rich.live.is_started:
                    self._rich.start()          # after the first update, so its first frame has it
                return
            now = self.clock()
            if self._last is not None and now - self._last < self.every:
                return
            self._last = now
            log.info("%s", text() if callable(text) else text)

    def note(self, text: str) -> None:
        """A line that stays (above the live display on a TTY)."""
        if self.enabled:
            log.info("%s", text)

    def _live(self) -> bool:
        """The rich display, started on first use; False if another one is up."""
        global _active
        if self._rich is not None:
            return True
        with _active_lock:
            if _active is not None:
                self.tty = False
                return False
            _active = self
        from rich.console import Console
        from rich.file_proxy import FileProxy
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)

        console = Console(file=self.stream)
        columns: tuple[ProgressColumn | str, ...]
        if self.bar is None:
            columns = (TextColumn("{task.description}", markup=False),)
        else:
            label = self.bar.replace("{", "{{").replace("}", "}}")     # a format string to rich
            columns = (TextColumn(label, markup=False), BarColumn(), TaskProgressColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                       TextColumn("{task.fields[current]}", markup=False))
        # stdout stays as it is (with --json it is the document); what else is written to
        # stderr meanwhile (rich's proxy there, and the log handlers') goes above the display
        self._rich = Progress(*columns, console=console, transient=True, redirect_stdout=False,
                              redirect_stderr=True, refresh_per_second=self.refresh)
        self._task = self._rich.add_task("", total=None, current="")
        proxy = FileProxy(console, self.stream)
        for logger in (logging.getLogger(), log):
            for h in logger.handlers:
                if isinstance(h, logging.StreamHandler) and h.stream is self.stream:
                    self._handlers.append((h, h.setStream(proxy)))
        return True

    def close(self) -> None:
        """Stop the display and clear its line (idempotent)."""
        global _active
        with self._lock:
            if self.closed:
                return
            self.closed = True
            live, self._rich = self._rich, None
        if live is None:
            return
        try:
            live.stop()
        finally:
            for h, old in self._handlers:
                h.setStream(old)
            self._handlers.clear()
            with _active_lock:
                _active = None

    def __enter__(self) -> Display:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
