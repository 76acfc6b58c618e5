"""The pipeline's stages as plain functions: config in, paths and checkpoint URIs out.

Prefect tasks wrap these one to one; they also run without Prefect (tests, benchmarks). Every
stage records what it produced in the build's record.json as soon as it is produced, and a
stage already recorded as finished (with its output still present) is not redone.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from character.chat import Renderer
from character.constitution import Constitution, load_constitution
from character.datagen import expand_questions, generate_dpo_pairs, generate_introspection, load_expanded_questions
from character.dpo import run_dpo
from character.errors import UserError
from character.losses import DPOCoefficients
from character.scales import SCALES, Scale, ScaleName
from character.settings import DEVICE_PATTERN, Settings, Workspace, check_name
from character.sft import run_sft
from character.storage import uri_to_path, write_json_atomic
from character.training import OptimConfig


class DPOLoss(BaseModel):
    beta: float = Field(0.1, gt=0)
    nll_coef: float = Field(0.1, ge=0)
    kl_coef: float = Field(0.001, ge=0)


# Defaults for the embedded `tiny` model only (a model organism, see character/tinymodel.py): its answers
# are a few dozen tokens and it has 1M weights, so it needs short generations, a small adapter, a larger
# learning rate and a few epochs over a few hundred pairs. Real models keep the paper's hyperparameters
# (the field defaults below). Applied to the fields a caller did not set: explicit values always win.
TINY_DEFAULTS: dict = {
    "max_new_tokens": 96,
    "heldout_fraction": 0.2,
    "lora_rank": 8,
    "dpo_max_length": 512,
    "sft_max_length": 512,
    "dpo": {"learning_rate": 2e-3, "batch_size": 8, "epochs": 3},
    "sft": {"learning_rate": 2e-3, "batch_size": 8, "epochs": 1},
}


def _with_tiny_defaults(data):
    if not isinstance(data, dict) or data.get("backend", "local") != "local" or data.get("base_model", "tiny") != "tiny":
        return data
    out = dict(data)
    for key, value in TINY_DEFAULTS.items():
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
    samples_per_prompt: int = Field(1, ge=1, description="DPO samples per prompt from teacher and student")
    expand_questions: int = Field(0, ge=0, description="extra questions per trait from the teacher (paper: 50)")
    max_in_flight: int = Field(64, ge=1, description="sampling requests in flight at once")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="share of generated rows kept for evaluation")
    merge: bool = Field(False, description="paper mode: also merge dpo_weight x DPO + sft_weight x SFT")
    merge_weights: tuple[float, float] = (1.0, 0.25)
    evaluate: bool = Field(True, description="evaluate the checkpoints at the end of the build")
    max_new_tokens: int = Field(1024, ge=1)
    lora_rank: int = Field(64, ge=1)
    lora_alpha: int | None = Field(None, ge=1, description="defaults to 2 x rank")
    dpo: OptimConfig = OptimConfig()
    dpo_loss: DPOLoss = DPOLoss()
    dpo_max_length: int = Field(1024, ge=8)
    sft: OptimConfig = OptimConfig()
    sft_max_length: int = Field(3072, ge=8)
    sft_lr_multiplier: float = Field(0.25, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _tiny(cls, data):
        return _with_tiny_defaults(data)

    @model_validator(mode="after")
    def _names(self):
        check_name(self.build_id, "build id")
        if self.merge and self.mode != "paper":
            raise ValueError("merge needs paper mode: in sequential mode the final checkpoint already holds "
                             "both DPO and SFT, there is nothing to merge")
        return self

    @classmethod
    def from_settings(cls, settings: Settings, **kw) -> "PipelineConfig":
        base = {"backend": settings.backend, "base_model": settings.base_model,
                "teacher_model": settings.teacher_model, "workdir": str(settings.workdir),
                "seed": settings.seed, "device": settings.device}
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
        )

    def constitution(self) -> Constitution:
        return load_constitution(self.persona)

    def build_dir(self) -> Path:
        return Workspace(self.workdir).build_dir(self.constitution().name, self.build_id)


class Checkpoint(BaseModel):
    stage: str
    state: str = Field(description="resumable training state URI")
    sampler: str = Field(description="sampler weights / adapter URI")
    steps: int


# Settings that may change between runs of one build without changing what it produces.
_RUN_ONLY = {"workdir", "device", "max_in_flight", "evaluate", "merge", "build_id"}


def check_same_build(cfg: PipelineConfig) -> None:
    """A build id names one set of inputs: rerunning it with others would mix two builds' stages."""
    old = read_record(cfg).get("config")
    if not old:
        return
    new = cfg.model_dump(mode="json")
    changed = sorted(k for k in set(old) | set(new) if k not in _RUN_ONLY and old.get(k) != new.get(k))
    if changed:
        raise UserError(f"build {cfg.build_id!r} of {cfg.constitution().name} was started with other settings "
                        f"({', '.join(changed)}); rerun it unchanged or use a new --build-id")


