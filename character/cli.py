"""The `character` command line. Bad input: one line `error: ...` on stderr, exit code 2."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from character.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train language models to have a chosen character (Open Character Training).",
)
personas_app = typer.Typer(no_args_is_help=True, help="List, show and validate constitutions.")
app.add_typer(personas_app, name="personas")


def _settings(workdir: Optional[Path]):
    from pydantic import ValidationError

    from character.settings import Settings

    try:
        return Settings(**({"workdir": workdir} if workdir else {}))
    except ValidationError as e:  # a bad CHARACTER_* environment variable
        err = e.errors()[0]
        name = "CHARACTER_" + "_".join(str(x) for x in err["loc"]).upper()
        raise UserError(f"{name}={err.get('input')!r}: {err['msg']}") from None


@personas_app.command("list")
def personas_list() -> None:
    """The shipped personas."""
    from character.persona.constitution import load_constitution, shipped_personas

    for name in shipped_personas():
        c = load_constitution(name)
        typer.echo(f"{name:<16} {len(c.traits)} traits  {c.traits[0].trait}")


@personas_app.command("show")
def personas_show(name: str = typer.Argument(..., help="persona name or constitution file")) -> None:
    """A constitution's traits and example questions."""
    from character.persona.constitution import load_constitution

    c = load_constitution(name)
    typer.echo(f"# {c.name} ({c.source}, {len(c.traits)} traits)")
    for i, t in enumerate(c.traits, 1):
        typer.echo(f"{i}. {t.trait}")
        for q in t.questions:
            typer.echo(f"     - {q}")


@personas_app.command("validate")
def personas_validate(path: Path = typer.Argument(..., help="constitution .json file")) -> None:
    """Check a constitution file: every problem (up to 20), each naming the entry (from 1) and the field."""
    from character.persona.constitution import check_constitution

    if not path.is_file():
        raise UserError(f"{path}: constitution file not found")
    c, problems = check_constitution(str(path))
    if problems:
        for p in problems:
            print(f"error: {' '.join(p.split())}", file=sys.stderr)
        sys.exit(2)
    typer.echo(f"ok: {path}: {len(c.traits)} traits, {len(c.questions)} questions")


def _no_traceback_for_user_errors(record: logging.LogRecord) -> bool:
    """Prefect logs a failed run's exception with its traceback; for bad input or a fatal backend
    error (a UserError) the one-line message says what to fix, and the traceback only buries it."""
    if record.exc_info and isinstance(record.exc_info[1], UserError):
        record.exc_info, record.exc_text = None, None
    return True


def _config(workdir: Optional[Path], **options):
    """Settings, then flags: a validated PipelineConfig, or a one-line error naming the option."""
    from pydantic import ValidationError

    from character.config import PipelineConfig, check_inputs  # no torch, tinker or Prefect: bad flags fail fast

    settings = _settings(workdir)
    try:
        cfg = PipelineConfig.from_settings(
            settings, workdir=str(Path(settings.workdir).expanduser().resolve()), **options
        )
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        if loc[0] in ("dpo", "sft") and len(loc) > 1:  # --batch-size and --save-every set both
            loc = loc[1:]
        raise UserError(f"--{'-'.join(loc).replace('_', '-')}: {err['msg']}") from None
    check_inputs(cfg)  # the constitution, the workdir, local model folders: still before the heavy imports
    return cfg


def _optim(batch_size: Optional[int], save_every: Optional[int], keep_states: Optional[int] = None) -> Optional[dict]:
    """Training options given on the command line (the rest keep the recipe's defaults)."""
    given = {
        k: v
        for k, v in (("batch_size", batch_size), ("save_every", save_every), ("keep_states", keep_states))
        if v is not None
    }
    return given or None


