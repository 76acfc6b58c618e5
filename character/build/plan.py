"""The order of a build's stages and what each hands the next, written once for every way to run them.

`stages` is any object with the stage callables by name (`Stages`): the `tasks` package (Prefect
tasks, for the flows) or `character.build.direct` (the same stages called in this process).
`sequential` and `paper` run the stages of a validated build whose lock is held, and return the
result the main command prints; `run` is the whole of a build: validate, lock, plan.
"""

from __future__ import annotations

from typing import Literal, Protocol

from character.build.checks import check_served_models, validate
from character.build.record import Checkpoint, PipelineResult
from character.build.stages import lock_build
from character.config import PipelineConfig


class Stages(Protocol):
    def expand_questions(self, cfg: PipelineConfig) -> str | None: ...
    def dpo_data(self, cfg: PipelineConfig, questions_path: str | None = None) -> str: ...
    def train_dpo(self, cfg: PipelineConfig, data_path: str) -> Checkpoint: ...
    def introspection_data(self, cfg: PipelineConfig, dpo: Checkpoint) -> str: ...
    def train_sft(self, cfg: PipelineConfig, data_path: str, dpo: Checkpoint | None) -> Checkpoint: ...
    def merge(self, cfg: PipelineConfig, dpo: Checkpoint, sft: Checkpoint) -> Checkpoint: ...
    def evaluate(self, cfg: PipelineConfig, checkpoints: dict[str, Checkpoint]) -> dict: ...
    def publish_checkpoint(self, cfg: PipelineConfig, ckpt: Checkpoint, stage: str | None = None) -> None: ...
    def build_summary(self, cfg: PipelineConfig, result: PipelineResult) -> str: ...


STAGE_NAMES = tuple(name for name in Stages.__dict__ if not name.startswith("_"))


def _result(cfg: PipelineConfig, mode: str, checkpoints: dict[str, str]) -> PipelineResult:
    return PipelineResult(
        persona=cfg.constitution().name,
        mode=mode,
        base_model=cfg.base_model,
        workdir=cfg.workdir,
        build_id=cfg.build_id,
        checkpoints=checkpoints,
    )


def sequential(cfg: PipelineConfig, stages: Stages) -> PipelineResult:
    """DPO, introspection data from the DPO model, then SFT continued from the DPO training state.
    One final checkpoint; the DPO stage alone and both stages together are evaluated."""
    questions = stages.expand_questions(cfg)
    data = stages.dpo_data(cfg, questions)
    dpo = stages.train_dpo(cfg, data)
    intro = stages.introspection_data(cfg, dpo)
    sft = stages.train_sft(cfg, intro, dpo)
    stages.publish_checkpoint(cfg, sft, stage="final")
    stages.evaluate(cfg, {"dpo": dpo, "final": sft})
    result = _result(cfg, "sequential", {"dpo": dpo.sampler, "sft": sft.sampler, "final": sft.sampler})
    stages.build_summary(cfg, result)
    return result


def paper(cfg: PipelineConfig, stages: Stages) -> PipelineResult:
    """DPO from the base, introspection data from the DPO model, SFT from the base, and with
    `cfg.merge` the exact merge of the two; every checkpoint made is evaluated. The final checkpoint
    is the merge if there is one, else SFT."""
    questions = stages.expand_questions(cfg)
    data = stages.dpo_data(cfg, questions)
    dpo = stages.train_dpo(cfg, data)
    intro = stages.introspection_data(cfg, dpo)
    sft = stages.train_sft(cfg, intro, None)
    checkpoints = {"dpo": dpo, "sft": sft}
    if cfg.merge:
        checkpoints["merged"] = stages.merge(cfg, dpo, sft)
    stages.evaluate(cfg, checkpoints)
    uris = {k: v.sampler for k, v in checkpoints.items()}
    uris["final"] = uris.get("merged", uris["sft"])
    result = _result(cfg, "paper", uris)
    stages.build_summary(cfg, result)
    return result


def run(cfg: PipelineConfig, mode: Literal["sequential", "paper"], stages: Stages) -> PipelineResult:
    """A whole build in `mode`: check its inputs, hold its one-writer lock, run the mode's plan."""
    cfg = cfg.model_copy(update={"mode": mode})
    validate(cfg)
    check_served_models(cfg)  # Tinker: one free call, before anything is spent
    if cfg.max_cost is not None:
        from character.cost.budget import build_plan, check_budget

        check_budget(build_plan(cfg), cfg.max_cost)
    with lock_build(cfg):  # one writer per build, also for deployment runs
        return {"sequential": sequential, "paper": paper}[mode](cfg, stages)
