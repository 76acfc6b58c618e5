"""The entry point of an evaluation: `evaluate_checkpoints` checks its options, finds the checkpoints,
the build that made them and its data (character.evaluation.targets, .data), picks the service (local
folders: a LocalService; tinker:// paths: a TinkerService), runs character.evaluation.run.evaluate_models
and writes the report (character.evaluation.report).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from character.build.paths import BuildPaths
from character.config import check_local_model
from character.evaluation.capability import load_capability_set
from character.evaluation.data import given_files, load_data, training_curves
from character.evaluation.models import Services, checkpoints_side
from character.evaluation.options import EvalOptions
from character.evaluation.run import evaluate_models
from character.evaluation.sections import Sections
from character.evaluation.targets import (
    EvalTarget,
    build_of,
    inspect_checkpoint,
    label_checkpoints,
    recorded_base_model,
)
from character.persona.constitution import load_constitution
from character.persona.prompts import teacher_system_prompt
from character.settings import Workspace
from character.storage import write_json_atomic


def evaluate_checkpoints(checkpoints: list[str], options: EvalOptions, service=None) -> dict:
    """Evaluate checkpoints (and the base model) and write a report; returns the results.

    Checkpoints are local folders (run on a LocalService) or all `tinker://` paths (run remotely on a
    TinkerService: nothing is downloaded); `service`, if given, runs them instead. What data, judges and
    report folder are used: EvalOptions. Every check of the options runs before any model loads.
    """
    o = options
    o.check_counts(checkpoints)
    c = load_constitution(o.persona)
    ws = Workspace(o.workdir)
    side = checkpoints_side(checkpoints)
    targets, base_model = _targets(checkpoints, side, o.base_model)
    o.check_models_and_files()
    capability = load_capability_set(o.capability_set, o.limit) if o.capability else None

    build, stages, found_notes = _find_build(ws, targets, o)
    label_checkpoints(targets, stages, o.names)
    data = load_data(given_files(build, o.dpo_data, o.introspection_data, o.train_data), o.limit, o.prompts)
    data.notes = list(o.notes or []) + found_notes + data.notes

    if service is None:
        service = _default_service(side, ws, o)
    services = Services(service, side, ws, device=o.device, seed=o.seed)
    judge = services.judge(o.judge_model, "--judge-model") if o.judge_model is not None else None
    revealed = services.judge(o.revealed_judge, "--revealed-judge") if o.revealed_judge is not None else None
    sections = Sections(
        prompted_system=teacher_system_prompt(c) if o.prompted else None,  # exactly the teacher's
        prefill=o.prefill,
        capability=capability,
        coherence_judge=services.judge(o.coherence_judge, "--coherence-judge") if o.coherence_judge else None,
        coherence_judge_name=o.coherence_judge,
    )
    if side == "tinker" and base_model is None:
        base_model = _remote_base(service, build, targets)
    if o.specificity:
        sections.specificity = _specificity_setup(service, ws, o, build, base_model)
    result = evaluate_models(
        service,
        base_model,
        {x.label: x.source if side == "tinker" else str(x.path) for x in targets},
        c,
        data,
        classifier_path=o.classifier,
        judge=judge,
        judge_name=o.judge_model,
        revealed_judge=revealed,
        revealed_judge_name=o.revealed_judge,
        revealed_games=o.revealed_games,
        max_new_tokens=o.max_new_tokens,
        beta=o.beta,
        max_length=o.max_length,
        sft_max_length=o.sft_max_length,
        seed=o.seed,
        sections=sections,
    )
    _add_targets(result, targets, build)
    return write_outputs(result, _out_dir(o, build, ws, c.name, result), training_dirs=training_curves(build))


def _targets(checkpoints: list[str], side: str, base_model: str | None) -> tuple[list[EvalTarget], str | None]:
    """The checkpoints as found here, and the base model: given, else the one local checkpoints record
    (for tinker:// ones it is found later, from their build or from Tinker)."""
    if side == "tinker":
        from character.backend.tinker import parse_checkpoint_path

        for s in checkpoints:
            parse_checkpoint_path(s, "any", "evaluation")  # a malformed path fails before anything runs
        return [EvalTarget(s, Path(s.removeprefix("tinker://")), "tinker", None) for s in checkpoints], base_model
    targets = [inspect_checkpoint(s) for s in checkpoints]
    base_model = base_model or recorded_base_model(targets)
    check_local_model(base_model)
    return targets, base_model


def _find_build(
    ws: Workspace, targets: list[EvalTarget], o: EvalOptions
) -> tuple[Path | None, dict[str, str], list[str]]:
    """The build: named, else the one whose record lists the checkpoints, else the one the given data is in.
    Also each checkpoint's stage, and notes."""
    build, stages, notes = build_of(ws, [x.source for x in targets])
    if o.build_dir is not None:
        build = Path(o.build_dir)
    elif build is None and (o.dpo_data or o.introspection_data):
        found = BuildPaths.containing(Path(o.dpo_data or o.introspection_data))
        build = found.root if found else None
    elif build is None:
        notes.append(
            f"no build in {ws.root} lists these checkpoints: give --dpo-data and --train-data "
            "for preference and persona metrics"
        )
    return build, stages, notes


def _specificity_setup(service, ws: Workspace, o: EvalOptions, build: Path | None, base_model: str):
    """The reference set's teacher and sampling: given, else the build's config, else the base model
    and this evaluation's length."""
    from character.evaluation.reference_set import ReferenceSampling
    from character.evaluation.specificity import SpecificitySetup

    config = _recorded_config(build)
    teacher = o.teacher_model or config.get("teacher_model") or config.get("base_model") or base_model
    length = o.reference_max_new_tokens or config.get("max_new_tokens") or o.max_new_tokens
    return SpecificitySetup(
        teacher=lambda: service.create_sampling_client(base_model=teacher),
        sampling=ReferenceSampling(str(teacher), int(length), o.seed),
        cache=ws.reference_answers,
        per_persona=o.reference_per_persona,
        classifier_path=o.classifier,
    )


def _recorded_config(build: Path | None) -> dict:
    rec = BuildPaths(build).record if build else None
    try:
        return (json.loads(rec.read_text()).get("config") or {}) if rec is not None and rec.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _default_service(side: str, ws: Workspace, o: EvalOptions):
    if side == "tinker":
        from character.evaluation.models import tinker_service

        return tinker_service()
    from character.backend.local import LocalService

    return LocalService(ws, device=o.device, seed=o.seed)


def _remote_base(service, build: Path | None, targets: list[EvalTarget]) -> str:
    """The base model of tinker:// checkpoints: their build's, else what Tinker records for the first."""
    name = _recorded_config(build).get("base_model")
    if name:
        return name
    from character.evaluation.models import remote_base_model

    return remote_base_model(service, targets[0].source)


def _add_targets(result: dict, targets: list[EvalTarget], build: Path | None) -> None:
    """What each evaluated model is (adapter, model, tinker, base) and where it came from."""
    for x in targets:
        result["checkpoints"][x.label] = {"kind": x.kind, **result["checkpoints"][x.label], "checkpoint": x.source}
    result["checkpoints"]["base"]["kind"] = "base"
    result["build"] = str(build) if build else None


def _out_dir(o: EvalOptions, build: Path | None, ws: Workspace, persona: str, result: dict) -> Path:
    if o.out_dir:
        return Path(o.out_dir)
    stamp = datetime.fromisoformat(result["started_at"]).strftime("%Y%m%d-%H%M%S")
    return BuildPaths(build).eval / stamp if build else ws.root / "evals" / persona / stamp


def write_outputs(result: dict, out: Path, training_dirs: dict[str, Path] | None = None) -> dict:
    """report.md (+ report.html, plots) and metrics.json in `out`; `result` gains their paths."""
    from character.evaluation.report import write_report

    out = Path(out)
    result["report"] = write_report(result, out, training_dirs=training_dirs)
    result["report"]["metrics_json"] = str(out / "metrics.json")
    result["eval"]["report"] = result["report"]["markdown"]
    write_json_atomic(out / "metrics.json", result)
    return result