# Options shared by `pipeline` and `generate`.
_SCALE = typer.Option("smoke", help="smoke | demo | mini | half | full | paper (sets the counts below)")
_WORKDIR = typer.Option(None, help="workspace folder (env CHARACTER_WORKDIR)")
_BUILD_ID = typer.Option(None, help="name of this build; the same id resumes it (default: a timestamp)")
_BASE = typer.Option(None, help="'tiny' (built in) or a local Hugging Face model folder")
_TEACHER = typer.Option(None, help="teacher for distillation; defaults to the base model")
_PAIRS = typer.Option(None, help="DPO pairs (overrides the scale)")
_REFLECTIONS = typer.Option(None, help="reflections (overrides the scale)")
_INTERACTIONS = typer.Option(None, help="self-interactions (overrides the scale)")
_TURNS = typer.Option(None, help="turns per self-interaction (overrides the scale)")
_SAMPLES = typer.Option(None, help="DPO samples per prompt")
_EXPAND = typer.Option(None, help="extra questions per trait generated by the teacher (0: off)")
_MAX_NEW = typer.Option(None, help="length limit of each generated answer, in tokens (default 1024)")
_IN_FLIGHT = typer.Option(
    None, help="sampling requests in flight at once; also the unit a resumed generation redoes (default 64)"
)


@app.command()
def pipeline(
    persona: str = typer.Argument(..., help="shipped persona name or path to a constitution .json/.yaml"),
    scale: str = _SCALE,
    backend: Optional[str] = typer.Option(None, help="local (default) | tinker"),
    base_model: Optional[str] = _BASE,
    teacher_model: Optional[str] = _TEACHER,
    workdir: Optional[Path] = _WORKDIR,
    build_id: Optional[str] = _BUILD_ID,
    seed: Optional[int] = typer.Option(None),
    dpo_pairs: Optional[int] = _PAIRS,
    reflections: Optional[int] = _REFLECTIONS,
    interactions: Optional[int] = _INTERACTIONS,
    turns: Optional[int] = _TURNS,
    samples_per_prompt: Optional[int] = _SAMPLES,
    expand_questions: Optional[int] = _EXPAND,
    max_new_tokens: Optional[int] = _MAX_NEW,
    max_in_flight: Optional[int] = _IN_FLIGHT,
    batch_size: Optional[int] = typer.Option(None, help="examples per training step, DPO and SFT (default 32)"),
    save_every: Optional[int] = typer.Option(None, help="save the resumable training state every N steps (default 10)"),
    keep_states: Optional[int] = typer.Option(
        None, help="resumable states kept per training run, newest first; older ones are deleted (default 2)"
    ),
    micro_batch_size: Optional[int] = typer.Option(
        None,
        help="local training: sequences per forward/backward; "
        "gradients accumulate to the full batch (default: from memory)",
    ),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="local training: recompute activations in backward"
    ),
    paper_mode: bool = typer.Option(False, "--paper-mode", help="SFT from the base model, as in the paper"),
    merge: bool = typer.Option(False, "--merge", help="paper mode: also write the merge 1.0 x DPO + 0.25 x SFT"),
    no_eval: bool = typer.Option(False, "--no-eval", help="skip the evaluation at the end"),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line describing the result"),
) -> None:
    """Run the whole pipeline for one persona as a Prefect flow (sequential mode unless --paper-mode)."""
    if merge and not paper_mode:
        raise UserError(
            "--merge needs --paper-mode: in sequential mode the final checkpoint already holds "
            "both DPO and SFT, there is nothing to merge"
        )
    cfg = _config(
        workdir,
        persona=persona,
        scale=scale,
        backend=backend,
        base_model=base_model,
        mode="paper" if paper_mode else "sequential",
        merge=merge,
        evaluate=not no_eval,
        teacher_model=teacher_model,
        build_id=build_id,
        seed=seed,
        dpo_pairs=dpo_pairs,
        reflections=reflections,
        interactions=interactions,
        turns=turns,
        samples_per_prompt=samples_per_prompt,
        expand_questions=expand_questions,
        max_new_tokens=max_new_tokens,
        max_in_flight=max_in_flight,
        dpo=_optim(batch_size, save_every, keep_states),
        sft=_optim(batch_size, save_every, keep_states),
        micro_batch_size=micro_batch_size,
        gradient_checkpointing=gradient_checkpointing or None,
    )
    from character.build.stages import lock_build, validate

    validate(cfg)  # before Prefect starts or any model loads
    with lock_build(cfg):  # a second run of this build is refused here, before it writes anything
        _run_pipeline(cfg, paper_mode, as_json)


