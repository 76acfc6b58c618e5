"""The frame every stage of a build runs in (character.build.stages), so a stage's body holds only
its own work: a stage recorded as finished, with its output still present, is not redone; else the
body runs with a `StageRun`, which opens the backend service when first asked, times the stage's
work, reports it as progress, and records what the body produced with the seconds it took.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Iterator

from character import progress
from character.build.record import read_record, record_stage
from character.config import PipelineConfig
from character.storage import uri_to_path


def finished(cfg: PipelineConfig, stage: str, quiet: bool = False) -> dict | None:
    """The record of a finished stage whose output is still there (a rerun skips it, and says so)."""
    done = read_record(cfg).get("stages", {}).get(stage)
    if not done:
        return None
    for key in ("path", "sampler", "state"):
        value = done.get(key)
        if value and not value.startswith("tinker://") and not uri_to_path(value).exists():  # tinker:// lives there
            progress.note(stage, f"recorded as finished, but {value} is gone: doing it again")
            return None
    if not quiet:
        progress.note(stage, f"skipped: finished at {done['finished_at'][:19]}Z and its output is present")
    return done


class StageRun:
    """One run of one stage, handed to its body: the config, the backend service (opened on first
    use), and the clock of the stage's own work, whose seconds `record` adds to what the body records."""

    def __init__(self, cfg: PipelineConfig, name: str, open_service: Callable[[PipelineConfig], object]):
        self.cfg, self.name = cfg, name
        self._open_service, self._svc = open_service, None
        self._started: float | None = None

    @property
    def service(self):
        """The backend service, every token it uses counted (character.cost.meter) for the record."""
        if self._svc is None:
            from character.cost.meter import TokenMeter, metered

            self._svc = metered(self._open_service(self.cfg), TokenMeter(), self.cfg.base_model)
        return self._svc

    @contextlib.contextmanager
    def working(self, total: int | None = None) -> Iterator[None]:
        """The stage's own work (not the models it loads first): timed, and reported as its progress."""
        self._started = time.perf_counter()
        with progress.stage(self.name, total=total):
            yield

    def record(self, value: dict) -> None:
        """The stage is finished: record `value`, and the seconds since its work started (if timed)."""
        timed = {} if self._started is None else {"seconds": round(time.perf_counter() - self._started, 2)}
        counted = {} if self._svc is None else {"tokens": self._svc.meter.snapshot()}
        record_stage(self.cfg, self.name, {**value, **timed, **counted})


def output_path(done: dict) -> str:
    return done["path"]


def framed(name: str, open_service: Callable, resume: Callable[[dict], object] | None = output_path):
    """`@framed(name, open_service)` on `body(run: StageRun, *args)` makes the stage `stage(cfg, *args)`:
    if the stage is recorded as finished with its output present it returns `resume(record entry)`, else
    the body's value. `resume=None`: the body decides itself whether earlier work still holds."""

    def frame(body):
        @functools.wraps(body)
        def stage(cfg: PipelineConfig, *args, **kwargs):
            if resume is not None and (done := finished(cfg, name)):
                return resume(done)
            return body(StageRun(cfg, name, open_service), *args, **kwargs)

        return stage

    return frame


def training_progress(*on_step):
    """Training steps as progress of the current stage, then each of the callbacks given (None: none)."""

    def both(step: int, total: int, metrics: dict) -> None:
        progress.update(step, total)
        for hook in on_step:
            if hook is not None:
                hook(step, total, metrics)

    return both
