"""Sequential mode (default): DPO, introspection data from the DPO model, then SFT continued
from the DPO training state at lr x sft_lr_multiplier. One final checkpoint."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_link_artifact

from character.pipeline import PipelineConfig, PipelineResult, validate
from tasks import dpo_data, expand_questions, introspection_data, train_dpo, train_sft
from tasks.stages import artifact_key


@flow(name="sequential")
def sequential(config: PipelineConfig) -> PipelineResult:
    persona = validate(config).name
    questions = expand_questions(config)
    data = dpo_data(config, questions)
    dpo = train_dpo(config, data)
    intro = introspection_data(config, dpo)
    sft = train_sft(config, intro, dpo)
    create_link_artifact(key=artifact_key(persona, "final-checkpoint"), link=sft.sampler,
                         link_text=f"{persona} final adapter", description="sequential mode: DPO then SFT")
    return PipelineResult(
        persona=persona, mode="sequential", base_model=config.base_model, workdir=config.workdir,
        build_id=config.build_id, checkpoints={"dpo": dpo.sampler, "sft": sft.sampler, "final": sft.sampler},
    )
