"""Paper mode: DPO from the base, introspection data from the DPO model, SFT from the base, and
with `merge` the exact merge 1.0 x DPO + 0.25 x SFT. Evaluates every checkpoint it made."""

from __future__ import annotations

from prefect import flow

import tasks
from character.build import plan
from character.build.record import PipelineResult
from character.config import PipelineConfig
from flows.build_slots import held


@flow(name="paper")
def paper(config: PipelineConfig) -> PipelineResult:
    with held(config):  # across machines, for deployment runs
        return plan.run(config, "paper", tasks)
