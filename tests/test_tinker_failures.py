"""The Tinker backend against the failures the real SDK (0.38) produces, at the SDK boundary.

The fake (tests/fake_tinker.py) raises at `.result()` what the SDK lets through, built the way the SDK
builds it: `RequestFailedError`, a `ValueError` wrapping a 4xx, `RetryableException` after the request
ran, the poisoned RuntimeError, HTTP errors once submission retries ran out, and results that never
come. What must hold: every wait ends within the configured bound, a stall or an expired result costs
a recovery and changes no weight, every error reaches the caller as one line without the key, and the
optimizer's gradient norm and Tinker's LoRA alpha are recorded.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path

import pytest
import tinker
import torch
from fake_tinker import (  # noqa: F401 - fixtures are used by name
    _ALLOW_LOOPBACK,
    _REQ,
    KEY,
    STALL,
    STUDENT,
    TEACHER,
    Ran,
    datum,
    dpo_rows,
    expired,
    fake,
    fetch_error,
    http_error,
    no_network,
    request_failed,
    service,
    sft_rows,
    tinker_build_config,
    tokenizer,
    wired,
    write_jsonl,
)
from kept_logs import kept_logs
from tinker import types

from character.backend import tinker as tb
from character.backend.errors import BackendFatalError, ResultTimeout, TransientBackendError, is_transient
from character.train.dpo import run_dpo
from character.train.loop import OptimConfig, _grad_norm
from character.train.losses import DPOCoefficients
from character.train.renderer import Renderer
from character.train.sft import run_sft

BOUND = 1.0  # seconds: the result bound the stall tests run under


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    import character.backend.retry as retry

    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)


# -- every error shape: one line, no key -------------------------------------------------------------
ECHO = f"invalid request from key {KEY}"
SHAPES = {
    # name: (what the SDK raises at .result(), transient?)
    "failed-on-server": (lambda: request_failed(types.RequestErrorCategory.Server, ECHO), True),
    "failed-input": (lambda: request_failed(types.RequestErrorCategory.User, ECHO), False),
    "expired-410": (lambda: expired(f"Error code: 410 - {ECHO}"), True),
    "submission-gave-up-503": (lambda: http_error(tinker.InternalServerError, 503, f"Error code: 503 - {ECHO}"), True),
    "connection": (lambda: tinker.APIConnectionError(request=_REQ, message=f"Connection error: {ECHO}"), True),
    "fetch-401": (lambda: fetch_error(tinker.AuthenticationError, 401, f"Error code: 401 - {ECHO}"), False),
    "fetch-403": (lambda: fetch_error(tinker.PermissionDeniedError, 403, f"Error code: 403 - {ECHO}"), False),
    "fetch-404": (lambda: fetch_error(tinker.NotFoundError, 404, f"Error code: 404 - {ECHO}"), False),
    "fetch-400": (lambda: fetch_error(tinker.BadRequestError, 400, "x" * 190 + KEY), False),  # cut mid-key
    "unreadable": (lambda: ValueError(f"Error retrieving result: bad json {ECHO}"), False),
}


def _assert_one_redacted_line(err: BaseException) -> None:
    assert "\n" not in str(err) and str(err).strip()
    assert KEY not in str(err) and KEY[:12] not in str(err)
    shown = "".join(traceback.format_exception(err))  # what a traceback (Prefect's log) would print
    assert KEY not in shown and KEY[:12] not in shown


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_error_shape_reaches_the_caller_as_one_redacted_line(wired, name):
    make, transient = SHAPES[name]
    want = TransientBackendError if transient else BackendFatalError
    svc = service(result_timeout_s=5.0)
    trainer = svc.create_lora_training_client(STUDENT, rank=4)
    sampler = svc.create_sampling_client(base_model=STUDENT)
    wired.fail("forward_backward", make())
    wired.fail("sample", make())
    fb = trainer.forward_backward([datum([1, 2, 3])], "cross_entropy")  # never raises at submission
    sample = sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=8))
    for fut in (fb, sample):
        with pytest.raises(want) as err:
            fut.result()
        assert is_transient(err.value) is transient
        _assert_one_redacted_line(err.value)
    # a shape without the key keeps the SDK error chained, for debugging
    wired.fail("optim_step", request_failed(types.RequestErrorCategory.Server, "plain"))
    with pytest.raises(TransientBackendError) as err:
        trainer.optim_step(types.AdamParams(learning_rate=0.1)).result()
    assert isinstance(err.value.__cause__, tinker.RequestFailedError)


def test_a_fatal_error_with_the_key_echoed_is_one_line_at_the_command_line(wired, capsys, monkeypatch):
    from character import cli

    wired.fail("get_server_capabilities", fetch_error(tinker.AuthenticationError, 401, f"Error code: 401 - {ECHO}"))
    monkeypatch.setattr(sys, "argv", ["character", "tinker", "models"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "TINKER_API_KEY" in lines[0] and KEY not in out + err


# -- bounded waits ---------------------------------------------------------------------------------
def test_a_stalled_sampling_request_is_given_up_after_the_bound_and_its_slot_returns(wired):
    svc = service(result_timeout_s=BOUND, max_in_flight=1)
    client = svc.create_sampling_client(base_model=TEACHER)
    prompt = types.ModelInput.from_ints([1, 2, 3])
    wired.fail("sample", STALL)
    stalled = client.sample(prompt, 1, types.SamplingParams(max_tokens=16, seed=0))
    t0 = time.perf_counter()
    with pytest.raises(ResultTimeout, match="CHARACTER_TINKER_RESULT_TIMEOUT_S") as err:
        stalled.result()
    waited = time.perf_counter() - t0
    assert BOUND <= waited < BOUND + 1.0 and is_transient(err.value)
    assert wired.stalled[0].cancelled()  # given up for good: the SDK cancels it on the server
    # the one in-flight slot came back: the next request goes through
    assert client.sample(prompt, 1, types.SamplingParams(max_tokens=16, seed=0)).result().sequences


def test_a_stall_does_not_hang_a_window_wider_than_the_in_flight_bound(wired):
    """Generation submits a window of requests before waiting on any (64 by default, against Tinker's 32
    slots): a stalled request must not keep the submissions behind it waiting for its slot for ever."""
    from character.backend.retry import Call

    svc = service(result_timeout_s=BOUND, max_in_flight=2)
    client = svc.create_sampling_client(base_model=TEACHER)
    prompt = types.ModelInput.from_ints([1, 2, 3])
    wired.fail("sample", STALL, STALL)
    t0 = time.perf_counter()
    calls = [Call(lambda i=i: client.sample(prompt, 1, types.SamplingParams(max_tokens=16, seed=i))) for i in range(4)]
    results = [c.result() for c in calls]
    assert len(results) == 4 and all(r.sequences for r in results)
    assert time.perf_counter() - t0 < 8 * BOUND + 5
    assert len(wired.stalled) == 2 and all(f.cancelled() for f in wired.stalled)


def test_the_bound_comes_from_the_settings(wired, monkeypatch):
    monkeypatch.setenv("CHARACTER_TINKER_RESULT_TIMEOUT_S", "0.25")
    svc = tb.TinkerService(tb.Settings(), base_url="https://tinker.invalid")
    assert svc.result_timeout_s == 0.25
    wired.fail("create_sampling_client", STALL)
    t0 = time.perf_counter()
    with pytest.raises(ResultTimeout):
        svc.create_sampling_client(base_model=STUDENT)  # client creation is bounded too
    assert time.perf_counter() - t0 < 1.5
    trainer = svc.create_lora_training_client(STUDENT, rank=4)
    wired.fail("save_state", STALL)
    with pytest.raises(ResultTimeout):
        trainer.save_state("s").result()
    wired.fail("get_weights_info_by_tinker_path", STALL)  # and the REST calls
    with pytest.raises(ResultTimeout):
        svc.rest_client().get_weights_info_by_tinker_path("tinker://run-000/weights/s").result()


def _sft(svc, tmp_path: Path, name: str, data: Path, cfg: OptimConfig):
    renderer = Renderer(svc.get_tokenizer(STUDENT))
    return run_sft(svc, lambda: svc.create_lora_training_client(STUDENT, rank=4), renderer, data, tmp_path / name, cfg)


def test_stalls_and_expired_results_in_training_cost_a_recovery_and_change_no_weight(wired, tmp_path):
    svc = service(result_timeout_s=BOUND)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    cfg = OptimConfig(learning_rate=5e-2, batch_size=2, save_every=2, warmup_ratio=0.0)
    clean = _sft(svc, tmp_path, "clean", data, cfg)
    clean_norms = list(wired.grad_norms)

    wired.fail("create_lora_training_client", STALL)  # the first client never comes: made again
    wired.fail("optim_step", None, None, STALL)  # step 3's result never comes; the step ran on the server
    wired.fail("forward_backward", None, None, None, None, Ran(expired()))  # a result that expired after it ran
    wired.fail("save_state", None, Ran(expired()))  # the state was written; its path never came back
    wired.calls.clear()
    t0 = time.perf_counter()
    faulty = _sft(svc, tmp_path, "faulty", data, cfg)
    took = time.perf_counter() - t0
    assert not any(wired.failures.values())  # every scripted failure happened
    assert took < 4 * BOUND + 10  # two stalls waited out once each, never a hang
    assert torch.equal(wired.states[clean.sampler]["delta"], wired.states[faulty.sampler]["delta"])
    resumed = [c for c in wired.calls if c[0] == "create_training_client_from_state_with_optimizer"]
    assert len(resumed) >= 2  # the stall and the expired results each sent the loop back to a save
    assert [r["step"] for r in faulty.metrics] == [1, 2, 3, 4]
    # grad_norm comes from the optimizer step's response (OptimStepResponse.metrics), one per step
    assert [r["grad_norm"] for r in clean.metrics] == clean_norms and all(n > 0 for n in clean_norms)
    rows = [json.loads(x) for x in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in rows] == clean_norms


def test_a_stalled_custom_loss_poisons_its_client_and_dpo_recovers_exactly(wired, tmp_path):
    """A custom-loss call given up on is cancelled, which poisons its client (the SDK's `on_done`): the loop
    must start a fresh one, not wait on the poisoned one."""
    svc = service(result_timeout_s=BOUND)
    renderer = Renderer(svc.get_tokenizer(STUDENT))
    data = write_jsonl(tmp_path / "dpo.jsonl", dpo_rows(6))
    cfg = OptimConfig(learning_rate=5e-2, batch_size=2, save_every=1, warmup_ratio=0.0)

    def dpo(name):
        return run_dpo(
            svc,
            lambda: svc.create_lora_training_client(STUDENT, rank=4, seed=0),
            lambda: svc.create_sampling_client(base_model=STUDENT),
            renderer,
            data,
            tmp_path / name,
            cfg,
            DPOCoefficients(),
        )

    clean = dpo("clean")
    wired.fail("forward_backward_custom", None, STALL)
    wired.fail("compute_logprobs", STALL)  # a reference log-prob request that never answers is made again
    faulty = dpo("faulty")
    assert wired.stalled and all(f.cancelled() for f in wired.stalled)
    assert torch.equal(wired.states[clean.sampler]["delta"], wired.states[faulty.sampler]["delta"])


def test_grad_norm_is_read_from_either_shape_of_optimizer_result():
    assert _grad_norm({"grad_norm": 1.5, "steps": 3}) == 1.5  # the local backend
    assert _grad_norm(types.OptimStepResponse(metrics={"grad_norm": 2.0})) == 2.0  # Tinker
    assert _grad_norm(types.OptimStepResponse(metrics={"optim/grad_norm:mean": 0.5})) == 0.5
    assert _grad_norm(types.OptimStepResponse(metrics=None)) is None and _grad_norm(None) is None


# -- LoRA alpha ----------------------------------------------------------------------------------------
def test_tinker_lora_alpha_is_recorded_and_a_different_one_warned_about(wired, tmp_path, caplog):
    svc = service()
    caplog.set_level(logging.WARNING, logger="character.backend.tinker")
    for same in (None, tb.TINKER_LORA_ALPHA):
        assert svc.create_lora_training_client(STUDENT, rank=8, alpha=same).lora_alpha == tb.TINKER_LORA_ALPHA
    assert not caplog.records
    svc.create_lora_training_client(STUDENT, rank=8, alpha=16)
    (warning,) = caplog.records
    msg = warning.getMessage()
    assert "alpha 16" in msg and f"alpha {tb.TINKER_LORA_ALPHA}" in msg and "Learning rates across backends" in msg
    assert "scale 4 at rank 8, not 2" in msg and "2 times" in msg  # 32/8 against 16/8

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(2))
    result = _sft(svc, tmp_path, "run", data, OptimConfig(batch_size=2, warmup_ratio=0.0))
    assert result.lora_alpha == tb.TINKER_LORA_ALPHA
    final = json.loads((tmp_path / "run" / "checkpoints.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["lora_alpha"] == tb.TINKER_LORA_ALPHA
    assert _sft(svc, tmp_path, "run", data, OptimConfig(batch_size=2)).lora_alpha == tb.TINKER_LORA_ALPHA  # rerun


# -- the SDK version the code needs -------------------------------------------------------------------
def test_the_installed_sdk_is_in_the_declared_range_and_has_what_the_code_uses():
    """`.result()` on client creation and `.future()` on sampling results exist only from 0.38 (the 0.30-0.36
    wheels raise AttributeError); the failure semantics relied on were read from 0.38's source."""
    import importlib.metadata
    import inspect
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version
    from tinker.lib.public_interfaces.api_future import APIFuture
    from tinker.lib.retryable_exception import RetryableException  # noqa: F401 - it exists

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "tinker"]
    installed = Version(importlib.metadata.version("tinker"))
    assert installed in req.specifier, (installed, req)
    floor = min(Version(s.version) for s in req.specifier if s.operator == ">=")
    assert floor >= Version("0.38")
    assert "timeout" in inspect.signature(APIFuture.result).parameters and hasattr(APIFuture, "future")
    for name in (
        "create_lora_training_client",
        "create_training_client_from_state",
        "create_training_client_from_state_with_optimizer",
        "create_sampling_client",
    ):
        returned = inspect.signature(getattr(tinker.ServiceClient, name)).return_annotation
        assert "Future" in str(returned), (name, returned)  # a future: `.result()` gives the client
    for name in ("sample", "compute_logprobs"):
        assert "APIFuture" in str(inspect.signature(getattr(tinker.SamplingClient, name)).return_annotation)
    assert "metrics" in types.OptimStepResponse.model_fields
    assert {"category", "request_id"} <= set(inspect.signature(tinker.RequestFailedError).parameters)


