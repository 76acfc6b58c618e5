"""Paper mode: DPO from the base, introspection data from the DPO model, SFT from the base, and
with `merge` the exact merge 1.0 x DPO + 0.25 x SFT. Evaluates every checkpoint it made."""

from __future__ import annotations

from prefect import flow

import tasks
from character.build import plan
from character.build.record import PipelineResult
from character.build.stages import lock_build, validate
from character.config import PipelineConfig


@flow(name="paper")
def paper(config: PipelineConfig) -> PipelineResult:
    config = config.model_copy(update={"mode": "paper"})
    validate(config)
    with lock_build(config):  # one writer per build, also for deployment runs
        return plan.paper(config, tasks)
