"""Nightly: rebuild a list of personas. Each persona is its own subflow; one failing does not stop
the others; a summary artifact lists every outcome. The build id is the date, so a rerun the same
night resumes instead of starting over."""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import ValidationError

from character.build.record import read_record
from character.build.summary import HEADLINE, change, cost_row, eval_summary, headline, previous_nightly_record
from character.config import PipelineConfig
from character.datagen.scales import ScaleName
from character.errors import UserError
from character.evaluation.cross_report import cross_headline
from character.settings import Settings
from flows.build_slots import from_deployment
from flows.fanout import build_runs
from flows.paper import paper
from flows.sequential import sequential
from tasks.cross_persona import cross_persona_eval


def _one(config: PipelineConfig) -> dict:
    run = paper if config.mode == "paper" else sequential
    state = run(config, return_state=True)
    if state.is_completed():
        return {"state": "Completed", "checkpoints": state.result().checkpoints, "message": ""}
    return {"state": state.type.value.title(), "checkpoints": {}, "message": (state.message or "")[:300]}


def _headline(cfg: PipelineConfig | None, workdir: str, build_id: str) -> dict:
    """The final checkpoint's in-persona rate, robust rate and preference accuracy, each with its change
    since the previous night's build of the persona (None where either night has no number)."""
    empty = {f"{k}{s}": None for k in HEADLINE for s in ("", "_change")}
    try:
        persona = cfg.constitution().name if cfg is not None else None
    except UserError:  # an unknown persona: its failure is reported in the row's message
        persona = None
    if persona is None:
        return empty
    now = headline(eval_summary(read_record(cfg)))
    before = headline(eval_summary(previous_nightly_record(workdir, persona, build_id) or {}))
    out = {}
    for k in HEADLINE:
        out[k] = now[k]
        out[f"{k}_change"] = change(now[k], before[k])
    return out


def _spend(cfg: PipelineConfig | None) -> dict:
    """What the persona's build counted and cost (tokens 0 and cost None when it never ran)."""
    try:
        return cost_row(read_record(cfg)) if cfg is not None else cost_row({})
    except UserError:  # an unknown persona, reported in the row's message
        return cost_row({})


def _configs(personas: list[str], settings: Settings, **options) -> tuple[dict[str, PipelineConfig], dict[str, dict]]:
    """Each persona's build config, and a failed outcome for each persona whose config is refused."""
    configs: dict[str, PipelineConfig] = {}
    refused: dict[str, dict] = {}
    for persona in personas:
        try:
            configs[persona] = PipelineConfig.from_settings(settings, persona=persona, **options)
        except (ValidationError, ValueError) as e:
            refused[persona] = {"state": "Failed", "checkpoints": {}, "message": str(e).splitlines()[0][:300]}
    return configs, refused


def _build_all(configs: dict[str, PipelineConfig], limit: int) -> dict[str, dict]:
    """Every build's outcome, `limit` builds at a time; one failing does not stop the others."""
    outcomes: dict[str, dict] = {}
    # Each worker thread carries the flow's context, so the builds show as subflows of this run.
    with ThreadPoolExecutor(max_workers=limit) as pool:
        futures = {p: pool.submit(contextvars.copy_context().run, _one, cfg) for p, cfg in configs.items()}
        for persona, fut in futures.items():
            try:
                outcomes[persona] = fut.result()
            except Exception as e:  # noqa: BLE001 - one persona's failure is reported, not raised
                outcomes[persona] = {"state": "Failed", "checkpoints": {}, "message": str(e)[:300]}
    return outcomes


CROSS = "cross-persona"  # the return value's entry for the cross-persona evaluation


def _cross_persona(configs: dict[str, PipelineConfig], outcomes: dict[str, dict], workdir: str) -> dict | None:
    """The cross-persona evaluation over the night's evaluated builds (two personas at least; None: too few):
    its state, report and headline figures. Its failure is logged and reported, not raised: every build
    stands on its own."""
    from character.evaluation.cross_persona import CrossOptions
    from character.evaluation.options import BUILD_EVAL_MAX_NEW_TOKENS

    done = [cfg for p, cfg in configs.items() if outcomes[p]["state"] == "Completed" and cfg.evaluate]
    if len({cfg.constitution().name for cfg in done}) < 2:
        return None
    options = CrossOptions(
        workdir=workdir,
        seed=done[0].seed,
        device=done[0].device,
        max_new_tokens=min(done[0].max_new_tokens, BUILD_EVAL_MAX_NEW_TOKENS),
    )
    try:
        state = cross_persona_eval([str(cfg.paths.root) for cfg in done], options, return_state=True)
    except Exception as e:  # noqa: BLE001 - not even started: reported, not raised
        get_run_logger().warning("cross-persona evaluation failed: %s", e)
        return {"state": "Failed", "message": str(e)[:300]}
    if state.is_completed():
        figures = state.result()
        return {"state": "Completed", **figures, "headline": cross_headline(figures)}
    message = (state.message or "")[:300]
    get_run_logger().warning("cross-persona evaluation failed: %s", message)
    return {"state": state.type.value.title(), "message": message}


