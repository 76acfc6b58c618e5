"""Builds on `--backend tinker` against the loopback service, end to end through Prefect: the real SDK, the
real CLI, a service in its own process (`character tinker loopback`), at a small scale on the tiny model.

The builds name the model `loopback/tiny` (one served name among others); `test_a_build_names_the_model_tiny`
builds with `--base-model tiny --teacher-model tiny`, which a loopback service's URL allows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from adapters import assert_same_training
from loopback_service import KEY, MODEL, SMALL, Service, adapter, finish, loopback_env, loopback_space
from safetensors.torch import load_file


def build(url: str, workdir: Path, hub: Path, prefect_home: Path, build_id: str, *extra: str, env: dict | None = None):
    env = loopback_env(url, hub, prefect_home, **(env or {}))
    cmd = [sys.executable, "-m", "character.cli", "pipeline", "pirate", "--backend", "tinker"]
    cmd += ["--base-model", MODEL, "--teacher-model", MODEL, "--workdir", str(workdir), "--build-id", build_id]
    return subprocess.Popen([*cmd, *SMALL, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def record(workdir: Path, build_id: str) -> dict:
    return json.loads((Path(workdir) / "builds" / "pirate" / build_id / "record.json").read_text())


@pytest.fixture(scope="module")
def space(tmp_path_factory, models_dir):
    return loopback_space(tmp_path_factory, models_dir, "lb-builds")


@pytest.fixture(scope="module")
def clean_and_faulty(space):
    """The same build twice, side by side: on a clean service, and on one where a fifth of the exchanges
    fail in every way the wire can (5xx, 429, 408, 410 on pending results, resets), a few results stall
    past the build's bound, and every error body echoes the API key."""
    ws, hub = space / "ws", space / "hub"
    clean = Service(space / "clean", ws, hub)
    faulty = Service(
        space / "faulty", ws, hub, "--fault-rate", "0.2", "--fault-seed", "7", "--stall-rate", "0.01", "--echo-key"
    )
    try:
        bound = {"CHARACTER_TINKER_RESULT_TIMEOUT_S": "20"}
        runs = [
            build(clean.url, ws, hub, space / "prefect-clean", "clean"),
            build(faulty.url, ws, hub, space / "prefect-faulty", "faulty", env=bound),
        ]
        with ThreadPoolExecutor(2) as pool:
            out = list(pool.map(finish, runs))
    except BaseException:
        clean.kill()
        raise
    finally:
        faulty.kill(signal.SIGINT)  # interrupted, it reports the faults it injected
    yield {"clean": out[0], "faulty": out[1], "faulty_service": faulty, "clean_service": clean}
    clean.kill()


@pytest.mark.slow
def test_a_sequential_build_runs_on_the_loopback_through_prefect(space, clean_and_faulty):
    run = clean_and_faulty["clean"]
    ck = run["result"]["checkpoints"]
    assert set(ck) >= {"dpo", "sft", "final"} and all(str(v).startswith("tinker://") for v in ck.values()), ck
    stages = record(space / "ws", "clean")["stages"]
    assert stages["dpo_data"]["rows"] > 0 and stages["introspection"]["rows"] > 0
    assert stages["dpo"]["steps"] >= 2 and stages["sft"]["steps"] >= 1
    assert stages["sft"]["state"] != stages["dpo"]["state"] and stages["dpo"]["lora_alpha"] == 32
    base = load_file(str(next((space / "ws" / "models").glob("tiny-*")) / "model.safetensors"))
    dpo, sft = adapter(space / "clean", stages["dpo"]["state"]), adapter(space / "clean", stages["sft"]["state"])
    assert dpo.keys() == sft.keys() and any(not torch.equal(dpo[k], sft[k]) for k in dpo)  # SFT trained on from DPO
    assert base  # the base weights are untouched files; the adapter is what the service trained


@pytest.mark.slow
def test_with_a_fifth_of_exchanges_failing_the_final_adapter_is_the_clean_runs(space, clean_and_faulty):
    """Every failed request is either retried by the SDK before it ran, deduplicated by the service when
    resubmitted after it ran, or recovered by the training loop from the last saved state and replayed; the
    local backend's save and load are exact (float32 tensors and Adam state), and every sampling request
    carries its seed. So the data are the clean run's row for row and the adapter is the clean run's up to
    the rounding of batches composed differently (tests/adapters.py)."""
    clean, faulty = record(space / "ws", "clean")["stages"], record(space / "ws", "faulty")["stages"]
    for stage in ("dpo", "sft"):
        a, b = adapter(space / "clean", clean[stage]["state"]), adapter(space / "faulty", faulty[stage]["state"])
        assert_same_training(b, a, stage)
    assert clean["dpo_data"]["rows"] == faulty["dpo_data"]["rows"]
    svc = clean_and_faulty["faulty_service"]
    assert "Traceback" not in svc.stderr, svc.stderr[-2000:]
    line = next(x for x in svc.stdout.splitlines() if x.startswith("faults injected: "))
    counts = dict(kv.split("=") for kv in line.split(": ", 1)[1].split(" in ")[0].split())
    assert {"500", "503", "429", "408", "410", "reset"} <= set(counts), line  # every kind, many times
    assert sum(map(int, counts.values())) >= 20, line


