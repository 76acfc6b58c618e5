"""Experiment tracking: a build's training stages and its evaluation as runs in Weights & Biases.

Optional (`pip install -e '.[wandb]'`) and off unless a build names a project (`--wandb PROJECT`,
CHARACTER_WANDB_PROJECT); wandb is imported only then. Each training stage is one run (its config,
every metrics row as metrics.jsonl holds it, the learning rate of each step), the evaluation another
(the metrics table, the report's figures, sample generations); the runs of one build share a group.
A run's id is derived from persona, build id and stage, and opened with `resume="allow"`, so a
resumed build adds to its runs instead of starting duplicates. Tracking never stops a build: when
W&B cannot start a run, a warning says so and the stage runs untracked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

from character.config import PipelineConfig
from character.errors import UserError

log = logging.getLogger(__name__)
INSTALL = "pip install -e '.[wandb]' (or pip install wandb)"


def check_tracking(cfg: PipelineConfig) -> None:
    """Before a build starts: a project named without wandb installed is one line saying how to install it."""
    if not cfg.wandb_project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"--wandb {cfg.wandb_project}: Weights & Biases is not installed; {INSTALL}") from None


def run_id(cfg: PipelineConfig, stage: str) -> str:
    """The same for every run of one build's stage (W&B ids: letters, digits, '-', at most 64)."""
    key = f"{cfg.constitution().name}/{cfg.build_id}/{stage}"
    return f"{stage}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


class Tracker:
    """One stage's run; without a project (or when W&B would not start) every call does nothing."""

    def __init__(self, run=None):
        self.run = run
        self.last = -1 if run is None else run.step - 1  # a resumed run (online) starts after its history

    def log(self, row: dict) -> None:
        """A training step's metrics row, at its step. A step already logged (redone after a recovery in
        this process) is not logged again: W&B's history cannot go back, so it keeps the first values."""
        if self.run is None or row["step"] <= self.last:
            return
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log(values, step=int(row["step"]))
        self.last = int(row["step"])

    def __call__(self, done: int, total: int, row: dict) -> None:  # as the training loop's on_step
        self.log(row)


@contextlib.contextmanager
def tracked(cfg: PipelineConfig, stage: str, config: dict | None = None) -> Iterator[Tracker]:
    """The stage's run, open while the stage works; finished with a failure code when the stage fails."""
    run = _start(cfg, stage, config or {}) if cfg.wandb_project else None
    try:
        yield Tracker(run)
    except BaseException:
        if run is not None:
            run.finish(exit_code=1)
        raise
    if run is not None:
        run.finish()


def _start(cfg: PipelineConfig, stage: str, config: dict):
    import wandb

    name = cfg.constitution().name
    try:
        return wandb.init(
            project=cfg.wandb_project,
            id=run_id(cfg, stage),
            resume="allow",
            name=f"{name} {cfg.build_id} {stage}",
            group=f"{name}/{cfg.build_id}",
            job_type=stage,
            tags=[name, cfg.mode, cfg.backend],
            config={**_build_config(cfg), **config},
            reinit="create_new",  # paper mode trains DPO and SFT at once, each its own run
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
    except Exception as e:  # noqa: BLE001 - no login, no network: the build goes on untracked
        log.warning("Weights & Biases run for %s not started (%s: %s); going on untracked", stage, type(e).__name__, e)
        return None


def _build_config(cfg: PipelineConfig) -> dict:
    keep = ("mode", "scale", "backend", "base_model", "teacher_model", "build_id", "seed", "lora_rank", "lora_alpha")
    return {"persona": cfg.constitution().name, **cfg.model_dump(mode="json", include=set(keep))}


def training_config(stage: str, optim) -> dict:
    """A training run's own config: the stage's optimizer and schedule (peak, warmup_ratio, min_lr_ratio);
    the learning rate each step used is in its metrics row."""
    return {"stage": stage, **optim.model_dump(mode="json")}


def log_evaluation(cfg: PipelineConfig, result: dict) -> None:
    """The evaluation's run: the metrics table (one row per model), each headline number in the summary,
    the report's figures, and sample generations (every model's answer to each held-out prompt)."""
    if not cfg.wandb_project:
        return
    with tracked(cfg, "eval") as t:
        if t.run is not None:
            try:
                _log_evaluation(t.run, result)
            except Exception as e:  # noqa: BLE001 - the evaluation is recorded; its copy in W&B is a convenience
                log.warning("evaluation not logged to Weights & Biases (%s: %s)", type(e).__name__, e)


def _log_evaluation(run, result: dict) -> None:
    import wandb

    rows = result.get("report", {}).get("table") or []
    columns = list(dict.fromkeys(k for r in rows for k in r))
    run.log({"metrics": wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows])})
    run.summary.update({f"{r['model']}/{k}": v for r in rows for k, v in r.items() if isinstance(v, (int, float))})
    for path in result.get("report", {}).get("plots", []):
        run.log({f"figures/{Path(path).stem}": wandb.Image(path)})
    if gens := result.get("generations"):
        models = list(gens[0]["answers"])
        data = [[g["prompt"], *(g["answers"][m]["text"] for m in models)] for g in gens]
        run.log({"generations": wandb.Table(columns=["prompt", *models], data=data)})


def _cell(value):
    """A table cell W&B takes as it is; lists and dicts as their JSON."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)
