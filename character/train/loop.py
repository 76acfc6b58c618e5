"""The one training loop, written once against the Tinker-shaped interface.

Flat and resumable, like tinker-cookbook's sl_loop (`train`, on top): resume from the last recorded
state, build the batch, submit forward/backward and the optimizer step before waiting on either,
log, save every N steps. Progress lives in `<run_dir>/checkpoints.jsonl`; a state URI is recorded
only after the state is fully written, so a crash at any point resumes from a complete state.
Steps after the last save are redone on resume, and their metrics rows from the interrupted run
are dropped.

Recovery from a failed training call follows the Tinker SDK's semantics: forward/backward and the
optimizer step are submitted before either is awaited, so when one fails, later calls may already
have run without it (a step on no gradients), and a failed `forward_backward_custom` poisons the
client (every later request raises a RuntimeError chained to the first error). Making the call again
on the same client is therefore never safe. Instead, any transient failure of a training call
(forward/backward, custom loss, optimizer step, save) drops the client and resumes on a fresh one
from the last saved state (`create_training_client_from_state_with_optimizer`; the start client if
nothing was saved yet), replaying the steps since: `_recovering`, the one call around the normal
path. `save_every` bounds what a replay costs; `max_recoveries` bounds how often a run recovers in a
row without reaching a new save before the error goes up (to Prefect's retry). A result that never
comes counts as such a failure: on Tinker every wait is bounded (CHARACTER_TINKER_RESULT_TIMEOUT_S),
and running out of time raises a transient error, so a stalled service costs a recovery, never a hang.

Each metrics row holds the forward/backward's metrics and the optimizer step's `grad_norm` (the
local backend's dict, Tinker's `OptimStepResponse.metrics`). The run's final record notes the LoRA
alpha the backend trained with when it says (Tinker fixes its own).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tinker import types

from character.backend import Future, ServiceClient, TrainingClient
from character.backend.errors import is_transient
from character.backend.retry import retry_transient
from character.build.paths import RunPaths
from character.config import OptimConfig  # noqa: F401 - defined without torch, for fast validation
from character.storage import append_jsonl, read_jsonl, uri_to_path, write_text_atomic

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup, then cosine from the peak down to min_lr_ratio x peak."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = cfg.min_lr_ratio
    return cfg.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_order(n: int, cfg: OptimConfig) -> list[list[int]]:
    """Shuffled example indices per step, derived from the seed alone (so a resumed run sees the same order)."""
    batches = []
    for epoch in range(cfg.epochs):
        idx = list(range(n))
        random.Random(cfg.seed * 1000 + epoch).shuffle(idx)
        batches += [idx[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return batches


@dataclass
class TrainResult:
    state: str  # resumable training state (weights + optimizer)
    sampler: str  # weights for sampling / a PEFT adapter
    steps: int
    resumed_from: int = 0
    metrics: list[dict] = field(default_factory=list)
    lora_alpha: int | None = None  # the alpha the backend trained with, where it says (Tinker)


SubmitFn = Callable[[TrainingClient, Sequence[Any]], Future[types.ForwardBackwardOutput]]


def train(
    service: ServiceClient,
    start: Callable[[], TrainingClient],
    examples: Sequence[Any],
    submit: SubmitFn,
    cfg: OptimConfig,
    run_dir: Path,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> TrainResult:
    """Train on `examples` (one epoch per cfg.epochs); `submit` turns a batch into a forward/backward call."""
    if not examples:
        raise ValueError("no training examples")
    batches = batch_order(len(examples), cfg)
    run = _Run.resume(RunPaths(Path(run_dir)), total=len(batches))
    if run.finished is not None:
        return run.finished

    def steps(client: TrainingClient) -> str:
        """The normal path: every step from the resume point on, then the weights for sampling."""
        run.lora_alpha = getattr(client, "lora_alpha", None)
        for step in range(run.done, run.total):
            row = _step(client, examples, batches[step], submit, step, run.total, cfg)
            run.log(row)
            if (step + 1) % cfg.save_every == 0 or step + 1 == run.total:
                run.saved(step + 1, client.save_state(f"step-{step + 1:06d}").result().path, cfg.keep_states)
            run.done = step + 1
            if on_step is not None:
                on_step(run.done, run.total, row)
        return client.save_weights_for_sampler("final").result().path

    sampler = _recovering(steps, run, lambda: run.fresh_client(service, start), cfg.max_recoveries)
    return run.finish(sampler)


def _recovering(
    body: Callable[[TrainingClient], str], run: _Run, fresh_client: Callable[[], TrainingClient], max_recoveries: int
) -> str:
    """`body` on a client; after a transient failure, again on a fresh client from the last save (the module
    docstring says why never on the same client), at most `max_recoveries` times in a row without a new save."""
    client = fresh_client()
    while True:
        try:
            return body(client)
        except Exception as e:  # noqa: BLE001 - classification decides
            if not is_transient(e) or run.recoveries >= max_recoveries:
                raise
            run.rewind(e, max_recoveries)
            client = None  # the failed client may be poisoned or have run later calls without the failed one
            client = fresh_client()


@dataclass
class _Run:
    """Where a run stands: what its folder records, and the steps done since it (re)started."""

    paths: RunPaths
    total: int
    first: int  # the step this call resumed from
    state: str | None  # the last recorded state; None: nothing saved yet
    finished: TrainResult | None = None  # the result of a run that had already finished
    saved_step: int = 0
    done: int = 0  # steps done, the next one's index
    recoveries: int = 0  # in a row, without a new save
    metrics: list[dict] = field(default_factory=list)
    lora_alpha: int | None = None

    @classmethod
    def resume(cls, paths: RunPaths, total: int) -> _Run:
        """From the last recorded save (or the start); steps after it are redone, so their rows are dropped."""
        records = read_jsonl(paths.saves)
        last = records[-1] if records else None
        if last and last.get("final"):
            result = TrainResult(
                last["state"], last["sampler"], total, resumed_from=total, lora_alpha=last.get("lora_alpha")
            )
            return cls(paths, total, total, last["state"], finished=result)
        first = last["step"] if last else 0
        _forget_metrics_after(paths.metrics, first)
        return cls(paths, total, first, last["state"] if last else None, saved_step=first, done=first)

    def fresh_client(self, service: ServiceClient, start: Callable[[], TrainingClient]) -> TrainingClient:
        """A client at the last recorded state, with its optimizer state (the start client if nothing was saved)."""
        if self.state is None:
            return retry_transient(start)
        return retry_transient(lambda: service.create_training_client_from_state_with_optimizer(self.state))

    def log(self, row: dict) -> None:
        """A finished step's metrics row, kept and appended to the run's metrics file."""
        self.metrics.append(row)
        append_jsonl(self.paths.metrics, row)

    def saved(self, step: int, state: str, keep: int) -> None:
        """Record the fully written state after `step` steps; older local states beyond `keep` go."""
        self.state, self.saved_step = state, step
        self.recoveries = 0  # progress was made: the bound is on recoveries in a row without a save
        append_jsonl(self.paths.saves, {"step": self.saved_step, "state": state})
        prune_states(self.paths.saves, keep)

    def rewind(self, error: Exception, max_recoveries: int) -> None:
        """Back to the last save after `error`: the steps since are lost work, to be redone."""
        self.recoveries += 1
        log.warning(
            "training call failed at step %d (%s: %s); resuming on a fresh client from step %d "
            "(recovery %d of at most %d)",
            self.done + 1,
            type(error).__name__,
            " ".join(str(error).split()),  # one line; backend errors are already redacted
            self.saved_step,
            self.recoveries,
            max_recoveries,
        )
        self.done = self.saved_step
        self.metrics = [r for r in self.metrics if r["step"] <= self.saved_step]
        _forget_metrics_after(self.paths.metrics, self.saved_step)

    def finish(self, sampler: str) -> TrainResult:
        """Record the run as finished: a rerun returns this result at once."""
        row = {"step": self.total, "state": self.state, "sampler": sampler, "final": True}
        if self.lora_alpha is not None:
            row["lora_alpha"] = self.lora_alpha
        append_jsonl(self.paths.saves, row)
        return TrainResult(
            self.state, sampler, self.total, resumed_from=self.first, metrics=self.metrics, lora_alpha=self.lora_alpha
        )


def prune_states(log_path: Path, keep: int) -> list[str]:
    """Retention: delete the local resumable states (LoRA + optimizer) of all but the newest `keep` saves
    recorded in `log_path`. Called after a save is recorded, so what is left always resumes; the
    newest (at the end, the final state) is never deleted. Tinker states stay on the service."""
    saved = list(dict.fromkeys(r["state"] for r in read_jsonl(log_path) if r.get("state")))
    removed = []
    for uri in saved[:-keep]:
        path = uri_to_path(uri) if uri.startswith("file://") else None
        if path is not None and path.is_dir():
            shutil.rmtree(path)
            removed.append(uri)
    return removed


def _step(
    client: TrainingClient,
    examples: Sequence[Any],
    indices: list[int],
    submit: SubmitFn,
    step: int,
    total: int,
    cfg: OptimConfig,
) -> dict:
    """One optimizer step: forward/backward and the optimizer step submitted before waiting on either."""
    t0 = time.perf_counter()
    batch = [examples[i] for i in indices]
    lr = lr_at(step, total, cfg)
    adam = types.AdamParams(
        learning_rate=lr,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        grad_clip_norm=cfg.grad_clip_norm,
    )
    fb = submit(client, batch)
    opt = client.optim_step(adam)
    out, opt_out = fb.result(), opt.result()
    grad_norm = _grad_norm(opt_out)
    return {
        "step": step + 1,
        "total": total,
        "lr": lr,
        **out.metrics,
        **({"grad_norm": grad_norm} if grad_norm is not None else {}),
        "seconds": round(time.perf_counter() - t0, 4),
    }


def _grad_norm(opt_out: Any) -> float | None:
    """The gradient norm an optimizer step reports: a dict locally, `OptimStepResponse.metrics` on Tinker
    (where the name may carry a prefix or a reduction suffix, e.g. `optim/grad_norm:mean`)."""
    metrics = opt_out if isinstance(opt_out, dict) else getattr(opt_out, "metrics", None) or {}
    for key, value in metrics.items():
        if key.rsplit("/", 1)[-1].split(":", 1)[0] == "grad_norm":
            return float(value)
    return None


def _forget_metrics_after(path: Path, step: int) -> None:
    """Keep one metrics row per step: rows of steps after the resume point belong to lost work."""
    rows = read_jsonl(path)
    if any(r.get("step", 0) > step for r in rows):
        kept = [r for r in rows if r.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
