"""What the wire does to the real SDK on the loopback service: pending and expired results, faults of every
kind at 20%, a stalled result, a restart, a service that echoes the key, and the command's bad input."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tinker
from test_loopback import KEY, RANK, _post, make_data, steps
from tinker.lib.retryable_exception import RetryableException

from character.backend.errors import BackendFatalError, is_transient
from character.backend.local import LocalService
from character.loopback.api import LORA_ALPHA
from character.loopback.faults import WireFaults
from character.loopback.server import Loopback
from character.settings import Workspace


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return tmp_path_factory.mktemp("hub")


@pytest.fixture
def service(tmp_path, models_dir, hub, one_thread):
    """A loopback service on its own state folder: `service(faults=..., ...)`, stopped after the test."""
    made = []

    def start(**kw) -> Loopback:
        made.append(Loopback(tmp_path / "state", models_dir, hub=hub, **kw).start())
        return made[-1]

    yield start
    for lb in made:
        if not lb.stopping.is_set():
            lb.stop()


@pytest.fixture(scope="module")
def data(models_dir):
    return make_data(LocalService(Workspace(models_dir.parent)).get_tokenizer("tiny"))


def test_a_pending_result_is_answered_try_again_and_an_unknown_one_is_gone(service):
    lb = service(poll_hold_s=0.0)
    _, session = _post(lb.url, "/api/v1/create_session", {"tags": [], "user_metadata": {}, "sdk_version": "x"})
    req = {"session_id": session["session_id"], "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 2}}
    status, fut = _post(lb.url, "/api/v1/create_model", req)
    assert status == 200 and _post(lb.url, "/api/v1/create_model", req)[1] == fut  # a resubmission: same request
    first = _post(lb.url, "/api/v1/retrieve_future", {"request_id": fut["request_id"]})[1]
    assert first["type"] == "try_again"  # the model takes a while to load
    lb.engine.wait(fut["request_id"], 60)
    done = _post(lb.url, "/api/v1/retrieve_future", {"request_id": fut["request_id"]})[1]
    assert done == {"model_id": f"{session['session_id']}:train:0", "type": "create_model"}
    assert _post(lb.url, "/api/v1/retrieve_future", {"request_id": "req-999-0"})[0] == 410


def reference(models_dir, data, tmp_path, n: int = 2):
    ws = tmp_path / "ref"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    client = LocalService(Workspace(ws), device="cpu", seed=0).create_lora_training_client(
        "tiny", rank=RANK, seed=0, train_unembed=False, alpha=LORA_ALPHA
    )
    return steps(client, data, n)


@pytest.mark.slow
def test_a_fifth_of_exchanges_failing_at_the_wire_changes_no_number(service, models_dir, data, tmp_path):
    """5xx, 429, 408 and connection resets (after the request was accepted) at 20% of exchanges: the SDK retries
    and resubmits; a resubmitted request is not run twice, so every loss and gradient norm is the fault-free one."""
    lb = service(faults=WireFaults(0.2, seed=5, only=("500", "503", "429", "408", "reset")), poll_hold_s=0.5)
    sdk = tinker.ServiceClient(base_url=lb.url, api_key=KEY)
    client = sdk.create_lora_training_client(base_model="tiny", rank=RANK, seed=0, train_unembed=False).result()
    got = steps(client, data, 4)
    assert got[:4] == reference(models_dir, data, tmp_path, 4)[:4]
    print(lb.faults.exchanges, lb.faults.injected)
    assert sum(lb.faults.injected.values()) >= 5 and lb.faults.injected["reset"] >= 1, lb.faults.injected


def test_an_expired_pending_result_reaches_the_caller_as_retryable_and_transient(service, data):
    lb = service(faults=WireFaults(0.9, seed=1, only=("410",)), poll_hold_s=0.0)
    sdk = tinker.ServiceClient(base_url=lb.url, api_key=KEY)
    with pytest.raises(RetryableException) as err:
        sdk.create_lora_training_client(base_model="tiny", rank=RANK, seed=0).result(timeout=60)
    assert lb.faults.injected["410"] >= 1
    assert is_transient(err.value)  # so the training loop resumes from its last save and Prefect retries


def test_a_stalled_result_times_out_at_the_callers_bound(service, data):
    lb = service(faults=WireFaults(stall_rate=0.95, seed=2), stall_s=60, poll_hold_s=0.2)
    sdk = tinker.ServiceClient(base_url=lb.url, api_key=KEY)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        sdk.create_lora_training_client(base_model="tiny", rank=RANK, seed=0).result(timeout=3)
    assert time.monotonic() - started < 10 and lb.faults.injected["stall"] >= 1
    lb.stop()  # a held response is let go at shutdown, not after its 60 s


def test_a_restart_keeps_saved_states_and_loses_live_runs(service, data):
    lb = service(poll_hold_s=0.5)
    sdk = tinker.ServiceClient(base_url=lb.url, api_key=KEY)
    client = sdk.create_lora_training_client(base_model="tiny", rank=RANK, seed=0, train_unembed=False).result()
    steps(client, data, 1)
    state = client.save_state("s1").result().path
    after = steps(client, data, 1)
    lb.stop()
    lb2 = service(port=lb.port, poll_hold_s=0.5)
    with pytest.raises(tinker.RequestFailedError) as lost:  # the live run is gone ...
        client.forward_backward(data, "cross_entropy").result(timeout=60)
    assert is_transient(lost.value) and "resume from a saved state" in str(lost.value)
    resumed = sdk.create_training_client_from_state_with_optimizer(state).result(timeout=60)
    assert steps(resumed, data, 1) == after  # ... and the saved state resumes exactly
    rest = tinker.RestClient(base_url=lb2.url, api_key=KEY)
    assert state in {c.tinker_path for c in rest.list_checkpoints(client.model_id).result().checkpoints}


def test_an_echoed_key_stays_out_of_the_backends_error(service, monkeypatch):
    from character.backend.tinker import TinkerService
    from character.settings import Settings

    lb = service(echo_key=True)
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    svc = TinkerService(Settings(), base_url=lb.url, timeout_s=30)
    with pytest.raises(BackendFatalError) as err:
        svc.create_sampling_client(model_path="tinker://nope:train:0/weights/missing")
    text = str(err.value)
    assert KEY not in text and "\n" not in text and "not found" in text
    cause = err.value.__cause__
    assert cause is None or KEY not in str(cause)


def test_the_command_refuses_bad_options_in_one_line(tmp_path):
    cases = [
        (["--fault-rate", "1.5"], "--fault-rate"),
        (["--stall-rate", "-1"], "--stall-rate"),
        (["--port", "99999"], "--port"),
    ]

    def run(k: int, args: list[str]):
        cmd = [sys.executable, "-m", "character.cli", "tinker", "loopback", "--state", str(tmp_path / f"s{k}"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)

    with ThreadPoolExecutor(len(cases)) as pool:  # each case is a fresh process; run them side by side
        results = list(pool.map(run, range(len(cases)), [a for a, _ in cases]))
    for k, ((_, needle), r) in enumerate(zip(cases, results)):
        assert r.returncode == 2 and r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / f"s{k}").exists()  # refused before anything was written