def _run_pipeline(cfg, paper_mode: bool, as_json: bool) -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_no_traceback_for_user_errors)
    from flows.ephemeral import start_ephemeral_api_early

    api_ready = start_ephemeral_api_early()
    if paper_mode:
        from flows.paper import paper as run_flow
    else:
        from flows.sequential import sequential as run_flow
    if cfg.backend == "local":  # loads while the API starts; the stages need these anyway
        import peft.tuners.lora  # noqa: F401
        import transformers.models.auto.modeling_auto  # noqa: F401

        import character.backend.local  # noqa: F401
    api_ready()
    from character.progress import ConsoleProgress, listening
    from flows.ephemeral import finish_ephemeral_api

    try:
        with listening(ConsoleProgress(notes=False)):  # the tasks log notes such as skipped stages
            result = run_flow(cfg)
    finally:
        finish_ephemeral_api()  # flush and stop the temporary server now, not in exit hooks
    for stage, uri in result.checkpoints.items():
        typer.echo(f"{stage:>6}: {uri}")
    if as_json:
        from character.build.record import read_record
        from character.build.summary import eval_summary

        typer.echo(
            json.dumps(
                result.model_dump(include={"persona", "mode", "base_model", "workdir", "checkpoints"})
                | {"eval": eval_summary(read_record(cfg))}
            )
        )


checkpoints_app = typer.Typer(no_args_is_help=True, help="Checkpoints recorded in the workspace.")
app.add_typer(checkpoints_app, name="checkpoints")


@checkpoints_app.command("list")
def checkpoints_list(
    persona: Optional[str] = typer.Option(None, help="only this persona"),
    workdir: Optional[Path] = _WORKDIR,
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
) -> None:
    """Every checkpoint URI recorded by every build, newest first."""
    from character.build.record import list_checkpoints
    from character.settings import check_name

    if persona:
        check_name(persona, "persona")
    rows = list_checkpoints(_settings(workdir).workdir, persona)
    for r in rows:
        typer.echo(
            json.dumps(r)
            if as_json
            else f"{r['persona']:<14} {r['build_id']:<22} {r['stage']:<7} {r['finished_at'][:19]}  {r['uri']}"
        )


@app.command()
def generate(
    stage: str = typer.Argument(..., help="questions | dpo | introspection"),
    persona: str = typer.Argument(..., help="shipped persona name or path to a constitution .json/.yaml"),
    model: Optional[str] = typer.Option(None, help="introspection: the DPO adapter URI (default: the build's)"),
    scale: str = _SCALE,
    base_model: Optional[str] = _BASE,
    teacher_model: Optional[str] = _TEACHER,
    workdir: Optional[Path] = _WORKDIR,
    build_id: Optional[str] = _BUILD_ID,
    seed: Optional[int] = typer.Option(None),
    dpo_pairs: Optional[int] = _PAIRS,
    reflections: Optional[int] = _REFLECTIONS,
    interactions: Optional[int] = _INTERACTIONS,
    turns: Optional[int] = _TURNS,
    samples_per_prompt: Optional[int] = _SAMPLES,
    expand_questions: Optional[int] = _EXPAND,
    max_new_tokens: Optional[int] = _MAX_NEW,
    max_in_flight: Optional[int] = _IN_FLIGHT,
) -> None:
    """Run one data-generation stage alone (the pipeline runs the same code). Resumable by build id."""
    if stage not in ("questions", "dpo", "introspection"):
        raise UserError(f"unknown stage {stage!r}: use questions, dpo or introspection")
    cfg = _config(
        workdir,
        persona=persona,
        scale=scale,
        base_model=base_model,
        teacher_model=teacher_model,
        build_id=build_id,
        seed=seed,
        dpo_pairs=dpo_pairs,
        reflections=reflections,
        interactions=interactions,
        turns=turns,
        samples_per_prompt=samples_per_prompt,
        expand_questions=expand_questions,
        max_new_tokens=max_new_tokens,
        max_in_flight=max_in_flight,
    )
    from character.build import stages as p
    from character.build.record import Checkpoint, read_record, recorded

    p.validate(cfg)
    if stage == "questions" and not cfg.counts.expand_questions:
        raise UserError("generate questions needs --expand-questions N (questions per trait)")
    uri = (model or recorded(cfg, "dpo", "sampler")) if stage == "introspection" else None
    if stage == "introspection" and uri is None:
        raise UserError(f"no DPO checkpoint recorded for build {cfg.build_id!r}: give --model URI")
    from character.progress import ConsoleProgress, listening

    with p.lock_build(cfg), listening(ConsoleProgress()):
        if stage == "questions":
            out = p.stage_expand_questions(cfg)
        elif stage == "dpo":
            out = p.stage_dpo_data(cfg, recorded(cfg, "questions", "path"))
        else:
            out = p.stage_introspection(cfg, Checkpoint(stage="dpo", state=uri, sampler=uri, steps=0))
    stats = {k: v for k, v in read_record(cfg)["stages"].items()}
    typer.echo(f"{out}")
    typer.echo(
        json.dumps(
            {"build_id": cfg.build_id, "path": out, "stats": stats.get({"dpo": "dpo_data"}.get(stage, stage), {})}
        )
    )


