"""What an evaluation takes besides its checkpoints, as one typed object (as OptimConfig is for training).

`character eval` builds it from its flags, a build's eval stage from the build's PipelineConfig
(`EvalOptions.for_build`). Its checks need no model and no heavy import, so bad options fail before
anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from character.errors import UserError
from character.evaluation.models import model_side

if TYPE_CHECKING:
    from character.config import PipelineConfig
    from character.settings import Settings

# A build's evaluation answers are at most this long whatever the build's own max_new_tokens (which sizes
# the generated training data); the same as `character eval`'s default.
BUILD_EVAL_MAX_NEW_TOKENS = 256


@dataclass(kw_only=True)
class EvalOptions:
    """The data default to the build whose record lists the checkpoints (`build_dir` names it outright):
    its held-out pairs for preference metrics and prompts, its training pairs for the persona classifier,
    its held-out introspection for NLL; a file given here replaces the build's. `limit` caps the rows used
    from each file; `names` labels the checkpoints (default: the stage that produced each). `judge_model`
    and `revealed_judge` name the 1-10 judge and the revealed-preference judge (here or on Tinker: see
    character.evaluation.models.model_side); without a revealed judge that evaluation is skipped and the
    result says why. `prompted` adds the base model with the constitution in its system prompt as a row,
    `prefill` the multi-turn robustness test, `capability` the multiple-choice probe (`capability_set`, a
    file, else the shipped set); `coherence_judge` compares the final model's answers with the base's and
    the prompted baseline's (unset: skipped, said so). `notes` go into the report. The report goes into `out_dir`, else
    `<build>/eval/<time>`, else `<workdir>/evals/<persona>/<time>`."""

    persona: str
    workdir: str | Path
    base_model: str | None = None  # the DPO reference (default: the one the checkpoints record)
    dpo_data: str | Path | None = None
    introspection_data: str | Path | None = None
    train_data: str | Path | None = None
    classifier: str | Path | None = None  # a local encoder folder (default: TF-IDF + logistic regression)
    judge_model: str | None = None
    revealed_judge: str | None = None
    revealed_games: int = 200
    prompted: bool = True
    prefill: bool = True
    capability: bool = True
    capability_set: str | Path | None = None
    coherence_judge: str | None = None
    out_dir: str | Path | None = None
    build_dir: str | Path | None = None
    names: list[str] | None = None
    limit: int | None = None
    prompts: list[str] | None = None  # default: the held-out prompts
    max_new_tokens: int = 256
    beta: float = 0.1
    max_length: int = 1024
    sft_max_length: int = 3072
    seed: int = 0
    device: str = "auto"
    notes: list[str] = field(default_factory=list)
    # Persona specificity (character.evaluation.specificity): the reference set's teacher (default: the
    # build's teacher, else the base model), its answers per persona and their length (default: the build's).
    specificity: bool = True
    teacher_model: str | None = None
    reference_per_persona: int = 8
    reference_max_new_tokens: int | None = None

    @classmethod
    def for_build(
        cls, cfg: PipelineConfig, settings: Settings, names: list[str], notes: list[str] | None = None
    ) -> EvalOptions:
        """A build's evaluation of its checkpoints (`names`: their stages), on its own data and lengths."""
        return cls(
            persona=cfg.persona,
            workdir=cfg.workdir,
            base_model=cfg.base_model,
            names=names,
            out_dir=cfg.paths.eval,
            build_dir=cfg.paths.root,
            seed=cfg.seed,
            device=cfg.device,
            max_length=cfg.dpo_max_length,
            sft_max_length=cfg.sft_max_length,
            beta=cfg.dpo_loss.beta,
            max_new_tokens=min(cfg.max_new_tokens, BUILD_EVAL_MAX_NEW_TOKENS),
            revealed_judge=settings.revealed_judge,
            revealed_games=settings.revealed_games,
            coherence_judge=settings.coherence_judge,
            capability_set=settings.capability_set,
            notes=list(notes or []),
            teacher_model=cfg.teacher_model or cfg.base_model,
            reference_max_new_tokens=cfg.max_new_tokens,
        )

    def check_counts(self, checkpoints: list[str]) -> None:
        """Checks of the numbers, first of all."""
        if not checkpoints:
            raise UserError("give at least one checkpoint to evaluate")
        if self.names is not None and len(self.names) != len(checkpoints):
            raise UserError("give one name per checkpoint")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, not {self.limit}")
        if self.reference_per_persona < 1:
            raise UserError(f"--reference-per-persona must be at least 1, not {self.reference_per_persona}")

    def check_models_and_files(self) -> None:
        """The classifier folder, the judges' names and the data files given, before any model loads."""
        if self.classifier is not None and not (Path(self.classifier) / "config.json").is_file():
            raise UserError(f"--classifier {self.classifier}: not a local Hugging Face model folder (no config.json)")
        judges = (
            (self.judge_model, "--judge-model"),
            (self.revealed_judge, "--revealed-judge"),
            (self.coherence_judge, "--coherence-judge"),
        )
        for spec, opt in judges:
            if spec is not None:
                model_side(spec, opt)
        for p, opt in (
            (self.dpo_data, "--dpo-data"),
            (self.introspection_data, "--introspection-data"),
            (self.train_data, "--train-data"),
            (self.capability_set, "--capability-set"),
        ):
            if p is not None and not Path(p).is_file():
                raise UserError(f"{opt} {p}: file not found")
