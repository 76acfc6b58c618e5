"""The pipeline's stages as plain functions: config in, paths and checkpoint URIs out.

Prefect tasks wrap these one to one (tasks/); `character.build.direct` calls them without Prefect.
Every stage runs in one frame (character.build.frame): a stage already recorded as finished, with
its output still present, is not redone; otherwise its body runs and records what it produced in
the build's record as soon as it is produced, with the seconds its work took.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from character import progress
from character.build.checks import check_teacher_prompt_fits
from character.build.frame import StageRun, finished, framed, output_path, training_progress
from character.build.lock import build_lock
from character.build.record import Checkpoint, record_stage
from character.config import PipelineConfig
from character.datagen.distill import generate_dpo_pairs
from character.datagen.heldout import split_heldout
from character.datagen.introspection import generate_introspection
from character.datagen.questions import expand_questions, load_expanded_questions
from character.errors import UserError
from character.settings import Settings, Workspace, apply_threads
from character.tracking import log_evaluation, tracked, training_config
from character.train.dpo import run_dpo
from character.train.families import renderer_for
from character.train.losses import DPOCoefficients
from character.train.sft import run_sft


def _service(cfg: PipelineConfig):
    from character.backend.faults import with_faults

    settings = Settings()
    if cfg.backend == "tinker":
        from character.backend.tinker import TinkerService

        return with_faults(TinkerService(settings), settings.fault_rate, settings.fault_seed)
    from character.backend.local import LocalService

    if cfg.threads:  # set by the CLI (resolved there) or CHARACTER_THREADS; else torch's own count, which does
        apply_threads(cfg.threads)  # not move with the machine's load between two runs of one process
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


def _stage(name: str, resume: Callable[[dict], object] | None = output_path):
    """The frame (character.build.frame) with this module's service, looked up at each call (tests replace it)."""
    return framed(name, lambda cfg: _service(cfg), resume)


# -- data -----------------------------------------------------------------------------------------
def _teacher_and_student(cfg: PipelineConfig, svc):
    teacher_name = cfg.teacher_model or cfg.base_model
    student = svc.create_sampling_client(base_model=cfg.base_model)
    teacher = student if teacher_name == cfg.base_model else svc.create_sampling_client(base_model=teacher_name)
    return teacher_name, teacher, student


def _renderer(cfg: PipelineConfig, client, role: str):
    """The renderer of the build's student (and its checkpoints) or teacher, by model name."""
    model = cfg.base_model if role == "student" else (cfg.teacher_model or cfg.base_model)
    return renderer_for(client.get_tokenizer(), model)


def _record_split(run: StageRun, out: Path, stats: dict) -> str:
    """Split a generated file into its training and held-out sides, record both; the training side."""
    train, held, split = split_heldout(out, run.cfg.heldout_fraction, run.cfg.seed)
    run.record({"path": str(train), "all": str(out), "heldout": str(held), **stats, **split})
    return str(train)


@_stage("questions")
def stage_expand_questions(run: StageRun) -> str | None:
    """Optional: more questions per trait from the teacher, near-duplicates dropped."""
    cfg = run.cfg
    if cfg.counts.expand_questions == 0:
        return None
    _, teacher, _ = _teacher_and_student(cfg, run.service)
    check_teacher_prompt_fits(cfg, cfg.constitution(), teacher)
    out = cfg.paths.questions
    with run.working():
        stats = expand_questions(
            cfg.constitution(), teacher, _renderer(cfg, teacher, "teacher"), cfg.counts.expand_questions, cfg.seed, out
        )
    run.record({"path": str(out), **stats})
    return str(out)


