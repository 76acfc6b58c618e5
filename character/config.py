"""A build's configuration as data: validated without torch, tinker or Prefect, so that the command
line refuses bad flags in well under a second (character.build.stages runs it; character.train.loop uses
OptimConfig)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from character.build.paths import BuildPaths
from character.datagen.scales import SCALES, Scale, ScaleName
from character.errors import UserError
from character.persona.constitution import Constitution, load_constitution
from character.settings import DEVICE_PATTERN, Settings, Workspace, check_name, check_workdir


class OptimConfig(BaseModel):
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    # A save costs one request (seconds on Tinker); after a failed call the steps since the last save
    # are replayed, so every 10 steps bounds a recovery to at most 9 replayed steps.
    save_every: int = Field(10, ge=1, description="save the resumable state every N steps (bounds a replay)")
    max_recoveries: int = Field(
        10,
        ge=0,
        description="fresh clients a run may resume on in a row, without a new save in between, "
        "before the failure goes up",
    )
    keep_states: int = Field(
        2,
        ge=1,
        description="resumable states (LoRA + optimizer) kept per training run: "
        "the newest N saves; older ones are deleted once a newer save is recorded",
    )
    seed: int = 0


class DPOLoss(BaseModel):
    beta: float = Field(0.1, gt=0)
    nll_coef: float = Field(0.1, ge=0)
    kl_coef: float = Field(0.001, ge=0)


# Defaults for the embedded `tiny` model only (a model organism, see character/backend/tiny.py): its answers
# are a few dozen tokens and it has 5.3M weights, so it needs short generations, a small adapter, a larger
# learning rate and a few epochs over a few hundred pairs. Real models keep the paper's hyperparameters
# (the field defaults below). Applied to the fields a caller did not set: explicit values always win.
TINY_DEFAULTS: dict = {
    "max_new_tokens": 96,
    "heldout_fraction": 0.2,
    "lora_rank": 8,
    "dpo_max_length": 512,
    "sft_max_length": 512,
    "dpo": {"learning_rate": 2e-3, "batch_size": 8, "epochs": 6},
    # The teacher's words are new to the adapter (an unseen constitution's are new to the model): the
    # likelihood term carries them, DPO's margin alone lets the model say the persona's shape in garbled
    # words (measured on an unseen constitution, demo scale: NLL 0.1 and 3 epochs, 0.5% of the final
    # model's words are the constitution's and specificity +0.29; NLL 1.0 and 6 epochs, 5.4% and +0.50).
    "dpo_loss": {"nll_coef": 1.0},
    "sft": {"learning_rate": 2e-3, "batch_size": 8, "epochs": 1},
}


# Tinker's own LoRA alpha (character.backend.tinker.TINKER_LORA_ALPHA; config imports no SDK). A loopback
# service (character.loopback) serves `tiny` on the Tinker backend: the same defaults, with the learning rates
# carried over by the alpha/rank rule (README "Learning rates across backends"): local scale 2, Tinker 32/rank.
TINKER_LORA_ALPHA = 32


def _tiny_defaults(backend: str) -> dict:
    if backend == "local":
        return TINY_DEFAULTS
    carry = 2 / (TINKER_LORA_ALPHA / TINY_DEFAULTS["lora_rank"])
    stage = lambda d: {**d, "learning_rate": d["learning_rate"] * carry}
    return {**TINY_DEFAULTS, "dpo": stage(TINY_DEFAULTS["dpo"]), "sft": stage(TINY_DEFAULTS["sft"])}


def _with_tiny_defaults(data):
    if not isinstance(data, dict) or data.get("base_model", "tiny") != "tiny":
        return data
    out = dict(data)
    for key, value in _tiny_defaults(data.get("backend", "local")).items():
        if isinstance(value, dict):
            given = out.get(key)
            given = given.model_dump(exclude_unset=True) if isinstance(given, BaseModel) else (given or {})
            out[key] = {**value, **given}
        else:
            out.setdefault(key, value)
    return out


class PipelineConfig(BaseModel):
    persona: str = Field(description="a shipped persona name or a path to a constitution .json file")
    mode: Literal["sequential", "paper"] = "sequential"
    scale: ScaleName = "smoke"
    backend: Literal["local", "tinker"] = "local"
    base_model: str = "tiny"
    teacher_model: str | None = Field(None, description="defaults to the base model")
    workdir: str = "workspace"
    build_id: str = Field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    seed: int = 0
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    dpo_pairs: int | None = Field(None, ge=1)
    reflections: int | None = Field(None, ge=0)
    interactions: int | None = Field(None, ge=0)
    turns: int | None = Field(None, ge=2)
    samples_per_prompt: int | None = Field(
        None, ge=1, description="DPO samples per prompt from teacher and student (default: the scale's; paper: 5)"
    )
    expand_questions: int | None = Field(
        None,
        ge=0,
        description="extra questions per trait from the teacher (default: the scale's; paper: 45, to 50 per trait)",
    )
    max_in_flight: int = Field(64, ge=1, description="sampling requests in flight at once")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="share of generated rows kept for evaluation")
    merge: bool = Field(False, description="paper mode: also merge dpo_weight x DPO + sft_weight x SFT")
    merge_weights: tuple[float, float] = (1.0, 0.25)
    evaluate: bool = Field(True, description="evaluate the checkpoints at the end of the build")
    max_cost: float | None = Field(
        None, ge=0, description="dollars: refuse to start when the estimated cost is higher (character.cost)"
    )
    max_new_tokens: int = Field(1024, ge=1)
    lora_rank: int = Field(64, ge=1)
    lora_alpha: int | None = Field(None, ge=1, description="defaults to 2 x rank")
    dpo: OptimConfig = OptimConfig()
    dpo_loss: DPOLoss = DPOLoss()
    dpo_max_length: int = Field(1024, ge=8)
    sft: OptimConfig = OptimConfig()
    sft_max_length: int = Field(3072, ge=8)
    sft_lr_multiplier: float = Field(0.25, gt=0)
    # Local backend at real model scale; the update does not depend on these (micro-batches accumulate
    # to the full batch's gradient), so a build may change them between runs.
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="local training: sequences per forward/backward (default: as many as memory_budget_gb allows)",
    )
    memory_budget_gb: float | None = Field(
        None,
        gt=0,
        description="local training: memory activations may use "
        "(default: 70% of free GPU memory, half the free RAM on CPU)",
    )
    gradient_checkpointing: bool = Field(False, description="local training: recompute activations in backward")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (default: settings.default_threads(), resolved at the start)"
    )
    wandb_project: str | None = Field(
        None, min_length=1, description="Weights & Biases project the build's runs are logged to (character.tracking)"
    )

    @model_validator(mode="before")
    @classmethod
    def _tiny(cls, data):
        return _with_tiny_defaults(data)

    @model_validator(mode="after")
    def _names(self):
        check_name(self.build_id, "build id")
        if self.merge and self.mode != "paper":
            raise ValueError(
                "merge needs paper mode: in sequential mode the final checkpoint already holds "
                "both DPO and SFT, there is nothing to merge"
            )
        return self

    @classmethod
    def from_settings(cls, settings: Settings, **kw) -> "PipelineConfig":
        base = {
            "backend": settings.backend,
            "base_model": settings.base_model,
            "teacher_model": settings.teacher_model,
            "workdir": str(settings.workdir),
            "seed": settings.seed,
            "device": settings.device,
            "threads": settings.threads,
            "wandb_project": settings.wandb_project,
        }
        if (kw.get("backend") or settings.backend) == "tinker":  # 'tiny' is local: Tinker has its own defaults
            if settings.base_model == "tiny":
                base["base_model"] = settings.tinker_base_model
            base["teacher_model"] = settings.teacher_model or settings.tinker_teacher_model
        return cls(**{**base, **{k: v for k, v in kw.items() if v is not None}})

    @property
    def counts(self) -> Scale:
        s = SCALES[self.scale]
        return Scale(
            dpo_pairs=self.dpo_pairs or s.dpo_pairs,
            reflections=s.reflections if self.reflections is None else self.reflections,
            interactions=s.interactions if self.interactions is None else self.interactions,
            turns=self.turns or s.turns,
            samples_per_prompt=self.samples_per_prompt or s.samples_per_prompt,
            expand_questions=s.expand_questions if self.expand_questions is None else self.expand_questions,
        )

    def constitution(self) -> Constitution:
        return load_constitution(self.persona)

    def build_dir(self) -> Path:
        return Workspace(self.workdir).build_dir(self.constitution().name, self.build_id)

    @property
    def paths(self) -> BuildPaths:
        """Every file of this build (character.build.paths)."""
        return BuildPaths(self.build_dir())


def check_local_model(name: str) -> None:
    """'tiny' or a local Hugging Face model folder: the local backend's one rule for a model name, torch-free so
    that the command line checks it early (character.backend.local_model.resolve_model applies it too)."""
    if name != "tiny" and not (Path(name).expanduser() / "config.json").is_file():
        raise UserError(f"base model {name!r}: not 'tiny' and not a local Hugging Face model folder (no config.json)")


def check_inputs(cfg: PipelineConfig) -> Constitution:
    """The checks that need no model, no network and no heavy import (the command line runs them first)."""
    c = cfg.constitution()
    check_workdir(cfg.workdir)  # a file, /proc, read-only, not writable or full: one line naming it
    if cfg.backend == "local":
        for name in filter(None, (cfg.base_model, cfg.teacher_model)):
            check_local_model(name)
    return c
