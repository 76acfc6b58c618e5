"""The nightly flow fanned out over a work pool: a real Prefect server and two process workers on
loopback, the deployments of prefect.yaml, and real sequential builds of the tiny model (smoke scale,
no evaluation, so that three of them fit in a few minutes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]
PERSONAS = ["sarcastic", "pirate", "mathematical"]
BUILD_ID = "nightly-fanout-test"
OVERRIDES = {"lora_rank": 8, "evaluate": False}

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """The process and everything it started (its flow-run subprocesses): one group each."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
            os.killpg(proc.pid, signal.SIGKILL)  # flow runs left behind by a worker that exited
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def pool(tmp_path_factory, models_dir):
    tmp = tmp_path_factory.mktemp("fanout")
    ws = tmp / "ws"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    url = f"http://127.0.0.1:{_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "results"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "CHARACTER_WORKDIR": str(ws),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    procs: list[subprocess.Popen] = []
    try:
        port = url.split(":")[2].split("/")[0]
        procs.append(
            _start([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port], env, tmp / "server.log")
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        subprocess.run([*PREFECT, "work-pool", "create", "character", "--type", "process"], env=env, check=True)
        subprocess.run([*PREFECT, "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env, check=True)

        def worker(name: str, limit: int) -> None:
            cmd = [*PREFECT, "worker", "start", "--pool", "character", "--type", "process", "--name", name]
            procs.append(_start([*cmd, "--limit", str(limit)], env, tmp / f"{name}.log"))

        yield {"url": url, "ws": ws, "worker": worker}
    finally:
        for p in reversed(procs):
            _stop(p)


def _client(url):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        return get_client(sync_client=True)


def _start_nightly(client):
    dep = client.read_deployment_by_name("nightly/nightly")
    return client.create_flow_run_from_deployment(
        dep.id, parameters={"personas": PERSONAS, "scale": "smoke", "build_id": BUILD_ID, "overrides": OVERRIDES}
    )


def _wait_final(client, run_id, timeout):
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state and run.state.is_final():
            return run
        assert time.monotonic() < deadline, f"flow run {run_id} still {run.state.name} after {timeout} s"
        time.sleep(2)


def _until(ok, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(1)


def _build_runs(client):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    dep = client.read_deployment_by_name("sequential/sequential")
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


def _configs(ws):
    from character.config import PipelineConfig

    return [PipelineConfig(persona=p, scale="smoke", workdir=str(ws), build_id=BUILD_ID, **OVERRIDES) for p in PERSONAS]


@pytest.fixture(scope="module")
def two_nightlies(pool):
    """A nightly of three personas, and a second one started while the first runs."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from character.build.record import read_record
    from flows.fanout import _submit

    with temporary_settings({PREFECT_API_URL: pool["url"]}), _client(pool["url"]) as client:
        # w1 takes the nightly run and has one slot left, w2 (started after) has one: each must build
        pool["worker"]("w1", 2)
        first = _start_nightly(client)
        _until(lambda: client.read_flow_run(first.id).state.name == "Running", "the nightly to run")
        pool["worker"]("w2", 1)
        _until(lambda: len(_build_runs(client)) == len(PERSONAS), "the build runs")
        # What a nightly starting now would do: join the runs on their way instead of adding its own.
        joined = _submit({c.persona: c for c in _configs(pool["ws"])}, "sequential/sequential")
        second = _start_nightly(client)
        first = _wait_final(client, first.id, 240)
        cfgs = _configs(pool["ws"])
        after_first = {c.persona: read_record(c)["stages"] for c in cfgs}
        builds_after_first = _build_runs(client)
        second = _wait_final(client, second.id, 180)
        after_second = {c.persona: read_record(c)["stages"] for c in cfgs}
        summaries = {r.id: _summary(client, r.id) for r in (first, second)}
        return {
            "first": first,
            "second": second,
            "builds_after_first": builds_after_first,
            "builds": _build_runs(client),
            "records": (after_first, after_second),
            "summaries": summaries,
            "joined": joined,
            "builds_at_once": client.read_deployment_by_name("sequential/sequential").global_concurrency_limit.limit,
            "workers": {r.id: _worker(client, r.id) for r in builds_after_first},
        }


def _summary(client, run_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return next((a.data for a in arts if a.key == "nightly-summary"), None)


def _worker(client, run_id) -> str:
    """The worker that ran the flow run: the last one that submitted it (a run refused for want of a
    concurrency slot is submitted again, maybe by the other worker)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), sort=LogSort.TIMESTAMP_ASC)
    said = [log.message for log in logs if "submitting flow run" in log.message]
    return said[-1].split("'")[1] if said else ""


def _max_overlap(runs) -> int:
    edges = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs])
    most = now = 0
    for _, d in edges:
        now += d
        most = max(most, now)
    return most


