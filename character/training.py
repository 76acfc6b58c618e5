"""The one training loop, written once against the Tinker-shaped interface.

Flat and resumable, like tinker-cookbook's sl_loop: resume from the last recorded state, build
the batch, submit forward/backward and the optimizer step before waiting on either, log, save
every N steps. Progress lives in `<run_dir>/checkpoints.jsonl`; a state URI is recorded only
after the state is fully written, so a crash at any point resumes from a complete state.
A backend call that fails transiently is made again (`Call`); steps after the last save are
redone on resume, and their metrics rows from the interrupted run are dropped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tinker import types

from character.backend import Future, ServiceClient, TrainingClient
from character.backend.retry import Call, retry_transient
from character.config import OptimConfig  # noqa: F401 - defined without torch, for fast validation
from character.storage import append_jsonl, read_jsonl, uri_to_path, write_text_atomic


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
        batches += [idx[i: i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return batches


@dataclass
class TrainResult:
    state: str  # resumable training state (weights + optimizer)
    sampler: str  # weights for sampling / a PEFT adapter
    steps: int
    resumed_from: int = 0
    metrics: list[dict] = field(default_factory=list)


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
    run_dir = Path(run_dir)
    log_path = run_dir / "checkpoints.jsonl"
    batches = batch_order(len(examples), cfg)
    total = len(batches)

    records = read_jsonl(log_path)
    last = records[-1] if records else None
    if last and last.get("final"):
        return TrainResult(last["state"], last["sampler"], total, resumed_from=total)
    if last:
        client = retry_transient(lambda: service.create_training_client_from_state_with_optimizer(last["state"]))
        first = last["step"]
    else:
        client = retry_transient(start)
        first = 0
    _forget_metrics_after(run_dir / "metrics.jsonl", first)  # steps after the last save are redone

    metrics: list[dict] = []
    state = last["state"] if last else None
    for step in range(first, total):
        t0 = time.perf_counter()
        batch = [examples[i] for i in batches[step]]
        lr = lr_at(step, total, cfg)
        adam = types.AdamParams(learning_rate=lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                                weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm)
        fb = Call(lambda: submit(client, batch))
        opt = Call(lambda: client.optim_step(adam))
        out, opt_out = fb.result(), opt.result()
        row = {"step": step + 1, "total": total, "lr": lr, **out.metrics,
               **({"grad_norm": opt_out["grad_norm"]} if isinstance(opt_out, dict) and "grad_norm" in opt_out else {}),
               "seconds": round(time.perf_counter() - t0, 4)}
        metrics.append(row)
        append_jsonl(run_dir / "metrics.jsonl", row)
        if (step + 1) % cfg.save_every == 0 or step + 1 == total:
            state = Call(lambda: client.save_state(f"step-{step + 1:06d}")).result().path
            append_jsonl(log_path, {"step": step + 1, "state": state})
            prune_states(log_path, cfg.keep_states)
        if on_step is not None:
            on_step(step + 1, total, row)

    sampler = Call(lambda: client.save_weights_for_sampler("final")).result().path
    append_jsonl(log_path, {"step": total, "state": state, "sampler": sampler, "final": True})
    return TrainResult(state, sampler, total, resumed_from=first, metrics=metrics)


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


def _forget_metrics_after(path: Path, step: int) -> None:
    """Keep one metrics row per step: rows of steps after the resume point belong to lost work."""
    rows = read_jsonl(path)
    if any(r.get("step", 0) > step for r in rows):
        kept = [r for r in rows if r.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
