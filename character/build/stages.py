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

from pydantic import BaseModel, Field

from character import progress
from character.build.lock import build_lock
from character.config import DPOLoss, PipelineConfig, check_inputs  # noqa: F401 - config is light, for the CLI
from character.datagen.distill import generate_dpo_pairs
from character.datagen.introspection import generate_introspection
from character.datagen.questions import expand_questions, load_expanded_questions
from character.errors import UserError
from character.persona.constitution import Constitution
from character.settings import Settings, Workspace
from character.storage import uri_to_path, write_json_atomic
from character.train.dpo import run_dpo
from character.train.losses import DPOCoefficients
from character.train.renderer import Renderer
from character.train.sft import run_sft


class Checkpoint(BaseModel):
    stage: str
    state: str = Field(description="resumable training state URI")
    sampler: str = Field(description="sampler weights / adapter URI")
    steps: int


# Settings that may change between runs of one build without changing what it produces.
_RUN_ONLY = {
    "workdir",
    "device",
    "max_in_flight",
    "evaluate",
    "merge",
    "build_id",
    "micro_batch_size",
    "memory_budget_gb",
    "gradient_checkpointing",
}


def check_same_build(cfg: PipelineConfig) -> None:
    """A build id names one set of inputs: rerunning it with others would mix two builds' stages."""
    old = read_record(cfg).get("config")
    if not old:
        return
    new = cfg.model_dump(mode="json")
    for d in (old, new):  # how many old states are kept does not change what a build produces
        for stage in ("dpo", "sft"):
            (d.get(stage) or {}).pop("keep_states", None)
    changed = sorted(k for k in set(old) | set(new) if k not in _RUN_ONLY and old.get(k) != new.get(k))
    if changed:
        raise UserError(
            f"build {cfg.build_id!r} of {cfg.constitution().name} was started with other settings "
            f"({', '.join(changed)}); rerun it unchanged or use a new --build-id"
        )


def validate(cfg: PipelineConfig) -> Constitution:
    """Everything that can be checked before a model is loaded or an API call is paid for."""
    c = check_inputs(cfg)  # constitution, workdir, local model names
    check_same_build(cfg)
    if cfg.backend == "tinker":
        from character.backend.tinker import check_ready

        check_ready(Settings(), cfg.base_model, cfg.teacher_model)  # key and model names, no network
    judge = Settings().revealed_judge
    if cfg.evaluate and judge:  # a bad judge name or a missing key fails now, not after training
        from character.evaluation.models import check_tinker_key, model_side

        if model_side(judge, "CHARACTER_REVEALED_JUDGE") == "tinker":
            check_tinker_key()
    return c


