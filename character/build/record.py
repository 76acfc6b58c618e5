"""The build record (`record.json`): what each finished stage of a build produced, and when.

A stage writes its entry as soon as its output exists, so a rerun of the build skips it. The record
also keeps the config the build was started with: a build id names one set of inputs.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from character.build.paths import build_records
from character.config import PipelineConfig
from character.errors import UserError
from character.storage import write_json_atomic


class Checkpoint(BaseModel):
    stage: str
    state: str = Field(description="resumable training state URI")
    sampler: str = Field(description="sampler weights / adapter URI")
    steps: int

    @classmethod
    def from_record(cls, entry: dict) -> Checkpoint:
        """The checkpoint a finished stage recorded (its entry also holds timings and stats)."""
        return cls(**{k: entry[k] for k in cls.model_fields})


class PipelineResult(BaseModel):
    persona: str
    mode: Literal["sequential", "paper"]
    base_model: str
    workdir: str
    build_id: str
    checkpoints: dict[str, str]


def read_record(cfg: PipelineConfig) -> dict:
    path = cfg.paths.record
    return json.loads(path.read_text()) if path.is_file() else {}


def record_stage(cfg: PipelineConfig, stage: str, value: dict) -> None:
    rec = read_record(cfg) or {
        "persona": cfg.constitution().name,
        "build_id": cfg.build_id,
        "config": cfg.model_dump(mode="json"),
        "renderers": build_renderers(cfg),
        "stages": {},
    }
    rec["stages"][stage] = {**value, "finished_at": datetime.now(timezone.utc).isoformat()}
    write_json_atomic(cfg.paths.record, rec)


def recorded(cfg: PipelineConfig, stage: str, key: str) -> str | None:
    """A value a finished stage of this build recorded (e.g. its output path), if any."""
    return (read_record(cfg).get("stages", {}).get(stage) or {}).get(key)


def list_checkpoints(workdir: str | Path, persona: str | None = None) -> list[dict]:
    """Every checkpoint any build recorded in this workspace, newest first."""
    rows = []
    for path in build_records(workdir, persona):
        rec = json.loads(path.read_text())
        stages = {k: st for k, st in rec.get("stages", {}).items() if isinstance(st, dict) and "sampler" in st}
        final = stages.get("merged") or stages.get("sft")  # the build's final checkpoint, as its flow names it
        for stage, st in [*stages.items(), *([("final", final)] if final else [])]:
            rows.append(
                {
                    "persona": rec["persona"],
                    "build_id": rec["build_id"],
                    "stage": stage,
                    "uri": st["sampler"],
                    "state": st.get("state"),
                    "finished_at": st["finished_at"],
                }
            )
    return sorted(rows, key=lambda r: (r["finished_at"], r["stage"] == "final"), reverse=True)


# Settings that may change between runs of one build without changing what it produces.
_RUN_ONLY = {
    "workdir",
    "wandb_project",
    "device",
    "max_in_flight",
    "evaluate",
    "merge",
    "build_id",
    "micro_batch_size",
    "memory_budget_gb",
    "gradient_checkpointing",
    "max_cost",
    "threads",  # changes sums only at float rounding (tests/test_endings_threads.py)
}


def check_same_build(cfg: PipelineConfig) -> None:
    """A build id names one set of inputs: rerunning it with others would mix two builds' stages."""
    old = read_record(cfg).get("config")
    if not old:
        return
    new = cfg.model_dump(mode="json")
    for d in (old, new):  # how many old states are kept does not change what a build produces
        for stage in ("dpo", "sft"):
            (d.get(stage) or {}).pop("keep_states", None)
    changed = sorted(k for k in set(old) | set(new) if k not in _RUN_ONLY and old.get(k) != new.get(k))
    if changed:
        raise UserError(
            f"build {cfg.build_id!r} of {cfg.constitution().name} was started with other settings "
            f"({', '.join(changed)}); rerun it unchanged or use a new --build-id"
        )


def build_renderers(cfg: PipelineConfig) -> dict[str, str]:
    """The renderer of each model the build samples or trains, by name (character.train.families);
    a model family we cannot render raises UserError here, before any call."""
    from character.train.families import check_renderable

    return check_renderable({"student": cfg.base_model, "teacher": cfg.teacher_model or cfg.base_model})


def check_same_renderers(cfg: PipelineConfig) -> None:
    """A build resumes only with the renderers it was started with: its data and checkpoints hold
    tokens in their format. Records from before renderers were recorded used the generic one."""
    from character.train.families import GENERIC

    now = build_renderers(cfg)
    rec = read_record(cfg)
    if not rec:
        return
    old = rec.get("renderers") or {role: GENERIC for role in now}
    for role, name in now.items():
        if old.get(role) != name:
            model = cfg.base_model if role == "student" else (cfg.teacher_model or cfg.base_model)
            raise UserError(
                f"build {cfg.build_id!r} of {cfg.constitution().name} was started with the {old.get(role)} "
                f"renderer for its {role} ({model}), and this version renders it with {name}; "
                "use a new --build-id"
            )