def validate(cfg: PipelineConfig) -> Constitution:
    """Everything that can be checked before a model is loaded or an API call is paid for."""
    c = cfg.constitution()
    if Path(cfg.workdir).expanduser().exists() and not Path(cfg.workdir).expanduser().is_dir():
        raise UserError(f"workdir {cfg.workdir}: exists and is not a folder")
    check_same_build(cfg)
    if cfg.backend == "tinker":
        from character.backend.tinker import check_ready

        check_ready(Settings(), cfg.base_model, cfg.teacher_model)  # key and model names, no network
        return c
    from character.backend.local import check_model_name

    check_model_name(cfg.base_model)
    if cfg.teacher_model:
        check_model_name(cfg.teacher_model)
    return c


def _service(cfg: PipelineConfig):
    from character.backend.faults import with_faults

    settings = Settings()
    if cfg.backend == "tinker":
        from character.backend.tinker import TinkerService

        return with_faults(TinkerService(settings), settings.fault_rate, settings.fault_seed)
    from character.backend.local import LocalService

    svc = LocalService(Workspace(cfg.workdir), device=cfg.device, seed=cfg.seed)
    return with_faults(svc, settings.fault_rate, settings.fault_seed)


# -- build record -------------------------------------------------------------------------------
def read_record(cfg: PipelineConfig) -> dict:
    path = cfg.build_dir() / "record.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def record_stage(cfg: PipelineConfig, stage: str, value: dict) -> None:
    path = cfg.build_dir() / "record.json"
    rec = read_record(cfg) or {"persona": cfg.constitution().name, "build_id": cfg.build_id,
                               "config": cfg.model_dump(mode="json"), "stages": {}}
    rec["stages"][stage] = {**value, "finished_at": datetime.now(timezone.utc).isoformat()}
    write_json_atomic(path, rec)


def list_checkpoints(workdir: str | Path, persona: str | None = None) -> list[dict]:
    """Every checkpoint any build recorded in this workspace, newest first."""
    rows = []
    for path in (Path(workdir).expanduser() / "builds").glob(f"{persona or '*'}/*/record.json"):
        rec = json.loads(path.read_text())
        for stage, st in rec.get("stages", {}).items():
            if "sampler" in st:
                rows.append({"persona": rec["persona"], "build_id": rec["build_id"], "stage": stage,
                             "uri": st["sampler"], "state": st.get("state"), "finished_at": st["finished_at"]})
    return sorted(rows, key=lambda r: r["finished_at"], reverse=True)


def recorded(cfg: PipelineConfig, stage: str, key: str) -> str | None:
    """A value a finished stage of this build recorded (e.g. its output path), if any."""
    return (read_record(cfg).get("stages", {}).get(stage) or {}).get(key)


def _finished(cfg: PipelineConfig, stage: str) -> dict | None:
    done = read_record(cfg).get("stages", {}).get(stage)
    if not done:
        return None
    for key in ("path", "sampler", "state"):
        if key in done and done[key] and not done[key].startswith("tinker://") \
                and not uri_to_path(done[key]).exists():  # tinker:// outputs live on the service
            return None  # recorded but its output is gone: redo
    return done


# -- held-out split ----------------------------------------------------------------------------------
def split_heldout(path: Path, fraction: float, seed: int) -> tuple[Path, Path]:
    """Write <data>/train/<name> and <data>/heldout/<name>; the split depends only on each row's item."""
    from character.datagen import item_seed
    from character.storage import read_jsonl, write_text_atomic

    rows = read_jsonl(path)
    keys = [(r.get("kind", ""), r["meta"]["index"]) for r in rows]
    items = sorted(set(keys))
    n_held = min(len(items) - 1, max(1 if fraction > 0 else 0, round(fraction * len(items))))
    held = set(sorted(items, key=lambda k: item_seed(seed, "heldout", *k))[:max(0, n_held)])
    train_path, held_path = path.parent / "train" / path.name, path.parent / "heldout" / path.name
    for out, keep in ((train_path, False), (held_path, True)):
        write_text_atomic(out, "".join(json.dumps(r, sort_keys=True) + "\n"
                                       for r, k in zip(rows, keys) if (k in held) == keep))
    return train_path, held_path


# -- stages ---------------------------------------------------------------------------------------
def _teacher_and_student(cfg: PipelineConfig, svc):
    teacher_name = cfg.teacher_model or cfg.base_model
    student = svc.create_sampling_client(base_model=cfg.base_model)
    teacher = student if teacher_name == cfg.base_model else svc.create_sampling_client(base_model=teacher_name)
    return teacher_name, teacher, student


