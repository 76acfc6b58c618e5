"""One Prefect task per stage: call the core, publish what it produced. No logic of their own."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.tasks import exponential_backoff

from character import progress
from character.backend.errors import is_transient
from character.build import stages as core
from character.build.record import Checkpoint, PipelineResult, read_record
from character.build.summary import build_summary_markdown, evaluation_rows
from character.config import PipelineConfig


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


def _persona(cfg: PipelineConfig) -> str:
    return cfg.constitution().name


def publish_checkpoint(cfg: PipelineConfig, ckpt: Checkpoint, stage: str | None = None) -> None:
    persona, stage = _persona(cfg), stage or ckpt.stage
    create_link_artifact(
        key=artifact_key(persona, f"{stage}-checkpoint"),
        link=ckpt.sampler,
        link_text=f"{persona} {stage} adapter",
        description=f"{persona} {stage} ({ckpt.steps} steps); resumable state: {ckpt.state}",
    )
    get_run_logger().info("%s checkpoint: %s", stage, ckpt.sampler)


def _progress(cfg: PipelineConfig, stage: str, every_s: float = 10.0):
    """A training log line (loss, learning rate) at most every `every_s` seconds; the progress
    artifact comes from `_reporting`, like every other stage's."""
    logger = get_run_logger()
    last = [0.0]

    def on_step(step: int, total: int, metrics: dict) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or step == total:
            last[0] = now
            loss = metrics.get("loss", metrics.get("loss:sum"))
            logger.info("%s step %d/%d loss %.4f lr %.3g", stage, step, total, loss or 0.0, metrics["lr"])

    return on_step


@contextlib.contextmanager
def _reporting(cfg: PipelineConfig):
    """The core's progress reports as Prefect progress artifacts (`<persona>-<stage>-progress`, updated at
    most once a second: each update is an API call) and its notes (e.g. a skipped stage) as log lines."""
    logger, persona = get_run_logger(), _persona(cfg)
    artifacts: dict[str, object] = {}
    shown: dict[str, float] = {}

    def listener(ev: progress.Event) -> None:
        if ev.message is not None:
            logger.info("%s: %s", ev.stage, ev.message)
            return
        if not ev.total:
            return
        now = time.monotonic()
        if ev.stage not in artifacts:
            artifacts[ev.stage] = create_progress_artifact(
                0.0, key=artifact_key(persona, f"{ev.stage}-progress"), description=f"{persona}: {ev.stage}"
            )
        if ev.finished or now - shown.get(ev.stage, 0.0) >= 1.0:
            shown[ev.stage] = now
            update_progress_artifact(artifacts[ev.stage], min(100.0, 100.0 * (ev.done or 0) / ev.total))

    with progress.listening(listener):
        yield


@task(name="expand-questions", **RETRYING)
def expand_questions(cfg: PipelineConfig) -> str | None:
    with _reporting(cfg):
        return core.stage_expand_questions(cfg)


@task(name="dpo-data", **RETRYING)
def dpo_data(cfg: PipelineConfig, questions_path: str | None = None) -> str:
    with _reporting(cfg):
        return core.stage_dpo_data(cfg, questions_path)


@task(name="train-dpo", **RETRYING)
def train_dpo(cfg: PipelineConfig, data_path: str) -> Checkpoint:
    with _reporting(cfg):
        ckpt = core.stage_dpo(cfg, data_path, on_step=_progress(cfg, "dpo"))
    publish_checkpoint(cfg, ckpt)
    return ckpt


@task(name="introspection-data", **RETRYING)
def introspection_data(cfg: PipelineConfig, dpo: Checkpoint) -> str:
    with _reporting(cfg):
        return core.stage_introspection(cfg, dpo)


@task(name="train-sft", **RETRYING)
def train_sft(cfg: PipelineConfig, data_path: str, dpo: Checkpoint | None) -> Checkpoint:
    with _reporting(cfg):
        ckpt = core.stage_sft(cfg, data_path, dpo, on_step=_progress(cfg, "sft"))
    publish_checkpoint(cfg, ckpt)
    return ckpt


@task(name="merge", **RETRYING)
def merge(cfg: PipelineConfig, dpo: Checkpoint, sft: Checkpoint) -> Checkpoint:
    ckpt = core.stage_merge(cfg, dpo, sft)
    publish_checkpoint(cfg, ckpt)
    return ckpt


@task(name="evaluate", **RETRYING)
def evaluate(cfg: PipelineConfig, checkpoints: dict[str, Checkpoint]) -> dict:
    """Returns the per-model summaries (`eval`); publishes a table and the report with its plots inline."""
    with _reporting(cfg):
        result = core.stage_evaluate(cfg, checkpoints)
    if cfg.evaluate:  # with --no-eval there is nothing to show beyond the record
        publish_evaluation(cfg, result)
    return result["eval"]


def publish_evaluation(cfg: PipelineConfig, result: dict) -> None:
    persona = _persona(cfg)
    create_table_artifact(
        key=artifact_key(persona, "evaluation"),
        table=evaluation_rows(result),
        description=f"{persona}: persona and held-out preference metrics per model, with n",
    )
    report = result.get("report", {}).get("markdown")
    if report:  # self-contained: the plots are data URIs, so they render in the UI
        create_markdown_artifact(
            key=artifact_key(persona, "evaluation-report"),
            markdown=Path(report).read_text(),
            description=f"{persona} evaluation report ({report})",
        )


@task(name="build-summary")
def build_summary(cfg: PipelineConfig, result: PipelineResult) -> str:
    md = build_summary_markdown(read_record(cfg), result.checkpoints)
    create_markdown_artifact(
        key=artifact_key(result.persona, "build-summary"),
        markdown=md,
        description=f"{result.persona} build {result.build_id} ({result.mode})",
    )
    return md
