"""Sequential mode (default): DPO, introspection data from the DPO model, then SFT continued
from the DPO training state at lr x sft_lr_multiplier. One final checkpoint."""

from __future__ import annotations

from prefect import flow

import tasks
from character.build import plan
from character.build.record import PipelineResult
from character.config import PipelineConfig
from flows.build_slots import held


@flow(name="sequential")
def sequential(config: PipelineConfig) -> PipelineResult:
    with held(config):  # across machines, for deployment runs
        return plan.run(config, "sequential", tasks)
