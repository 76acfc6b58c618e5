"""Prefect tasks: one per pipeline stage, thin wrappers over `character.build.stages`; with
`publish_checkpoint`, the set of stages `character.build.plan` runs in the flows."""

from tasks.stages import (
    build_summary,
    dpo_data,
    evaluate,
    expand_questions,
    introspection_data,
    merge,
    publish_checkpoint,
    train_dpo,
    train_sft,
)

__all__ = [
    "expand_questions",
    "dpo_data",
    "train_dpo",
    "introspection_data",
    "train_sft",
    "merge",
    "evaluate",
    "publish_checkpoint",
    "build_summary",
]
