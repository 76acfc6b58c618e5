"""The stage order is written once (character.build.plan) and run with either set of stages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from character.build import direct, plan
from character.build.record import Checkpoint
from character.config import PipelineConfig


def test_the_tasks_and_the_plain_stages_have_the_plan_s_names():
    import tasks

    assert set(tasks.__all__) == set(plan.STAGE_NAMES)
    for name in plan.STAGE_NAMES:
        assert callable(getattr(tasks, name)) and callable(getattr(direct, name)), name


def _stages(calls: list) -> SimpleNamespace:
    """Stand-ins with exactly the plan's names: the plan asking for any other one fails."""

    def stage(name):
        def call(cfg, *args, **kwargs):
            calls.append(name)
            if name in ("train_dpo", "train_sft", "merge"):
                return Checkpoint(stage=name, state=f"file:///{name}/state", sampler=f"file:///{name}", steps=1)
            return f"{name}.out"

        return call

    return SimpleNamespace(**{name: stage(name) for name in plan.STAGE_NAMES})


ORDER = ["expand_questions", "dpo_data", "train_dpo", "introspection_data", "train_sft"]


def test_the_sequential_plan_runs_its_stages_in_order(tmp_path):
    calls: list[str] = []
    result = plan.sequential(PipelineConfig(persona="pirate", workdir=str(tmp_path)), _stages(calls))
    assert calls == ORDER + ["publish_checkpoint", "evaluate", "build_summary"]
    assert result.mode == "sequential" and result.persona == "pirate"
    assert result.checkpoints == {"dpo": "file:///train_dpo", "sft": "file:///train_sft", "final": "file:///train_sft"}


@pytest.mark.parametrize("merge", [False, True])
def test_the_paper_plan_runs_its_stages_in_order(tmp_path, merge):
    calls: list[str] = []
    cfg = PipelineConfig(persona="pirate", workdir=str(tmp_path), mode="paper", merge=merge)
    result = plan.paper(cfg, _stages(calls))
    assert calls == ORDER + (["merge"] if merge else []) + ["evaluate", "build_summary"]
    assert result.mode == "paper"
    assert result.checkpoints["final"] == ("file:///merge" if merge else "file:///train_sft")