def _cross_line(cross: dict | None) -> str:
    """What the summary says of the cross-persona evaluation: where its report is and its headline."""
    if cross is None:
        return "no cross-persona evaluation (fewer than two personas built and evaluated)"
    if cross["state"] != "Completed":
        return f"the cross-persona evaluation failed: {cross['message']}"
    return f"cross-persona evaluation: {cross['headline']}; report {cross['report']}"


_PREFECT_SAYS = "Flow run encountered an exception: "  # how a failed subflow's message starts


def _report(rows: list[dict], build_id: str, scale: str, cross: dict | None = None) -> None:
    """The summary artifact and a log line per persona, and one for the cross-persona evaluation; fails the
    run if any persona failed, naming each failed persona with its own message (a failed cross-persona
    evaluation fails nothing)."""
    create_table_artifact(
        key="nightly-summary",
        table=rows,
        description=f"nightly build {build_id} ({scale}): the final checkpoint's metrics, and "
        "their change since the persona's previous nightly build; the tokens each build used and their cost. "
        f"{_cross_line(cross)}",
    )
    logger = get_run_logger()
    for r in rows:
        logger.info("%s: %s %s", r["persona"], r["state"], r["final"] or r["message"])
    logger.info("%s", _cross_line(cross))
    failed = [r for r in rows if r["state"] != "Completed"]
    if failed:
        # each persona with its own error: the run's message is what the UI and a caller see first
        why = ", ".join(f"{r['persona']} ({r['message'].removeprefix(_PREFECT_SAYS) or r['state']})" for r in failed)
        raise RuntimeError(f"{len(failed)} of {len(rows)} personas failed: {why}")


@flow(name="nightly")
def nightly(
    personas: list[str],
    scale: ScaleName = "smoke",
    mode: Literal["sequential", "paper"] = "sequential",
    merge: bool = False,
    backend: Literal["local", "tinker"] = "local",
    base_model: str | None = None,
    teacher_model: str | None = None,
    workdir: str | None = None,
    build_id: str | None = None,
    max_concurrent: int = 4,
    overrides: dict | None = None,
) -> dict[str, dict]:
    """From a deployment, each persona builds in a flow run of its own of the `mode` deployment on the
    pool, as many at once as that deployment's `concurrency_limit` allows across all workers, waited
    for up to the `nightly_wait_s` setting. Otherwise the builds are subflows here: `max_concurrent` applies to
    Tinker, and local builds share this machine and run one at a time.

    Returns each persona's outcome and, under "cross-persona" when two personas or more were built and
    evaluated, the cross-persona evaluation's: its state, `report` (report.md's path), `headline` and
    figures (`final_macro_f1`, `base_macro_f1`, `prompted_macro_f1`, ...)."""
    settings = Settings()
    build_id = build_id or f"nightly-{datetime.now(timezone.utc):%Y-%m-%d}"
    workdir = str(Path(workdir or settings.workdir).expanduser().resolve())
    configs, outcomes = _configs(
        personas,
        settings,
        scale=scale,
        mode=mode,
        merge=merge,
        backend=backend,
        base_model=base_model,
        teacher_model=teacher_model,
        workdir=workdir,
        build_id=build_id,
        **(overrides or {}),
    )
    if from_deployment():
        outcomes |= build_runs(configs, mode, settings.nightly_wait_s)
    else:
        outcomes |= _build_all(configs, 1 if backend == "local" else max(1, max_concurrent))
    rows = [
        {
            "persona": p,
            "state": outcomes[p]["state"],
            "final": outcomes[p]["checkpoints"].get("final", ""),
            **_headline(configs.get(p), workdir, build_id),
            **_spend(configs.get(p)),
            "message": outcomes[p]["message"],
        }
        for p in personas
    ]
    cross = _cross_persona(configs, outcomes, workdir)
    _report(rows, build_id, scale, cross)
    return outcomes | ({CROSS: cross} if cross is not None else {})
