"""Sequential mode (default): DPO, introspection data from the DPO model, then SFT continued
from the DPO training state at lr x sft_lr_multiplier. One final checkpoint."""

from __future__ import annotations

from prefect import flow

import tasks
from character.build import plan
from character.build.record import PipelineResult
from character.build.stages import lock_build, validate
from character.config import PipelineConfig


@flow(name="sequential")
def sequential(config: PipelineConfig) -> PipelineResult:
    config = config.model_copy(update={"mode": "sequential"})
    validate(config)
    with lock_build(config):  # one writer per build, also for deployment runs
        return plan.sequential(config, tasks)
