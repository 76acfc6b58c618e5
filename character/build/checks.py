"""What a build checks before a model is loaded or anything is paid for: its inputs, that it is the
same build as the one on disk, the renderers, the judges and capability set, the served models (one
free question to Tinker), and that the teacher's prompt fits its context."""

from __future__ import annotations

from character.build.record import check_same_build, check_same_renderers
from character.config import PipelineConfig, check_inputs
from character.errors import UserError
from character.persona.constitution import Constitution
from character.settings import Settings
from character.tracking import check_tracking


def validate(cfg: PipelineConfig) -> Constitution:
    """Everything that can be checked before a model is loaded or an API call is paid for."""
    c = check_inputs(cfg)  # constitution, workdir, local model names
    check_tracking(cfg)  # --wandb without wandb installed
    check_same_build(cfg)
    check_same_renderers(cfg)  # a family we cannot render is refused here, by name
    if cfg.backend == "tinker":
        from character.backend.tinker import check_ready

        check_ready(Settings(), cfg.base_model, cfg.teacher_model)  # key and model names, no network
        if cfg.mode == "paper" and cfg.merge:  # the merge needs the adapters exported: refuse now, not after training
            from character.weights.tinker_export import check_family

            check_family(cfg.base_model)
    settings = Settings()
    judges = (
        (settings.revealed_judge, "CHARACTER_REVEALED_JUDGE", "revealed-preference judge"),
        (settings.coherence_judge, "CHARACTER_COHERENCE_JUDGE", "coherence judge"),
    )
    for judge, var, role in (
        judges if cfg.evaluate else ()
    ):  # a bad judge name or a missing key fails now, not after training
        from character.evaluation.models import check_tinker_key, model_side

        if judge and model_side(judge, var) == "tinker":
            check_tinker_key()
            if not judge.startswith("tinker://"):
                from character.train.families import check_renderable

                check_renderable({role: judge})
    if cfg.evaluate and settings.capability_set is not None:
        from character.evaluation.capability import load_capability_set

        load_capability_set(
            settings.capability_set, option="CHARACTER_CAPABILITY_SET"
        )  # a bad set fails before training, naming the line
    return c


def check_served_models(cfg: PipelineConfig) -> None:
    """Tinker: every model the build will use (student, teacher, judges) is served and can be trained or
    sampled as the build needs, asked of the service once (free) before anything is spent."""
    if cfg.backend == "tinker":
        from character.backend.tinker_models import check_build_served

        check_build_served(cfg, Settings())


def check_teacher_prompt_fits(cfg: PipelineConfig, c: Constitution, teacher) -> None:
    """Before any generation: the teacher's system prompt (the traits), the longest question and the
    answer limit must fit the teacher's context window. Known for local models; a Tinker model's
    limit is enforced by the service."""
    from character.persona.prompts import teacher_system_prompt

    config = getattr(getattr(teacher, "model", None), "config", None)
    context = getattr(config, "max_position_embeddings", None)
    if not isinstance(context, int):
        return
    tok = teacher.get_tokenizer()
    prompt = len(tok.encode(teacher_system_prompt(c), add_special_tokens=False))
    question = max(len(tok.encode(q, add_special_tokens=False)) for q in c.questions)
    need = prompt + question + cfg.max_new_tokens + 16  # + the chat template's own tokens
    if need > context:
        raise UserError(
            f"{c.source}: the teacher prompt does not fit the teacher's context of {context} tokens: "
            f"its traits take {prompt} tokens, the longest question {question}, and answers up to "
            f"{cfg.max_new_tokens} (--max-new-tokens); shorten the traits or lower --max-new-tokens"
        )
