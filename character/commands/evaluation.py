"""`character eval`: checkpoints against their base model; a report, and a summary on the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from character.commands.workspace import settings_for, use_threads
from character.errors import UserError

_BUILD = typer.Option(
    None,
    "--build",
    help="cross-persona evaluation: a build (<persona>/<build id>, a build id or its folder), once per "
    "persona, two personas at least; no checkpoints then",
)

_CLASSIFIER = typer.Option(
    None, help="a local Hugging Face encoder folder for the persona classifier (default: TF-IDF + logistic regression)"
)

_REVEALED_JUDGE = typer.Option(
    None,
    help="judge of the revealed-preference evaluation: a model Tinker serves, a tinker:// path or a local "
    "model folder (env CHARACTER_REVEALED_JUDGE; unset: skipped, and the report says so)",
)

_COHERENCE_JUDGE = typer.Option(
    None,
    help="judge of the pairwise coherence comparisons (final vs base, final vs prompted): a model Tinker "
    "serves, a tinker:// path or a local model folder (env CHARACTER_COHERENCE_JUDGE; unset: skipped)",
)

_CAPABILITY_SET = typer.Option(
    None,
    help="multiple-choice set for the capability probe: JSONL of question, choices, answer (an exported "
    "ARC or MMLU split loads as is; env CHARACTER_CAPABILITY_SET; default: a small shipped set)",
)


def eval_command(
    checkpoints: Optional[list[str]] = typer.Argument(
        None,
        help="adapter folders, merged adapters or folded model folders; "
        "or tinker:// checkpoints (evaluated remotely on Tinker)",
    ),
    persona: Optional[str] = typer.Option(None, help="shipped persona name or path to a constitution .json"),
    build: Optional[list[str]] = _BUILD,
    prompts_per_build: int = typer.Option(8, help="cross-persona: held-out prompts taken from each build"),
    reference_per_persona: int = typer.Option(
        8, help="persona specificity: teacher answers per shipped persona in its reference set"
    ),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line: per-checkpoint metrics"),
    workdir: Optional[Path] = typer.Option(None, help="workspace folder (env CHARACTER_WORKDIR)"),
    base_model: Optional[str] = typer.Option(None, help="reference model (default: the checkpoints' base model)"),
    dpo_data: Optional[Path] = typer.Option(None, help="held-out DPO pairs .jsonl (default: the checkpoints' build)"),
    train_data: Optional[Path] = typer.Option(
        None, help="DPO pairs the persona classifier learns from (default: the checkpoints' build's training pairs)"
    ),
    introspection_data: Optional[Path] = typer.Option(None, help="introspection .jsonl (default: the build's)"),
    classifier: Optional[Path] = _CLASSIFIER,
    judge_model: Optional[str] = typer.Option(
        None, help="'tiny', a model folder or an adapter that rates answers; or a model Tinker serves"
    ),
    revealed_judge: Optional[str] = _REVEALED_JUDGE,
    revealed_games: Optional[int] = typer.Option(
        None, help="revealed-preference games per model (env CHARACTER_REVEALED_GAMES, default 200)"
    ),
    coherence_judge: Optional[str] = _COHERENCE_JUDGE,
    capability_set: Optional[Path] = _CAPABILITY_SET,
    out_dir: Optional[Path] = typer.Option(None, help="report folder (default: <build>/eval/<time>)"),
    limit: Optional[int] = typer.Option(None, help="use at most this many rows of each data file"),
    max_new_tokens: int = typer.Option(256, help="length limit of each generated answer"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
) -> None:
    """Evaluate checkpoints against the base model: persona adherence, held-out preferences; writes a report.
    With --build (several): which persona each build's models' answers are classified as."""
    if build:
        if checkpoints:
            raise UserError("give either checkpoints or --build builds, not both")
        return _cross_persona(
            build, workdir, classifier, base_model, prompts_per_build, max_new_tokens, out_dir, as_json
        )
    if not persona:
        raise UserError("--persona is required when evaluating checkpoints")
    checkpoints = _resolved(checkpoints or [])
    build = prompts_per_build = None  # noqa: F841 - not EvalOptions' business  # a build's record lists absolute paths: find it whatever was typed
    options = _eval_options(**locals())  # every flag, by its name
    _check_before_loading(checkpoints, options, report_in_workspace=out_dir is None)
    use_threads(settings_for(workdir))
    _evaluate_and_show(checkpoints, options, as_json)


def _cross_persona(specs, workdir, classifier, base_model, prompts_per_build, max_new_tokens, out_dir, as_json) -> None:
    """`character eval --build A --build B ...`: the builds checked before anything is sampled."""
    from character.evaluation.cross_persona import CrossOptions, prepare

    settings = settings_for(workdir)
    o = CrossOptions(
        workdir=settings.workdir,
        classifier=classifier,
        base_model=base_model,
        prompts_per_build=prompts_per_build,
        max_new_tokens=max_new_tokens,
        seed=settings.seed,
        device=settings.device,
        out_dir=out_dir,
    )
    prepare(specs, o)
    if out_dir is None:
        from character.settings import check_workdir

        check_workdir(o.workdir)
    use_threads(settings)
    from character.evaluation.cross_persona import evaluate_personas, headline
    from character.terminal import stdout_to_stderr

    with stdout_to_stderr():
        res = evaluate_personas(specs, o)
    line = {"personas": res["personas"], **headline(res), "report": res["report"]}
    if as_json:
        typer.echo(json.dumps(line))
        return
    for k, v in headline(res).items():
        typer.echo(f"{k}: {'-' if v is None else f'{v:.3f}'}")
    typer.echo(f"report: {res['report']['markdown']}")


def _evaluate_and_show(checkpoints: list[str], options, as_json: bool) -> None:
    """The evaluation, then its summary: on stdout, or with --json on stderr and the JSON line alone on stdout."""
    from character.evaluation.evaluate import evaluate_checkpoints
    from character.terminal import stdout_to_stderr

    with stdout_to_stderr():
        res = evaluate_checkpoints(checkpoints, options)
        _refuse_blanks(res)
        if as_json:
            _print_summary(res)
    if as_json:
        typer.echo(json.dumps(_json_line(res)))
    else:
        _print_summary(res)


def _check_before_loading(checkpoints: list[str], options, report_in_workspace: bool) -> None:
    """What needs no model, before the heavy imports (evaluate_checkpoints checks the counts again): the
    flags' files and judges, the capability set's rows, the build the checkpoints come from, a writable
    workspace for the report."""
    from character.evaluation.models import checkpoints_side

    options.check_counts(checkpoints)
    checkpoints_side(checkpoints)  # tinker:// and local checkpoints together are refused first
    options.check_models_and_files()
    if options.capability_set is not None:
        from character.evaluation.capability import load_capability_set

        load_capability_set(options.capability_set, option="--capability-set")  # a bad row names its line
    _label_by_build(checkpoints, options)
    if report_in_workspace:
        from character.settings import check_workdir

        check_workdir(options.workdir)


def _resolved(checkpoints: list[str]) -> list[str]:
    """Local checkpoints (relative, absolute or file://) as absolute paths; tinker:// ones as given. A path
    that does not exist stays as typed, for the error that names it."""
    from character.storage import uri_to_path

    out = []
    for s in checkpoints:
        path = None if s.startswith("tinker://") else uri_to_path(s).expanduser()
        out.append(str(path.resolve()) if path is not None and path.exists() else s)
    return out


def _label_by_build(checkpoints: list[str], options) -> None:
    """Each model's label: its stage when one build made them all, `<build>/<stage>` when several did, and
    `<run>/<name>` for a checkpoint no build lists. With no build and no data given, the persona metrics
    cannot be computed: refused here, before any model loads."""
    from character.evaluation.targets import inspect_checkpoint, recorded_checkpoints
    from character.settings import Workspace

    for s in checkpoints:
        if not s.startswith("tinker://"):
            inspect_checkpoint(s)  # a missing or unreadable folder is named first
    ws = Workspace(options.workdir)
    known = recorded_checkpoints(ws)
    hits = [known.get(s) if s.startswith("tinker://") else known.get(str(Path(s).resolve())) for s in checkpoints]
    given = options.dpo_data or options.train_data or options.introspection_data or options.build_dir
    if not any(hits) and not given:
        raise UserError(
            f"no build in {ws.root} lists {checkpoints[0]}: the persona and preference metrics need its "
            "build's data; give --dpo-data (held-out pairs) and --train-data (the classifier's training pairs)"
        )
    if options.names is not None:
        return
    several = len({h[0] for h in hits if h}) > 1
    options.names = [
        (f"{h[0].name}/{h[1]}" if several else h[1]) if h else _run_and_name(s) for s, h in zip(checkpoints, hits)
    ]


def _run_and_name(checkpoint: str) -> str:
    """checkpoints/<run>/sampler_weights/<name> -> <run>/<name>; any other folder: its name."""
    parts = Path(checkpoint.removeprefix("tinker://")).parts
    if len(parts) >= 3 and parts[-2] in ("sampler_weights", "weights"):
        return f"{parts[-3]}/{parts[-1]}"
    return parts[-1] if parts else checkpoint


def _refuse_blanks(res: dict) -> None:
    """No evaluated checkpoint got an in-persona rate: say why (the evaluation's own notes) and exit 2, rather
    than print a table of blanks."""
    baselines = ("classifier", "report", "base", "prompted", "coherence", "capability")  # not checkpoints
    models = {k: m for k, m in res["eval"].items() if k not in baselines and isinstance(m, dict)}
    if not models or any(m.get("in_persona_rate") is not None for m in models.values()):
        return
    reasons = sorted({n for m in models.values() for n in m.get("notes", []) if "not computed" in n})
    raise UserError(
        f"no persona metrics for {', '.join(models)}: {'; '.join(reasons) or 'no reason recorded'} "
        f"(report: {res['report']['markdown']})"
    )


def _eval_options(*, checkpoints: list[str], workdir: Optional[Path], as_json: bool, **flags):
    """The EvalOptions of the flags over the settings (CHARACTER_*), after the checks that need no model:
    a Tinker key when a model lives there, the game count, and data files that are empty."""
    from character.evaluation.options import EvalOptions
    from character.storage import read_jsonl

    settings = settings_for(workdir)
    for cross_only in ("build", "prompts_per_build"):
        flags.pop(cross_only)
    revealed_judge = flags.pop("revealed_judge") or settings.revealed_judge
    flags["coherence_judge"] = flags["coherence_judge"] or settings.coherence_judge
    flags["capability_set"] = flags["capability_set"] or settings.capability_set
    judges = [flags["judge_model"] or "", revealed_judge or "", flags["coherence_judge"] or ""]
    _check_tinker_key([*checkpoints, flags["base_model"] or ""], settings, judges=judges)
    games = flags.pop("revealed_games")
    if games is not None and games < 1:
        raise UserError(f"--revealed-games must be at least 1, not {games}")
    for opt in ("dpo_data", "introspection_data", "train_data"):
        path = flags[opt]
        if path is not None and path.is_file() and not read_jsonl(path):  # a build's own files may be empty
            raise UserError(f"--{opt.replace('_', '-')} {path}: no rows")
    flags["device"] = flags["device"] or settings.device
    return EvalOptions(
        workdir=settings.workdir,
        **flags,
        seed=settings.seed,
        revealed_judge=revealed_judge,
        revealed_games=games or settings.revealed_games,
    )


def _check_tinker_key(models: list[str], settings, judges: list[str] = ()) -> None:
    """A tinker:// model (or a judge that is a model name Tinker serves) with no key fails at once, before
    anything heavy is loaded."""
    from character.evaluation.models import model_side

    def remote_judge(m: str) -> bool:
        try:
            return bool(m) and model_side(m, "") == "tinker"
        except UserError:
            return False  # not a model name at all: the command's own checks say so

    if any(m.startswith("tinker://") for m in models) or any(remote_judge(j) for j in judges):
        from character.backend.tinker import NO_KEY, api_key_source

        if api_key_source(settings) is None:
            raise UserError(NO_KEY)


def _print_summary(res: dict) -> None:
    """Each model's headline metrics with their n, the classifier's accuracy, the revealed preferences'
    outcome and where the report is."""
    fmt = lambda v, n: "-" if v is None else f"{v:.3f} (n={n})"
    if res.get("build"):
        typer.echo(f"build: {res['build']}")
    for label, m in res["eval"].items():
        if label in ("classifier", "report"):
            continue
        typer.echo(
            f"{label:>10}: in persona {fmt(m['in_persona_rate'], m['in_persona_n'])}  this persona "
            f"{fmt(m.get('specificity'), m.get('specificity_n'))}  robust "
            f"{fmt(m['robust_in_persona_rate'], m['robust_n'])}  prefill "
            f"{fmt(m['prefill_in_persona_rate'], m['prefill_n'])}  pref. accuracy "
            f"{fmt(m['pref_accuracy'], m['pref_pairs'])}  capability {fmt(m['capability_accuracy'], m['capability_n'])}"
        )
    clf = res["eval"]["classifier"]
    typer.echo(f"classifier held-out accuracy: {fmt(clf['heldout_accuracy'], clf['n'])}")
    spec = res.get("specificity") or {}
    if spec.get("status") == "computed":
        typer.echo(
            f"this persona (specificity): share of answers classified as {res['persona']} among "
            f"{len(spec['classes'])} personas' teacher answers (chance {spec['chance']:.3f})"
        )
    rev = res["revealed"]
    if rev["status"] == "computed" and rev.get("final"):
        moved = rev["changes"][rev["final"]]
        shown = ", ".join(f"{t} {moved[t]:+.0f}" for t in rev["constitution_traits"]) or "none of the listed traits"
        typer.echo(f"revealed preferences (Elo change base -> {rev['final']}, constitution traits): {shown}")
    else:
        typer.echo(f"revealed preferences: skipped: {rev['reason']}")
    _print_sections(res)
    typer.echo(f"report: {res['report']['markdown']}")


def _print_sections(res: dict) -> None:
    """Coherence and capability retention, in a line each."""
    coh, cap = res.get("coherence") or {}, res.get("capability") or {}
    if coh.get("status") == "computed":
        fmt = lambda c: "-" if c["win"] is None else f"win {c['win']:.3f} tie {c['tie']:.3f} loss {c['loss']:.3f}"
        parts = [
            f"{k.replace('_', ' ')}: {fmt(c)} (n={c['n']}, {c['discarded']} discarded)"
            for k, c in coh["comparisons"].items()
        ]
        typer.echo(f"coherence ({coh['final']}): " + "; ".join(parts))
    else:
        typer.echo(f"coherence: skipped: {coh.get('reason')}")
    if cap.get("status") == "computed":
        typer.echo(
            f"capability ({cap['set']}, n={cap['n']}, chance {cap['chance']:.3f})"
            + (": the base is at chance, the accuracies are noise" if cap["base_at_chance"] else "")
        )


def _json_line(res: dict) -> dict:
    """What `--json` prints: the result less the generations, the report's table and the games."""
    from character.build.stages import revealed_summary
    from character.evaluation.coherence import coherence_summary

    rev = res["revealed"]
    ratings = {"ratings": {lb: m["ratings"] for lb, m in rev["models"].items()}} if rev["status"] == "computed" else {}
    return {k: res[k] for k in ("persona", "base_model", "build", "data", "classifier", "eval", "checkpoints")} | {
        "report": {k: v for k, v in res["report"].items() if k != "table"},
        "revealed": revealed_summary(rev) | ratings,
        "coherence": coherence_summary(res.get("coherence")),
        "capability": res.get("capability"),
        "specificity": res.get("specificity"),
    }