def _service(cfg: PipelineConfig):
    from character.backend.faults import with_faults

    settings = Settings()
    if cfg.backend == "tinker":
        from character.backend.tinker import TinkerService

        return with_faults(TinkerService(settings), settings.fault_rate, settings.fault_seed)
    from character.backend.local import LocalService

    svc = LocalService(
        Workspace(cfg.workdir),
        device=cfg.device,
        seed=cfg.seed,
        micro_batch_size=cfg.micro_batch_size,
        memory_budget_gb=cfg.memory_budget_gb,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    return with_faults(svc, settings.fault_rate, settings.fault_seed)


def lock_build(cfg: PipelineConfig):
    """The build's one-writer lock (character.build.lock), held for a whole run; re-entrant in a process."""
    return build_lock(cfg.build_dir(), f"{cfg.constitution().name}/{cfg.build_id}")


# -- build record -------------------------------------------------------------------------------
def read_record(cfg: PipelineConfig) -> dict:
    path = cfg.build_dir() / "record.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def record_stage(cfg: PipelineConfig, stage: str, value: dict) -> None:
    path = cfg.build_dir() / "record.json"
    rec = read_record(cfg) or {
        "persona": cfg.constitution().name,
        "build_id": cfg.build_id,
        "config": cfg.model_dump(mode="json"),
        "stages": {},
    }
    rec["stages"][stage] = {**value, "finished_at": datetime.now(timezone.utc).isoformat()}
    write_json_atomic(path, rec)


def list_checkpoints(workdir: str | Path, persona: str | None = None) -> list[dict]:
    """Every checkpoint any build recorded in this workspace, newest first."""
    rows = []
    for path in (Path(workdir).expanduser() / "builds").glob(f"{persona or '*'}/*/record.json"):
        rec = json.loads(path.read_text())
        for stage, st in rec.get("stages", {}).items():
            if "sampler" in st:
                rows.append(
                    {
                        "persona": rec["persona"],
                        "build_id": rec["build_id"],
                        "stage": stage,
                        "uri": st["sampler"],
                        "state": st.get("state"),
                        "finished_at": st["finished_at"],
                    }
                )
    return sorted(rows, key=lambda r: r["finished_at"], reverse=True)


def recorded(cfg: PipelineConfig, stage: str, key: str) -> str | None:
    """A value a finished stage of this build recorded (e.g. its output path), if any."""
    return (read_record(cfg).get("stages", {}).get(stage) or {}).get(key)


def _finished(cfg: PipelineConfig, stage: str, quiet: bool = False) -> dict | None:
    """The record of a finished stage whose output is still there (a rerun skips it, and says so)."""
    done = read_record(cfg).get("stages", {}).get(stage)
    if not done:
        return None
    for key in ("path", "sampler", "state"):
        if (
            key in done and done[key] and not done[key].startswith("tinker://") and not uri_to_path(done[key]).exists()
        ):  # tinker:// outputs live on the service
            progress.note(stage, f"recorded as finished, but {done[key]} is gone: doing it again")
            return None
    if not quiet:
        progress.note(stage, f"skipped: finished at {done['finished_at'][:19]}Z and its output is present")
    return done


def _steps(on_step):
    """Training steps as progress of the current stage, then the caller's own callback."""

    def both(step: int, total: int, metrics: dict) -> None:
        progress.update(step, total)
        if on_step is not None:
            on_step(step, total, metrics)

    return both


# -- held-out split ----------------------------------------------------------------------------------
def split_heldout(path: Path, fraction: float, seed: int) -> tuple[Path, Path, dict]:
    """Write <data>/train/<name> and <data>/heldout/<name>, and return counts of both sides.

    DPO rows are split by prompt: all rows whose user prompt is the same text (whitespace and case
    normalised) land on one side, so no held-out prompt is ever trained on, however often the pool
    repeats. Introspection rows are split by item: their prompts are the fixed ten reflection prompts
    and the greetings, by design repeated; holding one out would drop a whole category from training.
    Which side a group lands on depends only on its key and the seed.
    """
    from character.datagen.engine import item_seed, normalize_prompt
    from character.storage import read_jsonl, write_text_atomic

    rows = read_jsonl(path)
    keys = [
        ("prompt", normalize_prompt(r["prompt"][-1]["content"]))
        if "prompt" in r
        else (r.get("kind", ""), r["meta"]["index"])
        for r in rows
    ]
    groups = sorted(set(keys))
    n_held = min(len(groups) - 1, max(1 if fraction > 0 else 0, round(fraction * len(groups))))
    held = set(sorted(groups, key=lambda k: item_seed(seed, "heldout", *k))[: max(0, n_held)])
    train_path, held_path = path.parent / "train" / path.name, path.parent / "heldout" / path.name
    for out, keep in ((train_path, False), (held_path, True)):
        write_text_atomic(
            out, "".join(json.dumps(r, sort_keys=True) + "\n" for r, k in zip(rows, keys) if (k in held) == keep)
        )
    n_held_rows = sum(k in held for k in keys)
    return (
        train_path,
        held_path,
        {
            "split_by": "prompt" if any(k[0] == "prompt" for k in keys) else "item",
            "train_rows": len(rows) - n_held_rows,
            "heldout_rows": n_held_rows,
            "train_groups": len(groups) - len(held),
            "heldout_groups": len(held),
        },
    )


# -- stages ---------------------------------------------------------------------------------------
def _teacher_and_student(cfg: PipelineConfig, svc):
    teacher_name = cfg.teacher_model or cfg.base_model
    student = svc.create_sampling_client(base_model=cfg.base_model)
    teacher = student if teacher_name == cfg.base_model else svc.create_sampling_client(base_model=teacher_name)
    return teacher_name, teacher, student


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


def stage_expand_questions(cfg: PipelineConfig) -> str | None:
    """Optional: more questions per trait from the teacher, near-duplicates dropped."""
    if cfg.counts.expand_questions == 0:
        return None
    if done := _finished(cfg, "questions"):
        return done["path"]
    svc = _service(cfg)
    _, teacher, _ = _teacher_and_student(cfg, svc)
    check_teacher_prompt_fits(cfg, cfg.constitution(), teacher)
    out = cfg.build_dir() / "data" / "questions.jsonl"
    t0 = time.perf_counter()
    with progress.stage("questions"):
        stats = expand_questions(
            cfg.constitution(), teacher, Renderer(teacher.get_tokenizer()), cfg.counts.expand_questions, cfg.seed, out
        )
    record_stage(cfg, "questions", {"path": str(out), **stats, "seconds": round(time.perf_counter() - t0, 2)})
    return str(out)


def stage_dpo_data(cfg: PipelineConfig, questions_path: str | None = None) -> str:
    if done := _finished(cfg, "dpo_data"):
        return done["path"]
    c = cfg.constitution()
    svc = _service(cfg)
    teacher_name, teacher, student = _teacher_and_student(cfg, svc)
    check_teacher_prompt_fits(cfg, c, teacher)
    out = cfg.build_dir() / "data" / "dpo.jsonl"
    t0 = time.perf_counter()
    n_prompts = -(-cfg.counts.dpo_pairs // cfg.counts.samples_per_prompt)
    with progress.stage("dpo_data", total=n_prompts):
        stats = generate_dpo_pairs(
            c,
            teacher,
            student,
            Renderer(teacher.get_tokenizer()),
            Renderer(student.get_tokenizer()),
            n_prompts,
            cfg.seed,
            out,
            cfg.max_new_tokens,
            samples_per_prompt=cfg.counts.samples_per_prompt,
            window=cfg.max_in_flight,
            extra_questions=load_expanded_questions(questions_path),
            provenance={"teacher": teacher_name, "student": cfg.base_model},
            max_length=cfg.dpo_max_length,
        )
    if stats["rows"] == 0:
        raise UserError(
            f"no DPO pairs survived the filters (dropped: {stats['dropped']}; the reasons per row are in "
            f"{out.with_name(out.name + '.skipped.jsonl')}): answers cut off at --max-new-tokens "
            f"{cfg.max_new_tokens} count as incomplete, so raise it (with a new --build-id)"
        )
    train, held, split = split_heldout(out, cfg.heldout_fraction, cfg.seed)
    record_stage(
        cfg,
        "dpo_data",
        {
            "path": str(train),
            "all": str(out),
            "heldout": str(held),
            **stats,
            **split,
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
    return str(train)


def stage_dpo(cfg: PipelineConfig, data_path: str, on_step=None) -> Checkpoint:
    if done := _finished(cfg, "dpo"):
        return Checkpoint(**{k: done[k] for k in ("stage", "state", "sampler", "steps")})
    svc = _service(cfg)
    t0 = time.perf_counter()
    with progress.stage("dpo"):
        result = run_dpo(
            svc,
            start=lambda: svc.create_lora_training_client(
                cfg.base_model, rank=cfg.lora_rank, seed=cfg.seed, alpha=cfg.lora_alpha
            ),
            reference=lambda: svc.create_sampling_client(base_model=cfg.base_model),
            renderer=Renderer(svc.get_tokenizer(cfg.base_model)),
            data_path=Path(data_path),
            run_dir=cfg.build_dir() / "dpo",
            cfg=cfg.dpo,
            coef=DPOCoefficients(**cfg.dpo_loss.model_dump()),
            max_length=cfg.dpo_max_length,
            on_step=_steps(on_step),
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
    with progress.stage("introspection", total=n.reflections + n.interactions):
        stats = generate_introspection(
            c,
            model,
            Renderer(model.get_tokenizer()),
            n.reflections,
            n.interactions,
            n.turns,
            cfg.seed,
            out,
            cfg.max_new_tokens,
            window=cfg.max_in_flight,
            provenance={"model": dpo.sampler},
            max_length=cfg.sft_max_length,
        )
    if stats["rows"] == 0:
        raise RuntimeError("no introspection data was produced")
    train, held, split = split_heldout(out, cfg.heldout_fraction, cfg.seed)
    record_stage(
        cfg,
        "introspection",
        {
            "path": str(train),
            "all": str(out),
            "heldout": str(held),
            **stats,
            **split,
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
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
            cfg.base_model, rank=cfg.lora_rank, seed=cfg.seed, alpha=cfg.lora_alpha
        )
    t0 = time.perf_counter()
    with progress.stage("sft"):
        result = run_sft(
            svc,
            start,
            Renderer(svc.get_tokenizer(cfg.base_model)),
            Path(data_path),
            cfg.build_dir() / "sft",
            opt,
            cfg.sft_max_length,
            on_step=_steps(on_step),
        )
    ckpt = Checkpoint(stage="sft", state=result.state, sampler=result.sampler, steps=result.steps)
    record_stage(
        cfg,
        "sft",
        {**ckpt.model_dump(), "learning_rate": opt.learning_rate, "seconds": round(time.perf_counter() - t0, 2)},
    )
    return ckpt


def _local_adapter(cfg: PipelineConfig, ckpt: Checkpoint) -> str:
    """A local adapter folder for a checkpoint; Tinker checkpoints are downloaded and converted once."""
    if not ckpt.sampler.startswith("tinker://"):
        return ckpt.sampler
    from character.weights.tinker_export import download_adapter

    dst = cfg.build_dir() / "downloads" / ckpt.stage
    if not (dst / "adapter_config.json").is_file():
        download_adapter(_service(cfg), ckpt.state, dst, base_model=cfg.base_model)
    return str(dst)


def stage_merge(cfg: PipelineConfig, dpo: Checkpoint, sft: Checkpoint) -> Checkpoint:
    """Paper mode: the exact merge dpo_weight x dW_dpo + sft_weight x dW_sft (no renormalization)."""
    if done := _finished(cfg, "merged"):
        return Checkpoint(**{k: done[k] for k in ("stage", "state", "sampler", "steps")})
    from character.storage import file_uri
    from character.weights.merge import merge_adapters

    out = cfg.build_dir() / "merged"
    w_dpo, w_sft = cfg.merge_weights
    res = merge_adapters(
        _local_adapter(cfg, dpo),
        _local_adapter(cfg, sft),
        out,
        dpo_weight=w_dpo,
        sft_weight=w_sft,
        method="exact",
        overwrite=True,
    )
    ckpt = Checkpoint(stage="merged", state=file_uri(res.output), sampler=file_uri(res.output), steps=0)
    record_stage(
        cfg, "merged", {**ckpt.model_dump(), "method": res.method, "rank": res.rank, "weights": list(res.weights)}
    )
    return ckpt


def stage_evaluate(cfg: PipelineConfig, checkpoints: dict[str, Checkpoint]) -> dict:
    """Evaluate the named checkpoints against the base model on the build's held-out data.

    A Tinker build is evaluated on Tinker through sampling clients of its tinker:// checkpoints (nothing
    is downloaded); a merged adapter of such a build is local and is left out, with a note saying how to
    evaluate it. The revealed-preference judge is CHARACTER_REVEALED_JUDGE (unset: skipped, said so).
    The record's "eval" stage keeps the per-model summary (`summary`) that `character pipeline --json`
    shows, the revealed-preference outcome, and the report's paths."""
    from character.evaluation.evaluate import evaluate_checkpoints
    from character.evaluation.options import EvalOptions

    done = _finished(cfg, "eval", quiet=True)
    metrics_json = ((done or {}).get("report") or {}).get("metrics_json")
    if done and done.get("names") == list(checkpoints) and metrics_json and Path(metrics_json).is_file():
        progress.note("eval", f"skipped: finished at {done['finished_at'][:19]}Z for these checkpoints")
        return json.loads(Path(metrics_json).read_text())
    t0 = time.perf_counter()
    notes: list[str] = []
    if cfg.backend == "tinker":  # remotely; a local (merged) adapter cannot go to Tinker, so it is left out
        chosen = {k: c for k, c in checkpoints.items() if c.sampler.startswith("tinker://")}
        for k, c in checkpoints.items():
            if k not in chosen:
                notes.append(
                    f"{k} ({c.sampler}) is a local adapter of a model Tinker serves and is not evaluated "
                    f"here: `character eval {c.sampler} --base-model <local copy of {cfg.base_model}>`"
                )
        uris = [c.sampler for c in chosen.values()]
    else:
        chosen = checkpoints
        uris = [_local_adapter(cfg, c) for c in checkpoints.values()]
    if not uris:
        return {"eval": record_unevaluated(cfg, list(checkpoints), "; ".join(notes))}
    settings = Settings()
    with progress.stage("eval", total=len(uris)):  # evaluate_checkpoints may update() per checkpoint
        result = evaluate_checkpoints(
            uris,
            EvalOptions.for_build(cfg, settings, names=list(chosen), notes=notes),
            service=_service(cfg) if cfg.backend == "tinker" else None,
        )
    report = {k: v for k, v in result.get("report", {}).items() if k != "table"}
    record_stage(
        cfg,
        "eval",
        {
            "report": report,
            "names": list(checkpoints),
            "summary": result["eval"],
            "revealed": revealed_summary(result.get("revealed")),
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
    return result


def revealed_summary(rev: dict | None) -> dict | None:
    """What the build record keeps of the revealed preferences: the outcome or the reason, and each
    constitution trait's Elo change from base to final (metrics.json holds every rating and game)."""
    if not rev:
        return None
    if rev.get("status") != "computed":
        return {"status": rev.get("status"), "reason": rev.get("reason")}
    final = rev.get("final")
    changes = rev["changes"].get(final, {}) if final else {}
    return {
        "status": "computed",
        "judge_model": rev["judge_model"],
        "games_per_model": rev["games_per_model"],
        "final": final,
        "constitution_trait_changes": {t: changes[t] for t in rev["constitution_traits"] if t in changes},
    }


def record_unevaluated(cfg: PipelineConfig, names: list[str], reason: str) -> dict:
    """A build whose checkpoints are not evaluated still says so, and why, where users look."""
    from character.evaluation.metrics import unevaluated

    summary = unevaluated(names, reason)
    record_stage(cfg, "eval", {"names": names, "summary": summary})
    return summary


def run_sequential(cfg: PipelineConfig) -> dict[str, Checkpoint]:
    """The sequential pipeline without Prefect (the flow runs the same stages as tasks)."""
    validate(cfg)
    with lock_build(cfg):
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
