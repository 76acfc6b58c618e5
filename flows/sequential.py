"""Sequential mode (default): DPO, introspection data from the DPO model, then SFT continued
from the DPO training state at lr x sft_lr_multiplier. One final checkpoint."""

from __future__ import annotations

from prefect import flow

from character.build.stages import PipelineConfig, PipelineResult, lock_build, validate
from tasks import build_summary, dpo_data, evaluate, expand_questions, introspection_data, train_dpo, train_sft
from tasks.stages import publish_checkpoint


@flow(name="sequential")
def sequential(config: PipelineConfig) -> PipelineResult:
    config = config.model_copy(update={"mode": "sequential"})
    persona = validate(config).name
    with lock_build(config):  # one writer per build, also for deployment runs
        questions = expand_questions(config)
        data = dpo_data(config, questions)
        dpo = train_dpo(config, data)
        intro = introspection_data(config, dpo)
        sft = train_sft(config, intro, dpo)
        publish_checkpoint(config, sft, stage="final")
        evaluate(config, {"dpo": dpo, "final": sft})  # the DPO stage alone, and both stages together
        result = PipelineResult(
            persona=persona,
            mode="sequential",
            base_model=config.base_model,
            workdir=config.workdir,
            build_id=config.build_id,
            checkpoints={"dpo": dpo.sampler, "sft": sft.sampler, "final": sft.sampler},
        )
        build_summary(config, result)
    return result
