"""`character eval`: checkpoints against their base model; a report, and a summary on the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from character.commands.workspace import settings_for
from character.errors import UserError


def eval_command(
    checkpoints: list[str] = typer.Argument(
        ...,
        help="adapter folders, merged adapters or folded model folders; "
        "or tinker:// checkpoints (evaluated remotely on Tinker)",
    ),
    persona: str = typer.Option(..., help="shipped persona name or path to a constitution .json"),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line: per-checkpoint metrics"),
    workdir: Optional[Path] = typer.Option(None, help="workspace folder (env CHARACTER_WORKDIR)"),
    base_model: Optional[str] = typer.Option(None, help="reference model (default: the checkpoints' base model)"),
    dpo_data: Optional[Path] = typer.Option(None, help="held-out DPO pairs .jsonl (default: the checkpoints' build)"),
    train_data: Optional[Path] = typer.Option(
        None, help="DPO pairs the persona classifier learns from (default: the checkpoints' build's training pairs)"
    ),
    introspection_data: Optional[Path] = typer.Option(None, help="introspection .jsonl (default: the build's)"),
    classifier: Optional[Path] = typer.Option(
        None,
        help="a local Hugging Face encoder folder for the persona classifier (default: TF-IDF + logistic regression)",
    ),
    judge_model: Optional[str] = typer.Option(
        None, help="'tiny', a model folder or an adapter that rates answers; or a model Tinker serves"
    ),
    revealed_judge: Optional[str] = typer.Option(
        None,
        help="judge of the revealed-preference evaluation: a model Tinker serves, a tinker:// path or a local "
        "model folder (env CHARACTER_REVEALED_JUDGE; unset: skipped, and the report says so)",
    ),
    revealed_games: Optional[int] = typer.Option(
        None, help="revealed-preference games per model (env CHARACTER_REVEALED_GAMES, default 200)"
    ),
    coherence_judge: Optional[str] = typer.Option(
        None,
        help="judge of the pairwise coherence comparisons (final vs base, final vs prompted): a model Tinker "
        "serves, a tinker:// path or a local model folder (env CHARACTER_COHERENCE_JUDGE; unset: skipped)",
    ),
    capability_set: Optional[Path] = typer.Option(
        None,
        help="multiple-choice set for the capability probe: JSONL of question, choices, answer (an exported "
        "ARC or MMLU split loads as is; env CHARACTER_CAPABILITY_SET; default: a small shipped set)",
    ),
    out_dir: Optional[Path] = typer.Option(None, help="report folder (default: <build>/eval/<time>)"),
    limit: Optional[int] = typer.Option(None, help="use at most this many rows of each data file"),
    max_new_tokens: int = typer.Option(256, help="length limit of each generated answer"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
) -> None:
    """Evaluate checkpoints against the base model: persona adherence, held-out preferences; writes a report."""
    options = _eval_options(**locals())  # every flag, by its name
    options.check_counts(checkpoints)  # evaluate_checkpoints checks them too; here before the heavy imports
    from character.evaluation.evaluate import evaluate_checkpoints

    res = evaluate_checkpoints(checkpoints, options)
    _print_summary(res)
    if as_json:
        typer.echo(json.dumps(_json_line(res)))


def _eval_options(*, checkpoints: list[str], workdir: Optional[Path], as_json: bool, **flags):
    """The EvalOptions of the flags over the settings (CHARACTER_*), after the checks that need no model:
    a Tinker key when a model lives there, the game count, and data files that are empty."""
    from character.evaluation.options import EvalOptions
    from character.storage import read_jsonl

    settings = settings_for(workdir)
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
    for label, m in res["eval"].items():
        if label in ("classifier", "report"):
            continue
        typer.echo(
            f"{label:>10}: in persona {fmt(m['in_persona_rate'], m['in_persona_n'])}  robust "
            f"{fmt(m['robust_in_persona_rate'], m['robust_n'])}  prefill "
            f"{fmt(m['prefill_in_persona_rate'], m['prefill_n'])}  pref. accuracy "
            f"{fmt(m['pref_accuracy'], m['pref_pairs'])}  capability {fmt(m['capability_accuracy'], m['capability_n'])}"
        )
    clf = res["eval"]["classifier"]
    typer.echo(f"classifier held-out accuracy: {fmt(clf['heldout_accuracy'], clf['n'])}")
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
    }