@_stage("dpo_data")
def stage_dpo_data(run: StageRun, questions_path: str | None = None) -> str:
    cfg, c = run.cfg, run.cfg.constitution()
    teacher_name, teacher, student = _teacher_and_student(cfg, run.service)
    check_teacher_prompt_fits(cfg, c, teacher)
    out = cfg.paths.dpo_pairs
    n_prompts = -(-cfg.counts.dpo_pairs // cfg.counts.samples_per_prompt)
    with run.working(total=n_prompts):
        stats = generate_dpo_pairs(
            c,
            teacher,
            student,
            _renderer(cfg, teacher, "teacher"),
            _renderer(cfg, student, "student"),
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
            f"{cfg.paths.skipped(out)}): answers cut off at --max-new-tokens "
            f"{cfg.max_new_tokens} count as incomplete, so raise it (with a new --build-id)"
        )
    return _record_split(run, out, stats)


@_stage("introspection")
def stage_introspection(run: StageRun, dpo: Checkpoint) -> str:
    cfg, n = run.cfg, run.cfg.counts
    model = run.service.create_sampling_client(model_path=dpo.sampler)
    out = cfg.paths.introspection
    with run.working(total=n.reflections + n.interactions):
        stats = generate_introspection(
            cfg.constitution(),
            model,
            _renderer(cfg, model, "student"),
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
    return _record_split(run, out, stats)


# -- training -------------------------------------------------------------------------------------
@_stage("dpo", resume=Checkpoint.from_record)
def stage_dpo(run: StageRun, data_path: str, on_step=None) -> Checkpoint:
    cfg, svc = run.cfg, run.service
    with run.working(), tracked(cfg, "dpo", training_config("dpo", cfg.dpo)) as track:
        result = run_dpo(
            svc,
            start=lambda: svc.create_lora_training_client(
                cfg.base_model, rank=cfg.lora_rank, seed=cfg.seed, alpha=cfg.lora_alpha
            ),
            reference=lambda: svc.create_sampling_client(base_model=cfg.base_model),
            renderer=renderer_for(svc.get_tokenizer(cfg.base_model), cfg.base_model),
            data_path=Path(data_path),
            run_dir=cfg.paths.run("dpo"),
            cfg=cfg.dpo,
            coef=DPOCoefficients(**cfg.dpo_loss.model_dump()),
            max_length=cfg.dpo_max_length,
            on_step=training_progress(on_step, track),
        )
    ckpt = Checkpoint(stage="dpo", state=result.state, sampler=result.sampler, steps=result.steps)
    run.record({**ckpt.model_dump(), **_alpha(result)})
    return ckpt


@_stage("sft", resume=Checkpoint.from_record)
def stage_sft(run: StageRun, data_path: str, dpo: Checkpoint | None, on_step=None) -> Checkpoint:
    """Sequential mode continues from the DPO state at lr x sft_lr_multiplier; paper mode starts from base."""
    cfg, svc = run.cfg, run.service
    if dpo is not None:
        opt = cfg.sft.model_copy(update={"learning_rate": cfg.sft.learning_rate * cfg.sft_lr_multiplier})
        start = lambda: svc.create_training_client_from_state(dpo.state)
    else:
        opt = cfg.sft
        start = lambda: svc.create_lora_training_client(
            cfg.base_model, rank=cfg.lora_rank, seed=cfg.seed, alpha=cfg.lora_alpha
        )
    with run.working(), tracked(cfg, "sft", training_config("sft", opt)) as track:
        result = run_sft(
            svc,
            start,
            renderer_for(svc.get_tokenizer(cfg.base_model), cfg.base_model),
            Path(data_path),
            cfg.paths.run("sft"),
            opt,
            cfg.sft_max_length,
            on_step=training_progress(on_step, track),
        )
    ckpt = Checkpoint(stage="sft", state=result.state, sampler=result.sampler, steps=result.steps)
    run.record({**ckpt.model_dump(), "learning_rate": opt.learning_rate, **_alpha(result)})
    return ckpt


def _alpha(result) -> dict:
    # the LoRA alpha the backend trained with, where it fixes its own (Tinker): learning rates depend on it
    return {"lora_alpha": result.lora_alpha} if result.lora_alpha is not None else {}


def _local_adapter(cfg: PipelineConfig, ckpt: Checkpoint) -> str:
    """A local adapter folder for a checkpoint; Tinker checkpoints are downloaded and converted once."""
    if not ckpt.sampler.startswith("tinker://"):
        return ckpt.sampler
    from character.weights.tinker_export import download_adapter

    dst = cfg.paths.download(ckpt.stage)
    if not (dst / "adapter_config.json").is_file():
        download_adapter(_service(cfg), ckpt.state, dst, base_model=cfg.base_model)
    return str(dst)


@_stage("merged", resume=Checkpoint.from_record)
def stage_merge(run: StageRun, dpo: Checkpoint, sft: Checkpoint) -> Checkpoint:
    """Paper mode: the exact merge dpo_weight x dW_dpo + sft_weight x dW_sft (no renormalization)."""
    from character.storage import file_uri
    from character.weights.merge import merge_adapters

    cfg = run.cfg
    w_dpo, w_sft = cfg.merge_weights
    res = merge_adapters(
        _local_adapter(cfg, dpo),
        _local_adapter(cfg, sft),
        cfg.paths.merged,
        dpo_weight=w_dpo,
        sft_weight=w_sft,
        method="exact",
        overwrite=True,
    )
    ckpt = Checkpoint(stage="merged", state=file_uri(res.output), sampler=file_uri(res.output), steps=0)
    run.record({**ckpt.model_dump(), "method": res.method, "rank": res.rank, "weights": list(res.weights)})
    return ckpt


# -- evaluation -----------------------------------------------------------------------------------
def _evaluated(cfg: PipelineConfig, checkpoints: dict[str, Checkpoint]) -> dict | None:
    """The result of an earlier evaluation of these same checkpoints, if its metrics file is still there."""
    done = finished(cfg, "eval", quiet=True)
    metrics_json = ((done or {}).get("report") or {}).get("metrics_json")
    if not (done and done.get("names") == list(checkpoints) and metrics_json and Path(metrics_json).is_file()):
        return None
    progress.note("eval", f"skipped: finished at {done['finished_at'][:19]}Z for these checkpoints")
    return json.loads(Path(metrics_json).read_text())


def _to_evaluate(cfg: PipelineConfig, checkpoints: dict[str, Checkpoint]) -> tuple[dict, list[str], list[str]]:
    """The checkpoints this build can evaluate, their URIs, and notes on those it leaves out."""
    if cfg.backend != "tinker":
        return checkpoints, [_local_adapter(cfg, c) for c in checkpoints.values()], []
    # remotely; a local (merged) adapter cannot go to Tinker, so it is left out
    chosen = {k: c for k, c in checkpoints.items() if c.sampler.startswith("tinker://")}
    notes = [
        f"{k} ({c.sampler}) is a local adapter of a model Tinker serves and is not evaluated "
        f"here: `character eval {c.sampler} --base-model <local copy of {cfg.base_model}>`"
        for k, c in checkpoints.items()
        if k not in chosen
    ]
    return chosen, [c.sampler for c in chosen.values()], notes


@_stage("eval", resume=None)  # whether an earlier evaluation holds depends on the checkpoints asked for
def stage_evaluate(run: StageRun, checkpoints: dict[str, Checkpoint]) -> dict:
    """Evaluate the named checkpoints against the base model on the build's held-out data.

    With `--no-eval` the record says so, and nothing is evaluated. A Tinker build is evaluated on
    Tinker through sampling clients of its tinker:// checkpoints (nothing is downloaded); a merged
    adapter of such a build is local and is left out, with a note saying how to evaluate it. The
    revealed-preference judge is CHARACTER_REVEALED_JUDGE (unset: skipped, said so). The record's
    "eval" stage keeps the per-model summary (`summary`) that `character pipeline --json` shows, the
    revealed-preference outcome, and the report's paths."""
    from character.evaluation.coherence import coherence_summary
    from character.evaluation.evaluate import evaluate_checkpoints
    from character.evaluation.options import EvalOptions

    cfg = run.cfg
    if not cfg.evaluate:
        progress.note("eval", "skipped: --no-eval")
        return {"eval": record_unevaluated(cfg, list(checkpoints), "evaluation was turned off (--no-eval)")}
    if (earlier := _evaluated(cfg, checkpoints)) is not None:
        return earlier
    chosen, uris, notes = _to_evaluate(cfg, checkpoints)
    if not uris:
        return {"eval": record_unevaluated(cfg, list(checkpoints), "; ".join(notes))}
    settings = Settings()
    with run.working(total=len(uris)):  # evaluate_checkpoints may update() per checkpoint
        result = evaluate_checkpoints(
            uris,
            EvalOptions.for_build(cfg, settings, names=list(chosen), notes=notes),
            service=run.service if cfg.backend == "tinker" else None,  # metered: its tokens are recorded
        )
    report = {k: v for k, v in result.get("report", {}).items() if k != "table"}
    run.record(
        {
            "report": report,
            "names": list(checkpoints),
            "summary": result["eval"],
            "revealed": revealed_summary(result.get("revealed")),
            "coherence": coherence_summary(result.get("coherence")),
            "capability": result.get("capability"),
            "specificity": result.get("specificity"),
        }
    )
    log_evaluation(cfg, result)  # after the record: tracking never costs a build its evaluation
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
