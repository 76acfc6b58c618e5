"""The plan's stages called in this process, without Prefect: the names of the `tasks` package.

Tests and the orchestration benchmark build through here; the flows run the same plan with the
Prefect tasks. The record and the evaluation report come out the same; there are no artifacts.
"""

from __future__ import annotations

import sys

from character.build import plan
from character.build import stages as core
from character.build.record import Checkpoint, PipelineResult, read_record
from character.build.summary import build_summary_markdown
from character.config import PipelineConfig

# The stages are looked up on the `core` module at each call, so a test that replaces one there
# replaces it here too, as it does for the Prefect tasks.


def expand_questions(cfg: PipelineConfig) -> str | None:
    return core.stage_expand_questions(cfg)


def dpo_data(cfg: PipelineConfig, questions_path: str | None = None) -> str:
    return core.stage_dpo_data(cfg, questions_path)


def train_dpo(cfg: PipelineConfig, data_path: str) -> Checkpoint:
    return core.stage_dpo(cfg, data_path)


def introspection_data(cfg: PipelineConfig, dpo: Checkpoint) -> str:
    return core.stage_introspection(cfg, dpo)


def train_sft(cfg: PipelineConfig, data_path: str, dpo: Checkpoint | None) -> Checkpoint:
    return core.stage_sft(cfg, data_path, dpo)


def merge(cfg: PipelineConfig, dpo: Checkpoint, sft: Checkpoint) -> Checkpoint:
    return core.stage_merge(cfg, dpo, sft)


def evaluate(cfg: PipelineConfig, checkpoints: dict[str, Checkpoint]) -> dict:
    """The per-model summaries (`eval`), as the Prefect task returns them."""
    return core.stage_evaluate(cfg, checkpoints)["eval"]


def publish_checkpoint(cfg: PipelineConfig, ckpt: Checkpoint, stage: str | None = None) -> None:
    """Nothing to publish outside Prefect: the record already lists every checkpoint."""


def build_summary(cfg: PipelineConfig, result: PipelineResult) -> str:
    """The build's summary in markdown (the flow publishes the same text as an artifact)."""
    return build_summary_markdown(read_record(cfg), result.checkpoints)


def run_sequential(cfg: PipelineConfig) -> dict[str, Checkpoint]:
    """The sequential pipeline without Prefect: the flow's stages in the flow's order, evaluation and
    summary included. Returns the checkpoints it made: dpo, sft, and final (the sft one)."""
    return _checkpoints(cfg, plan.run(cfg, "sequential", sys.modules[__name__]))  # this module: the stages


def _checkpoints(cfg: PipelineConfig, result: PipelineResult) -> dict[str, Checkpoint]:
    """The result's checkpoints as the record holds them; "final" is the one whose URI it names."""
    recorded = read_record(cfg)["stages"]
    made = {k: Checkpoint.from_record(recorded[k]) for k in result.checkpoints if k != "final"}
    made["final"] = next(c for c in reversed(made.values()) if c.sampler == result.checkpoints["final"])
    return made
