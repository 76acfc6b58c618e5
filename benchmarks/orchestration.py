"""6. Orchestration overhead: the smoke pipeline through Prefect vs the same stages called directly.

Both sides run one plan (character.build.plan) of the sequential pipeline: questions, DPO data,
DPO, introspection, SFT, evaluation and summary, for the same persona, seed and scale, each build
in a fresh workspace sharing the tiny model and a Prefect home whose database already exists. Each child process makes two builds:

- the first is timed from the moment the process was launched to the end of the build: on the
  Prefect side it is `character pipeline` exactly as a user types it, either starting Prefect's
  ephemeral API itself (no PREFECT_API_URL) or talking to a running Prefect server; on the other
  side a script that calls the stages;
- the second, in the same process, is timed alone: the flow with its API already up vs the stages.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import Row, alternate

PERSONA = "sarcastic"


def _config(workdir: str, build: str):
    from character.config import PipelineConfig

    return PipelineConfig(persona=PERSONA, scale="smoke", workdir=workdir, build_id=build, device="cpu")


def _fresh(root: str, side: str, models: str) -> str:
    from benchmarks.data import workspace

    return str(workspace(Path(tempfile.mkdtemp(prefix=f"{side}-", dir=root)), Path(models)))


def prefect_env(home: str, api_url: str | None = None) -> dict:
    env = dict(
        PREFECT_HOME=home,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(Path(home) / "results"),
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def with_prefect(root: str, models: str, home: str, launched: float, api_url: str | None = None) -> dict:
    os.environ.update(prefect_env(home, api_url))
    from character.cli import main

    sys.argv = [
        "character",
        "pipeline",
        PERSONA,
        "--scale",
        "smoke",
        "--workdir",
        _fresh(root, "cli", models),
        "--build-id",
        "bench-0",
        "--json",
    ]
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
    cold = time.time() - launched
    from flows.sequential import sequential

    cfg = _config(_fresh(root, "flow", models), "bench-1")
    t0 = time.perf_counter()
    sequential(cfg)
    return {"cold": cold, "warm": time.perf_counter() - t0}


def direct(root: str, models: str, launched: float) -> dict:
    """The flow's plan with the plain stages (character.build.direct): everything but Prefect."""
    from character.build.direct import run_sequential

    run_sequential(_config(_fresh(root, "direct", models), "bench-0"))
    cold = time.time() - launched
    t0 = time.perf_counter()
    run_sequential(_config(_fresh(root, "direct", models), "bench-1"))
    return {"cold": cold, "warm": time.perf_counter() - t0}


def compare(root: Path, models: Path, repeats: int) -> list[Row]:
    from benchmarks.measure import run_child

    root.mkdir(parents=True, exist_ok=True)
    home = str(root / "prefect-home")
    kw = dict(root=str(root), models=str(models))
    os.environ.update(prefect_env(home))
    run_child("benchmarks.orchestration:with_prefect", home=home, launched=time.time(), **kw)  # creates the DB
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=120)
    try:
        s = alternate(
            {
                "ephemeral": ("benchmarks.orchestration:with_prefect", dict(home=home, launched="now", **kw)),
                "server": (
                    "benchmarks.orchestration:with_prefect",
                    dict(home=home, launched="now", api_url=server.api_url, **kw),
                ),
                "direct": ("benchmarks.orchestration:direct", dict(launched="now", **kw)),
            },
            repeats,
        )
    finally:
        server.stop()
    name = f"6. orchestration overhead (sequential smoke pipeline, {PERSONA}; process start to result)"
    peer = "a script calling the same stages"
    return [
        Row(
            name,
            "`character pipeline`, Prefect starts its ephemeral API",
            s["ephemeral"].median("cold"),
            s["direct"].median("cold"),
            peer,
            "s",
            "<= 1.15",
            "the ephemeral API is a uvicorn subprocess that imports Prefect's server (~10 s on 2 cores); the CLI "
            "starts it while torch and transformers load",
        ),
        Row(
            name,
            "`character pipeline` with a running Prefect server (PREFECT_API_URL)",
            s["server"].median("cold"),
            s["direct"].median("cold"),
            peer,
            "s",
            "<= 1.15",
        ),
        Row(
            name,
            "next build in the same process (flow vs stages, API up)",
            s["server"].median("warm"),
            s["direct"].median("warm"),
            "the same stages called directly",
            "s",
            "<= 1.15",
        ),
    ]