@pytest.mark.slow
def test_an_echoed_key_appears_nowhere_in_output_workspace_or_prefect(space, clean_and_faulty):
    run = clean_and_faulty["faulty"]
    assert KEY not in run["stdout"] and KEY not in run["stderr"]
    secret = KEY.encode()
    for root in (space / "ws" / "builds", space / "prefect-faulty"):
        for f in root.rglob("*"):
            if f.is_file():
                assert secret not in f.read_bytes(), f
    assert any((space / "prefect-faulty").rglob("*.db")), "Prefect's database was not where the test looks"


@pytest.mark.slow
def test_sample_and_chat_answer_from_a_tinker_checkpoint_of_the_build(space, clean_and_faulty):
    final = clean_and_faulty["clean"]["result"]["checkpoints"]["final"]
    env = {
        **os.environ,
        "TINKER_BASE_URL": clean_and_faulty["clean_service"].url,
        "TINKER_API_KEY": KEY,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(space / "hub"),
        "CHARACTER_BACKEND": "tinker",
        "CHARACTER_BASE_MODEL": MODEL,
    }
    base = [sys.executable, "-m", "character.cli"]
    args = ["--prompt", "Tell me about the sea.", "-n", "2", "--max-new-tokens", "24", "--json"]
    r = subprocess.run([*base, "sample", final, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    answers = json.loads(r.stdout.strip().splitlines()[-1])["answers"]
    assert len(answers) == 2 and all(isinstance(a, str) and a.strip() for a in answers), answers
    chat = subprocess.run(
        [*base, "chat", final], input="Hello there\n/exit\n", env=env, capture_output=True, text=True, timeout=300
    )
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]
    samplers = json.loads((space / "clean" / "registry.json").read_text())["samplers"]
    assert any(s["model_path"] == final for s in samplers.values())  # the answers came from that checkpoint


@pytest.mark.slow
def test_paper_mode_trains_sft_from_the_base_model_on_the_loopback(space, clean_and_faulty):
    svc = clean_and_faulty["clean_service"]
    run = finish(build(svc.url, space / "ws", space / "hub", space / "prefect-paper", "paper", "--paper-mode"))
    assert run["result"]["mode"] == "paper"
    stages = record(space / "ws", "paper")["stages"]
    runs = json.loads((space / "clean" / "registry.json").read_text())["runs"]
    sft_run = stages["sft"]["state"].removeprefix("tinker://").split("/")[0]
    assert runs[sft_run]["from"] is None  # SFT started from the base model, not from the DPO state
    seq = record(space / "ws", "clean")["stages"]
    seq_sft = seq["sft"]["state"].removeprefix("tinker://").split("/")[0]
    assert runs[seq_sft]["from"] == seq["dpo"]["state"]  # whereas sequential SFT continued from DPO


@pytest.mark.slow
def test_a_service_killed_mid_build_and_restarted_resumes_from_the_last_save(space, clean_and_faulty):
    """The service is killed (SIGKILL) once the build's first training state is on its disk, and started again
    on the same port and state folder: the live run is gone, the build's loop resumes from its last saved state
    (the service's registry and checkpoints survived), and the final adapter is the clean run's."""
    ws, hub, state = space / "ws", space / "hub", space / "restarted"
    svc = Service(state, ws, hub)
    try:
        proc = build(svc.url, ws, hub, space / "prefect-restart", "restarted")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            reg = state / "registry.json"
            if reg.is_file() and "/weights/step-" in reg.read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before any state was saved"
        svc = svc.restart()
        run = finish(proc)
    finally:
        svc.kill()
    registry = json.loads((state / "registry.json").read_text())
    assert registry["restarts"] == 1
    # the build's loop resumed a run (weights and optimizer) from a saved step: only a recovery does that
    assert any(r.get("optimizer") and "/weights/step-" in (r.get("from") or "") for r in registry["runs"].values())
    clean, got = record(ws, "clean")["stages"], record(ws, "restarted")["stages"]
    for stage in ("dpo", "sft"):
        a, b = adapter(space / "clean", clean[stage]["state"]), adapter(state, got[stage]["state"])
        assert_same_training(b, a, stage)
    assert run["result"]["checkpoints"]["final"].startswith("tinker://")


@pytest.mark.slow
def test_a_build_names_the_model_tiny(space):
    ws, hub, state = space / "ws", space / "hub", space / "as-tiny"
    env = {**os.environ, "CHARACTER_WORKDIR": str(ws), "HF_HUB_CACHE": str(hub)}
    cmd = [sys.executable, "-m", "character.cli", "tinker", "loopback", "--state", str(state), "--port", "0"]
    svc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = svc.stdout.readline().split()[3]
        proc = build(url, ws, hub, space / "prefect-tiny", "as-tiny", "--base-model", "tiny", "--teacher-model", "tiny")
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-2000:]
    finally:
        svc.send_signal(signal.SIGKILL)
        svc.wait()
