"""Paper mode: DPO from the base, introspection data from the DPO model, SFT from the base, and
with `merge` the exact merge 1.0 x DPO + 0.25 x SFT. Evaluates every checkpoint it made."""

from __future__ import annotations

from prefect import flow

from character.build.stages import PipelineConfig, PipelineResult, lock_build, validate
from tasks import build_summary, dpo_data, evaluate, expand_questions, introspection_data, merge, train_dpo, train_sft


@flow(name="paper")
def paper(config: PipelineConfig) -> PipelineResult:
    config = config.model_copy(update={"mode": "paper"})
    persona = validate(config).name
    with lock_build(config):  # one writer per build, also for deployment runs
        questions = expand_questions(config)
        data = dpo_data(config, questions)
        dpo = train_dpo(config, data)
        intro = introspection_data(config, dpo)
        sft = train_sft(config, intro, None)
        checkpoints = {"dpo": dpo, "sft": sft}
        if config.merge:
            checkpoints["merged"] = merge(config, dpo, sft)
        evaluate(config, checkpoints)
        uris = {k: v.sampler for k, v in checkpoints.items()}
        uris["final"] = uris.get("merged", uris["sft"])
        result = PipelineResult(
            persona=persona,
            mode="paper",
            base_model=config.base_model,
            workdir=config.workdir,
            build_id=config.build_id,
            checkpoints=uris,
        )
        build_summary(config, result)
    return result