# -- the key, through Prefect, from a service that echoes it --------------------------------------------
def _stored_in_prefect(flow_run_ids) -> str:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read() -> str:
        async with get_client() as client:
            runs = [await client.read_flow_run(i) for i in flow_run_ids]
            logs = await client.read_logs()
            artifacts = await client.read_artifacts()
            tasks = await client.read_task_runs()
        assert logs and artifacts and all(r.parameters["config"]["backend"] == "tinker" for r in runs)
        return json.dumps(
            [[x.model_dump(mode="json") for x in group] for group in (runs, logs, artifacts, tasks)], default=str
        )

    return asyncio.run(read())


@pytest.mark.slow
def test_a_service_that_echoes_the_key_never_gets_it_shown_or_stored(
    prefect_harness, wired, tmp_path, monkeypatch, capfd
):
    """The sequential flow on Tinker (the fake) while a fifth of the training calls fail in every shape the SDK
    produces, stalls included, and every error quotes the key; then a build that fails fatally the same way.
    The key appears in no log line (DEBUG, every logger), no output, no Prefect record, no file."""
    import os

    from prefect.settings import get_current_settings

    from flows.sequential import sequential

    _ALLOW_LOOPBACK["on"] = True  # the test's Prefect server is on this machine
    monkeypatch.setenv("CHARACTER_TINKER_RESULT_TIMEOUT_S", "1")
    wired.echo_key = True
    wired.inject_faults(0.2, seed=3, stalls=True)
    echo = f"Error code: 503 - from key {KEY}"
    wired.fail("sample", http_error(tinker.InternalServerError, 503, echo), Ran(expired(echo)))
    # every shape at least once, each quoting the key, besides the random ones
    wired.fail(
        "forward_backward_custom",
        None,
        request_failed(types.RequestErrorCategory.Server, ECHO),
        Ran(expired(echo)),
        STALL,
    )
    wired.fail("optim_step", None, http_error(tinker.InternalServerError, 503, echo))
    wired.fail("save_state", Ran(expired(echo)))
    wired.fail("forward_backward", tinker.APIConnectionError(request=_REQ, message=f"Connection error: {ECHO}"), STALL)
    opt = {"learning_rate": 5e-2, "batch_size": 2, "save_every": 2, "warmup_ratio": 0.0, "max_recoveries": 50}
    cfg = tinker_build_config(tmp_path, "echo", opt, dpo_pairs=6, reflections=2)
    with kept_logs() as records:
        state = sequential(cfg, return_state=True)
        assert state.is_completed(), state.message
        wired.inject_faults(0.0)
        wired.fail("forward_backward_custom", fetch_error(tinker.AuthenticationError, 401, f"Error code: 401 - {ECHO}"))
        failed = sequential(cfg.model_copy(update={"build_id": "echo-fatal"}), return_state=True)
    assert not any(wired.failures.values()) and len(wired.stalled) >= 2  # every scripted fault happened
    assert failed.is_failed() and "TINKER_API_KEY" in failed.message and "\n" not in failed.message
    assert len(records) > 50 and not [r for r in records if KEY in r]
    out, err = capfd.readouterr()
    assert KEY not in out + err
    ids = [state.state_details.flow_run_id, failed.state_details.flow_run_id]
    assert KEY not in _stored_in_prefect(ids)
    db = get_current_settings().server.database.connection_url.get_secret_value().split("///")[-1]
    places = [Path(db), Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]), Path(cfg.workdir)]
    files = [p for place in places for p in ([place] if place.is_file() else place.rglob("*")) if p.is_file()]
    assert any(p.name == "record.json" for p in files) and any(p.suffix == ".db" for p in files)
    assert not [p for p in files if KEY.encode() in p.read_bytes()]
    assert os.environ["TINKER_API_KEY"] == KEY  # the key was there all along