def stage_expand_questions(cfg: PipelineConfig) -> str | None:
    """Optional: more questions per trait from the teacher, near-duplicates dropped."""
    if cfg.expand_questions == 0:
        return None
    if done := _finished(cfg, "questions"):
        return done["path"]
    svc = _service(cfg)
    _, teacher, _ = _teacher_and_student(cfg, svc)
    out = cfg.build_dir() / "data" / "questions.jsonl"
    t0 = time.perf_counter()
    stats = expand_questions(cfg.constitution(), teacher, Renderer(teacher.get_tokenizer()), cfg.expand_questions,
                             cfg.seed, out)
    record_stage(cfg, "questions", {"path": str(out), **stats, "seconds": round(time.perf_counter() - t0, 2)})
    return str(out)


def stage_dpo_data(cfg: PipelineConfig, questions_path: str | None = None) -> str:
    if done := _finished(cfg, "dpo_data"):
        return done["path"]
    c = cfg.constitution()
    svc = _service(cfg)
    teacher_name, teacher, student = _teacher_and_student(cfg, svc)
    out = cfg.build_dir() / "data" / "dpo.jsonl"
    t0 = time.perf_counter()
    n_prompts = -(-cfg.counts.dpo_pairs // cfg.samples_per_prompt)
    stats = generate_dpo_pairs(
        c, teacher, student, Renderer(teacher.get_tokenizer()), Renderer(student.get_tokenizer()),
        n_prompts, cfg.seed, out, cfg.max_new_tokens, samples_per_prompt=cfg.samples_per_prompt,
        window=cfg.max_in_flight, extra_questions=load_expanded_questions(questions_path),
        provenance={"teacher": teacher_name, "student": cfg.base_model},
    )
    if stats["rows"] == 0:
        raise RuntimeError(f"no DPO pairs survived the filters (dropped: {stats['dropped']})")
    train, held = split_heldout(out, cfg.heldout_fraction, cfg.seed)
    record_stage(cfg, "dpo_data", {"path": str(train), "all": str(out), "heldout": str(held), **stats,
                                   "seconds": round(time.perf_counter() - t0, 2)})
    return str(train)


def stage_dpo(cfg: PipelineConfig, data_path: str, on_step=None) -> Checkpoint:
    if done := _finished(cfg, "dpo"):
        return Checkpoint(**{k: done[k] for k in ("stage", "state", "sampler", "steps")})
    svc = _service(cfg)
    t0 = time.perf_counter()
    result = run_dpo(
        svc,
        start=lambda: svc.create_lora_training_client(cfg.base_model, rank=cfg.lora_rank, seed=cfg.seed,
                                                      alpha=cfg.lora_alpha),
        reference=lambda: svc.create_sampling_client(base_model=cfg.base_model),
        renderer=Renderer(svc.get_tokenizer(cfg.base_model)),
        data_path=Path(data_path), run_dir=cfg.build_dir() / "dpo", cfg=cfg.dpo,
        coef=DPOCoefficients(**cfg.dpo_loss.model_dump()), max_length=cfg.dpo_max_length, on_step=on_step,
    )
    ckpt = Checkpoint(stage="dpo", state=result.state, sampler=result.sampler, steps=result.steps)
    record_stage(cfg, "dpo", {**ckpt.model_dump(), "seconds": round(time.perf_counter() - t0, 2)})
    return ckpt


def stage_introspection(cfg: PipelineConfig, dpo: Checkpoint) -> str:
    if done := _finished(cfg, "introspection"):
        return done["path"]
    c = cfg.constitution()
    svc = _service(cfg)
    model = svc.create_sampling_client(model_path=dpo.sampler)
    out = cfg.build_dir() / "data" / "introspection.jsonl"
    n = cfg.counts
    t0 = time.perf_counter()
    stats = generate_introspection(
        c, model, Renderer(model.get_tokenizer()), n.reflections, n.interactions, n.turns, cfg.seed, out,
        cfg.max_new_tokens, window=cfg.max_in_flight, provenance={"model": dpo.sampler},
    )
    if stats["rows"] == 0:
        raise RuntimeError("no introspection data was produced")
    train, held = split_heldout(out, cfg.heldout_fraction, cfg.seed)
    record_stage(cfg, "introspection", {"path": str(train), "all": str(out), "heldout": str(held), **stats,
                                        "seconds": round(time.perf_counter() - t0, 2)})
    return str(train)


def stage_sft(cfg: PipelineConfig, data_path: str, dpo: Checkpoint | None, on_step=None) -> Checkpoint:
    """Sequential mode continues from the DPO state at lr x sft_lr_multiplier; paper mode starts from base."""
    if done := _finished(cfg, "sft"):
        return Checkpoint(**{k: done[k] for k in ("stage", "state", "sampler", "steps")})
    svc = _service(cfg)
    if dpo is not None:
        opt = cfg.sft.model_copy(update={"learning_rate": cfg.sft.learning_rate * cfg.sft_lr_multiplier})
        start = lambda: svc.create_training_client_from_state(dpo.state)  # noqa: E731
    else:
        opt = cfg.sft
        start = lambda: svc.create_lora_training_client(  # noqa: E731
            cfg.base_model, rank=cfg.lora_rank, seed=cfg.seed, alpha=cfg.lora_alpha)
    t0 = time.perf_counter()
    result = run_sft(svc, start, Renderer(svc.get_tokenizer(cfg.base_model)), Path(data_path),
                     cfg.build_dir() / "sft", opt, cfg.sft_max_length, on_step=on_step)
    ckpt = Checkpoint(stage="sft", state=result.state, sampler=result.sampler, steps=result.steps)
    record_stage(cfg, "sft", {**ckpt.model_dump(), "learning_rate": opt.learning_rate,
                              "seconds": round(time.perf_counter() - t0, 2)})
    return ckpt


def _local_adapter(cfg: PipelineConfig, ckpt: Checkpoint) -> str:
    """A local adapter folder for a checkpoint; Tinker checkpoints are downloaded and converted once."""
    if not ckpt.sampler.startswith("tinker://"):
        return ckpt.sampler
    from character.backend.tinker_weights import download_adapter

    dst = cfg.build_dir() / "downloads" / ckpt.stage
    if not (dst / "adapter_config.json").is_file():
        download_adapter(_service(cfg), ckpt.state, dst, base_model=cfg.base_model)
    return str(dst)


def stage_merge(cfg: PipelineConfig, dpo: Checkpoint, sft: Checkpoint) -> Checkpoint:
    """Paper mode: the exact merge dpo_weight x dW_dpo + sft_weight x dW_sft (no renormalization)."""
    if done := _finished(cfg, "merged"):
        return Checkpoint(**{k: done[k] for k in ("stage", "state", "sampler", "steps")})
    from character.merge import merge_adapters
    from character.storage import file_uri

    out = cfg.build_dir() / "merged"
    w_dpo, w_sft = cfg.merge_weights
    res = merge_adapters(_local_adapter(cfg, dpo), _local_adapter(cfg, sft), out, dpo_weight=w_dpo,
                         sft_weight=w_sft, method="exact", overwrite=True)
    ckpt = Checkpoint(stage="merged", state=file_uri(res.output), sampler=file_uri(res.output), steps=0)
    record_stage(cfg, "merged", {**ckpt.model_dump(), "method": res.method, "rank": res.rank,
                                 "weights": list(res.weights)})
    return ckpt


def stage_evaluate(cfg: PipelineConfig, checkpoints: dict[str, Checkpoint]) -> dict:
    """Evaluate the named checkpoints against the base model on the build's held-out data."""
    from character.evaluate import evaluate_checkpoints

    done = _finished(cfg, "eval")
    metrics_json = ((done or {}).get("report") or {}).get("metrics_json")
    if done and done.get("names") == list(checkpoints) and metrics_json and Path(metrics_json).is_file():
        return json.loads(Path(metrics_json).read_text())
    rec = read_record(cfg).get("stages", {})
    uris = [_local_adapter(cfg, c) for c in checkpoints.values()]
    base = cfg.base_model if cfg.backend == "local" else None
    result = evaluate_checkpoints(
        uris, persona=cfg.persona, workdir=cfg.workdir, base_model=base,
        dpo_data=(rec.get("dpo_data") or {}).get("heldout"),
        introspection_data=(rec.get("introspection") or {}).get("heldout"),
        out_dir=cfg.build_dir() / "eval", seed=cfg.seed, device=cfg.device, build_dir=cfg.build_dir(),
        max_length=cfg.dpo_max_length, sft_max_length=cfg.sft_max_length, beta=cfg.dpo_loss.beta,
    )
    record_stage(cfg, "eval", {"report": result.get("report", {}), "names": list(checkpoints)})
    return result


def run_sequential(cfg: PipelineConfig) -> dict[str, Checkpoint]:
    """The sequential pipeline without Prefect (the flow runs the same stages as tasks)."""
    validate(cfg)
    questions = stage_expand_questions(cfg)
    data = stage_dpo_data(cfg, questions)
    dpo = stage_dpo(cfg, data)
    intro = stage_introspection(cfg, dpo)
    sft = stage_sft(cfg, intro, dpo)
    return {"dpo": dpo, "sft": sft, "final": sft}


class PipelineResult(BaseModel):
    persona: str
    mode: Literal["sequential", "paper"]
    base_model: str
    workdir: str
    build_id: str
    checkpoints: dict[str, str]
