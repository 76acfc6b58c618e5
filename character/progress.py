"""Progress of long steps, reported by the core and shown by whoever listens (no Prefect here).

The core reports; it never prints:
    report("building the tiny model", step, total)    # a step that knows its name
    with stage("dpo data", total=n):                   # a pipeline stage...
        update(done)                                   # ...and code deep inside it that does not
    note("dpo data", "skipped: finished at ...")       # one line of news

Listeners are callables taking an `Event`, registered for a block with `listening(...)`. They live
in a context variable, so each thread that copies its parent's context (the nightly flow's
builds) reports to its own listeners. `ConsoleProgress` draws a bar on a terminal and writes a
line every few seconds otherwise; the Prefect tasks add a listener that updates artifacts.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO


@dataclass(frozen=True)
class Event:
    stage: str
    done: int | None = None
    total: int | None = None
    message: str | None = None  # a note instead of a count
    finished: bool = False


Listener = Callable[[Event], None]

_listeners: ContextVar[tuple[Listener, ...]] = ContextVar("character_progress_listeners", default=())


@dataclass
class _Stage:
    name: str
    total: int | None
    done: int = 0


_current: ContextVar[_Stage | None] = ContextVar("character_progress_stage", default=None)


def _emit(event: Event) -> None:
    for listener in _listeners.get():
        try:
            listener(event)
        except Exception:  # noqa: BLE001 - showing progress must never break the work itself
            pass


def report(stage_name: str, done: int, total: int | None = None, finished: bool | None = None) -> None:
    """`done` of `total` units of `stage_name` are finished."""
    _emit(
        Event(stage_name, done, total, finished=(total is not None and done >= total) if finished is None else finished)
    )


def note(stage_name: str, message: str) -> None:
    _emit(Event(stage_name, message=message))


@contextlib.contextmanager
def stage(name: str, total: int | None = None) -> Iterator[_Stage]:
    """A named stage for the block; `update()` inside it reports against this stage."""
    st = _Stage(name, total)
    _emit(Event(name, 0, total))  # started: a first line, and the clock for the elapsed time
    token = _current.set(st)
    try:
        yield st
    finally:
        _current.reset(token)
    _emit(Event(name, st.total or st.done, st.total, finished=True))  # only when the block succeeded


def update(done: int, total: int | None = None) -> None:
    """Progress of the current stage (nothing happens outside a `stage()` block)."""
    st = _current.get()
    if st is None:
        return
    st.done = done
    if total is not None:
        st.total = total
    _emit(Event(st.name, done, st.total))


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    token = _listeners.set(_listeners.get() + (listener,))
    try:
        yield
    finally:
        _listeners.reset(token)


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ConsoleProgress:
    """A bar redrawn in place on a terminal; elsewhere (CI, logs) a line every `every_s` seconds."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 10.0, width: int = 24, notes: bool = True):
        self.stream = stream or sys.stderr
        self.notes = notes  # off where a logger already shows them (the Prefect tasks log each note)
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s, self.width = every_s, width
        self._started: dict[str, float] = {}
        self._shown: dict[str, float] = {}
        self._bar_open = False

    def clear(self) -> None:
        """Take an open bar off its line, so that another writer's line starts in column 0; the next
        update draws the bar again below it."""
        if self._bar_open:
            self._write("\r\x1b[K")
            self._bar_open = False
            self._shown.clear()  # redraw at the next event, whatever the throttle says

    @contextlib.contextmanager
    def above_logs(self) -> Iterator[None]:
        """For the block, every logging handler that writes to a terminal clears the bar before its line
        (a log line appended to a bar would share its terminal line)."""
        if not self.tty:
            yield
            return
        guard = _ClearsBar(self)
        handlers = [h for h in _all_handlers() if _writes_to_terminal(h)]
        for h in handlers:
            h.addFilter(guard)
        try:
            yield
        finally:
            for h in handlers:
                h.removeFilter(guard)
            self.clear()

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _line(self, text: str) -> None:
        if self._bar_open:
            self._write("\n")
            self._bar_open = False
        self._write(text + "\n")

    def __call__(self, ev: Event) -> None:
        now = time.monotonic()
        if ev.message is not None:
            if self.notes:
                self._line(f"{ev.stage}: {ev.message}")
            return
        start = self._started.setdefault(ev.stage, now)
        elapsed = _fmt_seconds(now - start)
        count = f"{ev.done}/{ev.total}" if ev.total else f"{ev.done}"
        if self.tty:
            if not ev.finished and now - self._shown.get(ev.stage, 0.0) < 0.2:
                return
            self._shown[ev.stage] = now
            filled = int(self.width * min(1.0, (ev.done or 0) / ev.total)) if ev.total else 0
            bar = "#" * filled + "-" * (self.width - filled)
            self._write(f"\r{ev.stage} [{bar}] {count} {elapsed}\x1b[K")
            self._bar_open = True
            if ev.finished:
                self._write("\n")
                self._bar_open = False
                self._started.pop(ev.stage, None)
            return
        first = ev.stage not in self._shown
        if first or ev.finished or now - self._shown[ev.stage] >= self.every_s:
            self._shown[ev.stage] = now
            pct = f" ({100 * (ev.done or 0) // ev.total}%)" if ev.total else ""
            state = "done" if ev.finished else "progress"
            self._line(f"{ev.stage}: {state} {count}{pct} after {elapsed}")
            if ev.finished:
                self._started.pop(ev.stage, None)
                self._shown.pop(ev.stage, None)


class _ClearsBar(logging.Filter):
    def __init__(self, progress: ConsoleProgress):
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


def _all_handlers() -> list[logging.Handler]:
    loggers = [
        logging.getLogger(),
        *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)),
    ]
    return list({id(h): h for lg in loggers for h in lg.handlers}.values())


def _writes_to_terminal(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    try:
        return bool(stream is not None and stream.isatty())
    except (ValueError, AttributeError):  # a closed stream
        return False
