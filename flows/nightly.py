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

from character.build.stages import PipelineConfig, read_record
from character.build.summary import HEADLINE, change, eval_summary, headline, previous_nightly_record
from character.datagen.scales import ScaleName
from character.errors import UserError
from character.settings import Settings
from flows.paper import paper
from flows.sequential import sequential


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
    """`max_concurrent` applies to Tinker; local builds share one machine and run one at a time."""
    logger = get_run_logger()
    settings = Settings()
    build_id = build_id or f"nightly-{datetime.now(timezone.utc):%Y-%m-%d}"
    workdir = str(Path(workdir or settings.workdir).expanduser().resolve())
    outcomes: dict[str, dict] = {}
    configs: dict[str, PipelineConfig] = {}
    for persona in personas:
        try:
            configs[persona] = PipelineConfig.from_settings(
                settings,
                persona=persona,
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
        except (ValidationError, ValueError) as e:
            outcomes[persona] = {"state": "Failed", "checkpoints": {}, "message": str(e).splitlines()[0][:300]}

    limit = 1 if backend == "local" else max(1, max_concurrent)
    # Each worker thread carries the flow's context, so the builds show as subflows of this run.
    with ThreadPoolExecutor(max_workers=limit) as pool:
        futures = {p: pool.submit(contextvars.copy_context().run, _one, cfg) for p, cfg in configs.items()}
        for persona, fut in futures.items():
            try:
                outcomes[persona] = fut.result()
            except Exception as e:  # noqa: BLE001 - one persona's failure is reported, not raised
                outcomes[persona] = {"state": "Failed", "checkpoints": {}, "message": str(e)[:300]}

    rows = [
        {
            "persona": p,
            "state": o["state"],
            "final": o["checkpoints"].get("final", ""),
            **_headline(configs.get(p), workdir, build_id),
            "message": o["message"],
        }
        for p, o in ((p, outcomes[p]) for p in personas)
    ]
    create_table_artifact(
        key="nightly-summary",
        table=rows,
        description=f"nightly build {build_id} ({scale}): the final checkpoint's metrics, and "
        "their change since the persona's previous nightly build",
    )
    failed = [r["persona"] for r in rows if r["state"] != "Completed"]
    for r in rows:
        logger.info("%s: %s %s", r["persona"], r["state"], r["final"] or r["message"])
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} personas failed: {', '.join(failed)}")
    return outcomes