tinker_app = typer.Typer(no_args_is_help=True, help="The Tinker service (key: TINKER_API_KEY or a Prefect Secret).")
app.add_typer(tinker_app, name="tinker")


@tinker_app.command("models")
def tinker_models(
    timeout: Optional[float] = typer.Option(None, help="seconds to wait for Tinker (env CHARACTER_TINKER_TIMEOUT_S)"),
) -> None:
    """The models Tinker serves: name, context length, trainable, sampleable, and which can teach or judge
    (teacher: a chat model at least 4x the configured student's size; judge: a chat model of 30B or more)."""
    from character.backend.tinker import TinkerService, model_roles

    settings = _settings(None)
    service = TinkerService(settings, timeout_s=timeout)
    models = service.list_models()
    student = settings.base_model if settings.base_model != "tiny" else settings.tinker_base_model
    flag = {True: "yes", False: "no", None: "?"}
    typer.echo(f"{'model':<48} {'context':>8}  train  sample  can serve as (student {student})")
    for m in models:
        roles = ", ".join(model_roles(m, student)) or "-"
        if m.model_name == (settings.teacher_model or settings.tinker_teacher_model):
            roles += " (default teacher)"
        typer.echo(
            f"{m.model_name:<48} {m.max_context_length or '?':>8}  {flag[m.trainable]:<5}  "
            f"{flag[m.sampleable]:<6}  {roles}"
        )


def _downloaded(source: str, dst: Path) -> str:
    """A `tinker://` checkpoint is exported, downloaded and converted to a PEFT adapter first."""
    if not source.startswith("tinker://"):
        return source
    from character.backend.tinker import TinkerService
    from character.weights.tinker_export import download_adapter

    download_adapter(TinkerService(_settings(None)), source, dst)
    return str(dst)


