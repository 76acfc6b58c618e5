"""One Prefect task per stage: call the core, publish what it produced. No logic of their own."""

from __future__ import annotations

import re

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from character import pipeline
from character.backend.errors import is_transient
from character.pipeline import Checkpoint, PipelineConfig


def retry_if_transient(task, task_run, state) -> bool:
    """Retry only what the backend calls transient; a fatal error fails the task at once."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return exc is not None and is_transient(exc)


RETRYING = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
)


def artifact_key(persona: str, what: str) -> str:
    """Artifact keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{persona}-{what}".lower()).strip("-")


def _publish_checkpoint(cfg: PipelineConfig, ckpt: Checkpoint) -> None:
    persona = cfg.constitution().name
    create_link_artifact(
        key=artifact_key(persona, f"{ckpt.stage}-checkpoint"),
        link=ckpt.sampler,
        link_text=f"{persona} {ckpt.stage} adapter",
        description=f"{persona} {ckpt.stage} after {ckpt.steps} steps; resumable state: {ckpt.state}",
    )
    get_run_logger().info("%s checkpoint: %s", ckpt.stage, ckpt.sampler)


def _progress(cfg: PipelineConfig, stage: str):
    """A progress artifact updated as training steps finish."""
    art = create_progress_artifact(0.0, key=artifact_key(cfg.constitution().name, f"{stage}-progress"),
                                   description=f"{stage} training")

    def on_step(step: int, total: int, metrics: dict) -> None:
        update_progress_artifact(art, 100.0 * step / total)

    return on_step


@task(name="expand-questions", **RETRYING)
def expand_questions(cfg: PipelineConfig) -> str | None:
    return pipeline.stage_expand_questions(cfg)


@task(name="dpo-data", **RETRYING)
def dpo_data(cfg: PipelineConfig, questions_path: str | None = None) -> str:
    return pipeline.stage_dpo_data(cfg, questions_path)


@task(name="train-dpo", **RETRYING)
def train_dpo(cfg: PipelineConfig, data_path: str) -> Checkpoint:
    ckpt = pipeline.stage_dpo(cfg, data_path, on_step=_progress(cfg, "dpo"))
    _publish_checkpoint(cfg, ckpt)
    return ckpt


@task(name="introspection-data", **RETRYING)
def introspection_data(cfg: PipelineConfig, dpo: Checkpoint) -> str:
    return pipeline.stage_introspection(cfg, dpo)


@task(name="train-sft", **RETRYING)
def train_sft(cfg: PipelineConfig, data_path: str, dpo: Checkpoint | None) -> Checkpoint:
    ckpt = pipeline.stage_sft(cfg, data_path, dpo, on_step=_progress(cfg, "sft"))
    _publish_checkpoint(cfg, ckpt)
    return ckpt