def test_each_persona_builds_in_its_own_run_spread_over_both_workers(two_nightlies):
    first = two_nightlies["first"]
    assert first.state.is_completed(), first.state.message
    runs = two_nightlies["builds_after_first"]
    assert sorted(r.name for r in runs) == sorted(f"{p}-{BUILD_ID}" for p in PERSONAS)
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.message) for r in runs]
    assert all(r.parent_task_run_id is not None for r in runs)  # subflows of the nightly in the UI
    workers = two_nightlies["workers"]
    assert set(workers.values()) == {"w1", "w2"}, workers
    # prefect.yaml lets two builds run at once (builds_at_once), and so do the workers' free slots
    assert two_nightlies["builds_at_once"] == 2
    assert _max_overlap(runs) == 2, [(r.name, r.start_time, r.end_time) for r in runs]


def test_the_summary_has_a_row_per_persona_with_its_final_checkpoint(two_nightlies):
    rows = two_nightlies["summaries"][two_nightlies["first"].id]
    import json

    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [r["persona"] for r in rows] == PERSONAS
    for r in rows:
        assert r["state"] == "Completed" and Path(r["final"].removeprefix("file://")).exists(), r


def test_a_second_nightly_builds_no_persona_twice(two_nightlies):
    second = two_nightlies["second"]
    assert second.state.is_completed(), second.state.message
    after_first, after_second = two_nightlies["records"]
    changed = {p: [k for k in after_first[p] if after_second[p].get(k) != after_first[p][k]] for p in PERSONAS}
    # every stage recorded once: the second nightly (which waited for the first, one nightly at a time)
    # trained nothing; only the record of the skipped evaluation is written again
    for rec in (after_first, after_second):
        for stages in rec.values():
            assert stages.pop("eval")["names"] == ["dpo", "final"]
    assert after_second == after_first, changed
    assert two_nightlies["joined"] == {
        r.name.removesuffix(f"-{BUILD_ID}"): r.id for r in two_nightlies["builds_after_first"]
    }
    by_persona = {}
    for r in two_nightlies["builds"]:
        by_persona.setdefault(r.name, []).append(r)
    for name, runs in by_persona.items():  # no two runs of one build ever ran at once
        assert _max_overlap(runs) == 1, name


def test_a_build_held_elsewhere_is_refused_by_the_server(pool):
    """Another machine's run holds the build's server limit: a run of the same build fails at once."""
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from character.config import PipelineConfig
    from flows.build_slots import build_limit

    cfg = PipelineConfig(
        persona="pirate", scale="smoke", workdir=str(pool["ws"]), build_id="held-elsewhere", **OVERRIDES
    )
    with temporary_settings({PREFECT_API_URL: pool["url"]}), _client(pool["url"]) as client:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=build_limit(cfg), limit=1))
        dep = client.read_deployment_by_name("sequential/sequential")
        with concurrency(build_limit(cfg), strict=True):
            run = client.create_flow_run_from_deployment(dep.id, parameters={"config": cfg.model_dump(mode="json")})
            run = _wait_final(client, run.id, 120)
    assert run.state.is_failed()
    assert f"held by another flow run (server concurrency limit {build_limit(cfg)})" in run.state.message
    assert not cfg.paths.record.exists()  # refused before anything was written