@app.command()
def merge(
    dpo: str = typer.Argument(..., help="DPO adapter: a PEFT adapter folder or file:// URI"),
    sft: str = typer.Argument(..., help="SFT adapter: a PEFT adapter folder or file:// URI"),
    output: Path = typer.Option(..., "--output", "-o", help="folder to write the merged adapter to"),
    dpo_weight: float = typer.Option(1.0, help="weight of the DPO update"),
    sft_weight: float = typer.Option(0.25, help="weight of the SFT update"),
    method: str = typer.Option(
        "exact",
        help="exact: w1*dW1 + w2*dW2 at rank r1+r2 | svd: its best rank-R "
        "approximation | linear: PEFT's add_weighted_adapter 'linear', bit for bit",
    ),
    rank: Optional[int] = typer.Option(None, help="output rank for svd (default: the larger input rank)"),
    normalize: bool = typer.Option(
        False, "--normalize", help="rescale the weights to sum to 1 (this changes the magnitude of both updates)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
) -> None:
    """Merge a DPO and an SFT LoRA adapter from their files (the base model is never loaded)."""
    import tempfile

    from character.weights.merge import merge_adapters

    with tempfile.TemporaryDirectory(prefix="character-merge-") as tmp:
        dpo, sft = (_downloaded(src, Path(tmp) / label) for src, label in ((dpo, "dpo"), (sft, "sft")))
        res = merge_adapters(
            dpo,
            sft,
            output,
            dpo_weight=dpo_weight,
            sft_weight=sft_weight,
            method=method,
            rank=rank,
            normalize=normalize,
            overwrite=overwrite,
        )
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    typer.echo(
        f"merged ({res.method}, r={res.rank}): {res.weights[0]:g} x DPO + {res.weights[1]:g} x SFT -> {res.output}"
    )


@app.command()
def fold(
    adapter: str = typer.Argument(..., help="a PEFT adapter folder or file:// URI"),
    output: Path = typer.Option(..., "--output", "-o", help="folder to write the full model to"),
    base_model: Optional[str] = typer.Option(
        None, help="'tiny' or a local Hugging Face model folder (default: the adapter's base model)"
    ),
    max_shard_size: Optional[str] = typer.Option(None, help="e.g. 2GB; default: keep the base model's shards"),
    workdir: Optional[Path] = typer.Option(None, help="workspace folder (env CHARACTER_WORKDIR)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
) -> None:
    """Fold an adapter into its base model: a full Hugging Face model folder, written shard by shard."""
    from character.weights.fold import fold_adapter

    out = fold_adapter(
        adapter,
        output,
        base_model=base_model,
        workdir=_settings(workdir).workdir,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )
    typer.echo(f"folded: {out}")


@app.command("eval")
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
    out_dir: Optional[Path] = typer.Option(None, help="report folder (default: <build>/eval/<time>)"),
    limit: Optional[int] = typer.Option(None, help="use at most this many rows of each data file"),
    max_new_tokens: int = typer.Option(256, help="length limit of each generated answer"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
) -> None:
    """Evaluate checkpoints against the base model: persona adherence, held-out preferences; writes a report."""
    from character.evaluation.evaluate import evaluate_checkpoints
    from character.storage import read_jsonl

    settings = _settings(workdir)
    revealed_judge = revealed_judge or settings.revealed_judge
    _check_tinker_key([*checkpoints, base_model or ""], settings, judges=[judge_model or "", revealed_judge or ""])
    if revealed_games is not None and revealed_games < 1:
        raise UserError(f"--revealed-games must be at least 1, not {revealed_games}")
    for path, opt in (
        (dpo_data, "--dpo-data"),
        (introspection_data, "--introspection-data"),
        (train_data, "--train-data"),
    ):
        if path is not None and path.is_file() and not read_jsonl(path):  # a build's own files may be empty
            raise UserError(f"{opt} {path}: no rows")
    res = evaluate_checkpoints(
        checkpoints,
        persona,
        settings.workdir,
        base_model=base_model,
        dpo_data=dpo_data,
        introspection_data=introspection_data,
        judge_model=judge_model,
        out_dir=out_dir,
        limit=limit,
        train_data=train_data,
        classifier=classifier,
        max_new_tokens=max_new_tokens,
        device=device or settings.device,
        seed=settings.seed,
        revealed_judge=revealed_judge,
        revealed_games=revealed_games or settings.revealed_games,
    )
    fmt = lambda v, n: "-" if v is None else f"{v:.3f} (n={n})"  # noqa: E731
    for label, m in res["eval"].items():
        if label in ("classifier", "report"):
            continue
        typer.echo(
            f"{label:>10}: in persona {fmt(m['in_persona_rate'], m['in_persona_n'])}  robust "
            f"{fmt(m['robust_in_persona_rate'], m['robust_n'])}  pref. accuracy "
            f"{fmt(m['pref_accuracy'], m['pref_pairs'])}"
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
    typer.echo(f"report: {res['report']['markdown']}")
    if as_json:
        from character.build.stages import revealed_summary

        typer.echo(
            json.dumps(
                {k: res[k] for k in ("persona", "base_model", "build", "data", "classifier", "eval", "checkpoints")}
                | {
                    "report": {k: v for k, v in res["report"].items() if k != "table"},
                    "revealed": revealed_summary(rev)
                    | (
                        {"ratings": {lb: m["ratings"] for lb, m in rev["models"].items()}}
                        if rev["status"] == "computed"
                        else {}
                    ),
                }
            )
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


_CKPT = typer.Argument(..., help="a local adapter or model folder, a tinker:// path, 'base' or 'tiny'")
_SYSTEM = typer.Option(None, help="system prompt for the conversation")
_TEMPERATURE = typer.Option(0.7, help="sampling temperature (0: greedy)")
_MAX_NEW_TOKENS = typer.Option(512, help="length limit of each answer, in tokens")


@app.command()
def chat(
    checkpoint: str = _CKPT,
    system: Optional[str] = _SYSTEM,
    temperature: float = _TEMPERATURE,
    max_new_tokens: int = _MAX_NEW_TOKENS,
    workdir: Optional[Path] = _WORKDIR,
) -> None:
    """Talk to a checkpoint. /reset forgets the conversation, /exit leaves; a script can be piped in."""
    from character.chat import Conversation, check_checkpoint, open_checkpoint, run_script

    settings = _settings(workdir)
    check_checkpoint(checkpoint, settings)  # key / folder, before any model is loaded
    conv = Conversation(
        open_checkpoint(checkpoint, settings),
        system=system,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=settings.seed,
    )
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"chatting with {checkpoint} (/reset forgets, /exit leaves)")

    def prompt() -> None:
        print("> ", end="", flush=True)

    try:
        run_script(conv, sys.stdin, typer.echo, prompt if interactive else None)
    except (KeyboardInterrupt, EOFError):
        typer.echo("")


@app.command()
def sample(
    checkpoint: str = _CKPT,
    prompt: str = typer.Option(..., help="the user message"),
    n: int = typer.Option(1, "-n", help="how many answers"),
    system: Optional[str] = _SYSTEM,
    temperature: float = _TEMPERATURE,
    max_new_tokens: int = _MAX_NEW_TOKENS,
    as_json: bool = typer.Option(False, "--json", help="one JSON line: checkpoint, prompt and answers"),
    workdir: Optional[Path] = _WORKDIR,
) -> None:
    """Answers to one prompt from a checkpoint."""
    from character.chat import Conversation, check_checkpoint, open_checkpoint

    settings = _settings(workdir)
    check_checkpoint(checkpoint, settings)
    if n < 1:
        raise UserError(f"-n must be at least 1, not {n}")
    conv = Conversation(
        open_checkpoint(checkpoint, settings),
        system=system,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=settings.seed,
    )
    answers = conv.sample(prompt, n)
    if as_json:
        typer.echo(json.dumps({"checkpoint": checkpoint, "system": system, "prompt": prompt, "answers": answers}))
    else:
        for i, a in enumerate(answers):
            typer.echo(("" if i == 0 else "---\n") + a)


def _click_exceptions():
    try:  # recent typer vendors its own click
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions
    return exceptions


def _fail(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


# Prefect settings the command line needs, unless the user set them: analytics off (on a busy
# machine its SQLite writes race the API's and print tracebacks), and a start-up wait that a
# 2-core machine can meet (Prefect's default 20 s is not always enough).
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def main() -> None:
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)  # before anything imports prefect
    exc = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except UserError as e:
        _fail(str(e))
    except exc.NoArgsIsHelpError as e:  # `character` or a command group alone: its help
        e.show()
        sys.exit(e.exit_code)
    except exc.ClickException as e:  # a bad option or argument: one line, like any other bad input
        _fail(f"{e.format_message()} (see --help)")
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
