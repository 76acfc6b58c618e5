"""One writer per build: the lock refuses a second run, frees itself when its owner dies, and two
runs of one build started together leave exactly one run's files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from character.build.lock import build_lock, holds
from character.errors import UserError

HOLDER = (
    "import sys, time; from character.build.lock import build_lock\n"
    "with build_lock(sys.argv[1], 'x/y'):\n"
    "    print('held', flush=True); time.sleep(600)\n"
)


def _hold_in_child(build: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(build)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_build_is_refused_naming_its_owner_and_freed_when_the_owner_is_killed(tmp_path):
    build = tmp_path / "builds" / "pirate" / "b1"
    proc = _hold_in_child(build)
    try:
        with pytest.raises(UserError, match=rf"build pirate/b1 is held by pid {proc.pid} on "):
            with build_lock(build, "pirate/b1"):
                pytest.fail("a second writer got the lock")
        assert not holds(build)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The kernel released the dead owner's lock: no stale lock to clean up by hand.
    with build_lock(build, "pirate/b1"):
        owner = json.loads((build / ".lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"]


def test_the_lock_is_reentrant_within_a_process_and_released_at_the_end(tmp_path):
    with build_lock(tmp_path, "p/b"):
        with build_lock(tmp_path, "p/b"):  # the CLI holds it, then the flow takes it again
            assert holds(tmp_path)
        assert holds(tmp_path)
    assert not holds(tmp_path)
    assert not (tmp_path / ".lock").exists()  # removed on release
    build = tmp_path / "ws" / "builds" / "p" / "b"
    with build_lock(build, "p/b"):
        pass
    assert not (tmp_path / "ws").exists()  # a run that wrote nothing leaves nothing, not even folders
    proc = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(600)", "pass"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_cli_refuses_a_held_build_at_once_and_writes_nothing(tmp_path):
    ws = tmp_path / "ws"
    build = ws / "builds" / "pirate" / "busy"
    with build_lock(build, "pirate/busy"):  # this test process is the other writer
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "character.cli", "pipeline", "pirate", "--workdir", str(ws), "--build-id", "busy"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - t0
        assert sorted(p.name for p in build.iterdir()) == [".lock"]  # no record, no data
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: build pirate/busy is held by pid "), proc.stderr
    assert f"pid {os.getpid()} " in lines[0]
    assert took < 60  # refused before Prefect or a model starts (seconds, even on a loaded machine)


DRIVER = (
    "import json, sys; from character.build.direct import run_sequential; from character.config import PipelineConfig\n"
    "try:\n"
    "    run_sequential(PipelineConfig(**json.loads(sys.argv[1])))\n"
    "except Exception as e:\n"
    "    print('error:', e, file=sys.stderr); sys.exit(2)\n"
)
TINY = dict(
    persona="pirate",
    build_id="twice",
    dpo_pairs=6,
    reflections=4,
    interactions=1,
    turns=2,
    max_new_tokens=96,
    max_in_flight=4,
    evaluate=False,
    dpo={"batch_size": 2, "save_every": 1},
    sft={"batch_size": 2, "save_every": 1},
)


@pytest.mark.slow
def test_two_runs_of_one_build_started_together_one_completes_the_other_is_refused(workdir):
    cfg = json.dumps({**TINY, "workdir": str(workdir)})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = outs[[p.returncode for p in procs].index(2)][1]
    assert "is held by pid" in refused and "Traceback" not in refused

    build = workdir / "builds" / "pirate" / "twice"
    for name in ("dpo.jsonl", "introspection.jsonl"):
        rows = (build / "data" / name).read_text().splitlines()
        assert rows and len(rows) == len(set(rows)), name  # no row written twice (each row has its index)
    for stage in ("dpo", "sft"):
        steps = [json.loads(x)["step"] for x in (build / stage / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1)), stage  # one metrics row per step
    record = json.loads((build / "record.json").read_text())
    assert {"dpo_data", "dpo", "introspection", "sft"} <= set(record["stages"])


def test_the_server_slot_is_the_servers_answer_however_slow_it_comes(prefect_harness, monkeypatch, tmp_path):
    """Runs from a deployment also hold the build's server limit (flows.build_slots). Issue 22: a server that
    took longer than a fixed 2 s wait to answer (its SQLite writes queued behind another build's) had a build
    nobody held refused as "held by another flow run". Here every answer takes 3 s: a free slot is taken, a
    held one is refused on the server's answer (not after the bound), and a bound too short says so."""
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect.concurrency.sync import concurrency

    from character.config import PipelineConfig
    from flows import build_slots

    monkeypatch.setattr(build_slots, "from_deployment", lambda: True)
    cfg = PipelineConfig(persona="pirate", workdir=str(tmp_path), build_id="slot")
    build_slots._ensure_single(build_slots.build_limit(cfg))
    real = PrefectClient.increment_concurrency_slots_with_lease

    async def slow(self, *args, **kwargs):
        await asyncio.sleep(3)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(PrefectClient, "increment_concurrency_slots_with_lease", slow)
    entered = []
    with build_slots.held(cfg):  # nobody holds it: taken, however slow the answer
        entered.append(1)
    assert entered
    with concurrency(build_slots.build_limit(cfg), strict=True):  # another run holds it
        start = time.monotonic()
        with pytest.raises(UserError, match=r"held by another flow run \(server concurrency limit"):
            with build_slots.held(cfg, answer_s=600):
                pytest.fail("the body ran while the slot was held")
        assert time.monotonic() - start < 60  # the server's refusal, not the 600 s bound
    with pytest.raises(UserError, match=r"did not answer .* within 1 s \(CHARACTER_BUILD_SLOT_TIMEOUT_S\)"):
        with build_slots.held(cfg, answer_s=1):
            pytest.fail("the body ran without the slot")
