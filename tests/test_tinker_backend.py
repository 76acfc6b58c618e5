"""The Tinker backend at the SDK boundary: a fake SDK (tests/fake_tinker.py), never the network.

The fake has the SDK's method names and return types (tinker.types objects, futures with
.result()) and raises the SDK's own exception classes, built the way the SDK builds them. Its
"model" is a bigram table (logits = W0[prev] + delta[prev]) trained with AdamW on one server
thread that runs requests in submission order; sampling returns canned answers. Custom losses go
through the SDK's own client-side step (`TrainingClient._compute_custom_loss`), as on Tinker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import tinker
import torch
from fake_tinker import (  # noqa: F401 - fixtures are used by name
    _ALLOW_LOOPBACK,
    _REQ,
    KEY,
    STUDENT,
    TEACHER,
    datum,
    dpo_rows,
    expired,
    fake,
    fetch_error,
    http_error,
    no_network,
    poisoned,
    request_failed,
    service,
    sft_rows,
    tinker_build_config,
    tokenizer,
    wired,
    write_jsonl,
)
from safetensors.torch import load_file, save_file
from tinker import types

from character.backend import tinker as tb
from character.backend.errors import BackendFatalError, TransientBackendError, describe_fatal, is_transient
from character.build import checks
from character.build import stages as pipeline
from character.build.direct import run_sequential
from character.build.record import read_record
from character.build.stages import PipelineConfig
from character.errors import UserError
from character.settings import Settings
from character.train.dpo import run_dpo
from character.train.loop import OptimConfig
from character.train.losses import DPOCoefficients
from character.train.renderer import Renderer
from character.train.sft import run_sft
from character.weights.tinker_export import (
    UnsupportedAdapter,
    check_family,
    download_adapter,
    peft_name,
    tinker_name,
    tinker_to_peft,
)


def full_tokens(d: types.Datum) -> list[int]:
    return d.model_input.to_ints() + d.loss_fn_inputs["target_tokens"].tolist()[-1:]


# -- error classification -------------------------------------------------------------------------
TRANSIENT = {
    "connection": lambda: tinker.APIConnectionError(request=_REQ),
    "timeout": lambda: tinker.APITimeoutError(request=_REQ),
    "429": lambda: http_error(tinker.RateLimitError, 429),
    "500": lambda: http_error(tinker.InternalServerError, 500),
    "503": lambda: http_error(tinker.InternalServerError, 503),
    "409": lambda: http_error(tinker.ConflictError, 409),
    "failed-server": lambda: request_failed(types.RequestErrorCategory.Server),
    "failed-unknown": lambda: request_failed(types.RequestErrorCategory.Unknown),
    # what else the SDK lets reach .result(): an expired result (410), a bounded wait that ran out, a client
    # poisoned by a transient failure or by a request given up on (cancelled)
    "410-expired": expired,
    "result-timeout": lambda: TimeoutError("Timeout of 600 seconds reached"),
    "poisoned-by-503": lambda: poisoned(http_error(tinker.InternalServerError, 503)),
    "poisoned-by-410": lambda: poisoned(expired()),
    "poisoned-by-cancel": lambda: poisoned(asyncio.CancelledError()),
    "ours": lambda: TransientBackendError("a stalled service"),
}
FATAL = {
    "400": lambda: http_error(tinker.BadRequestError, 400),
    "401": lambda: http_error(tinker.AuthenticationError, 401),
    "402": lambda: http_error(tinker.BillingError, 402),
    "403": lambda: http_error(tinker.PermissionDeniedError, 403),
    "404": lambda: http_error(tinker.NotFoundError, 404),
    "422": lambda: http_error(tinker.UnprocessableEntityError, 422),
    "failed-user": lambda: request_failed(types.RequestErrorCategory.User),
    "ours": lambda: BackendFatalError("bad key"),
    # a 4xx answer while fetching a result reaches us as a ValueError raised from the HTTP error
    "fetch-401": lambda: fetch_error(tinker.AuthenticationError, 401),
    "fetch-403": lambda: fetch_error(tinker.PermissionDeniedError, 403),
    "fetch-404": lambda: fetch_error(tinker.NotFoundError, 404),
    "fetch-400-after-retries": lambda: fetch_error(tinker.BadRequestError, 400),
    "unreadable-answer": lambda: ValueError("Proto deserialization failed: bad bytes for self.request_id='r-1'"),
    "poisoned-by-401": lambda: poisoned(fetch_error(tinker.AuthenticationError, 401)),
    "poisoned-by-a-bug": lambda: poisoned(ValueError("bug in the loss")),
}


@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_transient_sdk_errors_are_retried(name):
    from tasks.stages import retry_if_transient

    exc = TRANSIENT[name]()
    assert is_transient(exc)
    assert retry_if_transient(None, None, SimpleNamespace(data=exc))  # the Prefect tasks' condition


@pytest.mark.parametrize("name", sorted(FATAL))
def test_fatal_sdk_errors_are_not_retried(name):
    from tasks.stages import retry_if_transient

    exc = FATAL[name]()
    assert not is_transient(exc)
    assert not retry_if_transient(None, None, SimpleNamespace(data=exc))


@pytest.mark.parametrize(
    "make,needles",
    [
        (lambda: http_error(tinker.AuthenticationError, 401), ["401", "TINKER_API_KEY"]),
        (lambda: http_error(tinker.BillingError, 402), ["402", "billing"]),
        (lambda: http_error(tinker.PermissionDeniedError, 403), ["403", "key"]),
        (
            lambda: http_error(tinker.NotFoundError, 404, "no such model"),
            ["404", "not served", "character tinker models"],
        ),
        (
            lambda: http_error(
                tinker.BadRequestError, 400, "Error code: 400 - {'detail': 'model foo/bar is not supported'}"
            ),
            ["not served", "foo/bar"],
        ),
        (
            lambda: http_error(tinker.UnprocessableEntityError, 422, "rank must be\npositive"),
            ["invalid", "rank must be positive"],
        ),
        (lambda: request_failed(types.RequestErrorCategory.User), ["its input", "boom"]),
        (lambda: fetch_error(tinker.AuthenticationError, 401), ["401", "TINKER_API_KEY"]),
        (lambda: fetch_error(tinker.NotFoundError, 404, "no such run"), ["404", "tinker://", "no such run"]),
        (lambda: poisoned(fetch_error(tinker.PermissionDeniedError, 403)), ["poisoned", "PermissionDeniedError"]),
    ],
)
def test_fatal_errors_read_as_one_line_naming_what_to_fix(make, needles):
    msg = describe_fatal(make(), "creating a LoRA training client")
    assert "\n" not in msg and "creating a LoRA training client" in msg
    for n in needles:
        assert n in msg, msg


# -- key and reachability ---------------------------------------------------------------------------
def test_missing_key_fails_at_once_without_touching_the_sdk(fake):
    svc = tb.TinkerService(Settings(), client_factory=fake.service_client, rest_factory=fake.rest_client)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="TINKER_API_KEY"):
        svc.create_lora_training_client(STUDENT, rank=4)
    assert time.perf_counter() - t0 < 1.0
    assert fake.calls == [] and fake.keys_seen == []
    cfg = PipelineConfig(persona="pirate", backend="tinker", base_model=STUDENT)
    with pytest.raises(UserError, match="TINKER_API_KEY"):
        checks.validate(cfg)


def test_validate_checks_the_key_and_model_names_without_network(monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    checks.validate(PipelineConfig(persona="pirate", backend="tinker", base_model=STUDENT, teacher_model=TEACHER))
    with pytest.raises(UserError, match="'tiny' is a local model"):
        checks.validate(PipelineConfig(persona="pirate", backend="tinker", base_model="tiny"))
    # tinker defaults replace the local 'tiny' default
    cfg = PipelineConfig.from_settings(Settings(), persona="pirate", backend="tinker")
    assert cfg.base_model == Settings().tinker_base_model and cfg.teacher_model == Settings().tinker_teacher_model
    assert PipelineConfig.from_settings(Settings(), persona="pirate").base_model == "tiny"


def test_key_from_a_prefect_secret_block(fake, monkeypatch):
    from prefect.blocks.system import Secret

    loaded = []

    def load(name, *a, **k):
        loaded.append(name)
        if name != "tinker-key":
            raise ValueError(f"Unable to find block document named {name} for block type secret")
        return SimpleNamespace(get=lambda: KEY)

    monkeypatch.setattr(Secret, "load", load)
    monkeypatch.setattr(tb, "_tcp_check", lambda url, timeout: None)
    monkeypatch.setenv("CHARACTER_TINKER_SECRET_BLOCK", "tinker-key")
    settings = Settings()
    checks.validate(PipelineConfig(persona="pirate", backend="tinker", base_model=STUDENT))  # no block read yet
    assert loaded == []
    assert tb.api_key_source(settings) == "Prefect Secret block 'tinker-key'"
    svc = tb.TinkerService(
        settings, base_url="https://tinker.invalid", client_factory=fake.service_client, rest_factory=fake.rest_client
    )
    svc.create_lora_training_client(STUDENT, rank=4)
    assert loaded == ["tinker-key"] and set(fake.keys_seen) == {KEY}
    assert KEY not in repr(svc)
    with pytest.raises(UserError, match="Prefect Secret block 'missing'"):
        tb.resolve_api_key(Settings(tinker_secret_block="missing"))


def test_pipeline_validate_refuses_tinker_without_any_key_source():
    with pytest.raises(UserError, match="CHARACTER_TINKER_SECRET_BLOCK"):
        checks.validate(PipelineConfig(persona="pirate", backend="tinker", base_model=STUDENT))


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_base_url_fails_within_the_bound(monkeypatch):
    """The real SDK factories, a closed local port: a clear error well inside the bound."""
    _ALLOW_LOOPBACK["on"] = True
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    monkeypatch.setenv("TINKER_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    svc = tb.TinkerService(Settings(), timeout_s=2.0)
    t0 = time.perf_counter()
    with pytest.raises(tb.TinkerUnreachable) as err:
        svc.create_sampling_client(base_model=STUDENT)
    assert time.perf_counter() - t0 < 3.0
    msg = str(err.value)
    assert "127.0.0.1" in msg and "TINKER_BASE_URL" in msg and KEY not in msg
    assert not is_transient(err.value)


def test_a_service_that_never_answers_fails_within_the_bound(wired):
    wired.hang_capabilities = True
    svc = service(timeout_s=1.0)
    t0 = time.perf_counter()
    with pytest.raises(tb.TinkerUnreachable, match="did not answer within 1 s"):
        svc.list_models()
    assert time.perf_counter() - t0 < 2.0


def test_a_rejected_key_is_fatal_and_the_message_never_shows_it(wired):
    wired.fail("get_server_capabilities", http_error(tinker.AuthenticationError, 401, f"bad key {KEY}"))
    with pytest.raises(BackendFatalError, match="TINKER_API_KEY") as err:
        service().create_lora_training_client(STUDENT, rank=4)
    assert KEY not in str(err.value) and not is_transient(err.value)
    assert err.value.__cause__ is None  # the server's text held the key: not chained into tracebacks


def test_a_model_tinker_does_not_serve_fails_before_any_work(wired):
    with pytest.raises(BackendFatalError, match="'no/such-model' is not served"):
        service().create_lora_training_client("no/such-model", rank=4)
    assert not any(c[0] == "create_lora_training_client" for c in wired.calls)


# -- training through the SDK boundary --------------------------------------------------------------
def _assert_submitted_before_waited(events: list[tuple], fb_op: str) -> int:
    """Each optim_step was submitted before anyone waited on the forward/backward it follows."""
    steps = 0
    for k, (kind, op, fid) in enumerate(events):
        if kind == "submit" and op == "optim_step":
            fb = max(i for i, e in enumerate(events[:k]) if e[0] == "submit" and e[1] == fb_op)
            fb_id = events[fb][2]
            waited = [i for i, e in enumerate(events) if e == ("wait", fb_op, fb_id)]
            assert waited and waited[0] > k, "forward_backward was awaited before optim_step was submitted"
            opt_waited = [i for i, e in enumerate(events) if e == ("wait", "optim_step", fid)]
            assert opt_waited and opt_waited[0] > k
            steps += 1
    return steps


def test_dpo_runs_on_tinker_with_reference_logprobs_on_the_policy_tokens(wired, tmp_path, tokenizer):
    svc = service()
    renderer = Renderer(svc.get_tokenizer(STUDENT))
    cfg = OptimConfig(learning_rate=5e-2, batch_size=2, save_every=2, warmup_ratio=0.0)
    result = run_dpo(
        svc,
        lambda: svc.create_lora_training_client(STUDENT, rank=4, seed=0, alpha=128),
        lambda: svc.create_sampling_client(base_model=STUDENT),
        renderer,
        write_jsonl(tmp_path / "dpo.jsonl", dpo_rows(4)),
        tmp_path / "dpo",
        cfg,
        DPOCoefficients(),
    )
    assert result.state.startswith("tinker://") and "/weights/" in result.state
    assert result.sampler.startswith("tinker://") and "/sampler_weights/" in result.sampler
    batches = [data for kind, data in wired.trained_on]
    assert {kind for kind, _ in wired.trained_on} == {"custom"} and len(batches) == 2
    policy = []
    for data in batches:
        for d in data:
            inp, tgt = d.model_input.to_ints(), d.loss_fn_inputs["target_tokens"].tolist()
            w = d.loss_fn_inputs["weights"].tolist()
            assert len(inp) == len(tgt) == len(w) and inp[1:] == tgt[:-1]  # targets shifted by one
            assert d.loss_fn_inputs["weights"].dtype == "float32" and set(w) <= {0.0, 1.0} and sum(w) > 0
            assert w[0] == 0.0  # the prompt is not trained
            policy.append(full_tokens(d))
    # the reference scored exactly the sequences the policy trains on, chat template included
    assert sorted(policy) == sorted(wired.logprob_requests)
    assert all(t[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") for t in policy)
    assert _assert_submitted_before_waited(wired.events, "forward_backward_custom") == 2
    assert {"dpo_loss", "reward_accuracy"} <= set(result.metrics[0])
    final = wired.states[result.sampler]["delta"]
    assert final.abs().sum() > 0
    assert ("create_lora_training_client", STUDENT, 4) in wired.calls


def test_sft_uses_the_built_in_loss_with_weights_normalized_per_batch(wired, tmp_path):
    svc = service()
    renderer = Renderer(svc.get_tokenizer(STUDENT))
    cfg = OptimConfig(learning_rate=5e-2, batch_size=3, save_every=10, warmup_ratio=0.0)
    result = run_sft(
        svc,
        lambda: svc.create_lora_training_client(STUDENT, rank=4),
        renderer,
        write_jsonl(tmp_path / "sft.jsonl", sft_rows(6)),
        tmp_path / "sft",
        cfg,
    )
    assert result.steps == 2
    assert [kind for kind, _ in wired.trained_on] == ["cross_entropy", "cross_entropy"]  # one pass each
    for _, data in wired.trained_on:
        total = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in data)
        assert total == pytest.approx(1.0, rel=1e-5)
        for d in data:
            inp, tgt = d.model_input.to_ints(), d.loss_fn_inputs["target_tokens"].tolist()
            assert inp[1:] == tgt[:-1]
    assert _assert_submitted_before_waited(wired.events, "forward_backward") == 2


class Crash(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_last_saved_state(wired, tmp_path):
    svc = service()
    renderer = Renderer(svc.get_tokenizer(STUDENT))
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    cfg = OptimConfig(learning_rate=5e-2, batch_size=2, save_every=1, warmup_ratio=0.0)
    start = lambda: svc.create_lora_training_client(STUDENT, rank=4)  # noqa: E731

    whole = run_sft(svc, start, renderer, data, tmp_path / "whole", cfg)

    def crash_after_two(step, total, row):
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        run_sft(svc, start, renderer, data, tmp_path / "broken", cfg, on_step=crash_after_two)
    saved = json.loads((tmp_path / "broken" / "checkpoints.jsonl").read_text().splitlines()[-1])["state"]
    wired.calls.clear()
    resumed = run_sft(svc, start, renderer, data, tmp_path / "broken", cfg)
    assert wired.calls[0] == ("create_training_client_from_state_with_optimizer", saved)
    assert not any(c[0] == "create_lora_training_client" for c in wired.calls)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    assert torch.equal(wired.states[whole.sampler]["delta"], wired.states[resumed.sampler]["delta"])


def test_transient_errors_are_recovered_then_surface_as_transient_and_fatal_ones_as_one_line(
    wired, tmp_path, monkeypatch
):
    import character.backend.retry as retry

    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)
    svc = service()
    renderer = Renderer(svc.get_tokenizer(STUDENT))
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(4))
    cfg = OptimConfig(learning_rate=5e-2, batch_size=2, save_every=1, warmup_ratio=0.0)
    start = lambda: svc.create_lora_training_client(STUDENT, rank=4)  # noqa: E731

    rate_limited = http_error(tinker.RateLimitError, 429)
    wired.fail("optim_step", None, rate_limited)  # the second step's, once: a fresh client redoes that step
    once = run_sft(svc, start, renderer, data, tmp_path / "once", cfg)
    assert once.steps == 2 and once.resumed_from == 0 and not wired.failures["optim_step"]
    assert [r["step"] for r in once.metrics] == [1, 2]

    bounded = cfg.model_copy(update={"max_recoveries": 2})
    wired.fail("optim_step", None, *[rate_limited] * 10)  # every attempt at the second step's
    with pytest.raises(TransientBackendError, match="RateLimitError 429") as err:
        run_sft(svc, start, renderer, data, tmp_path / "run", bounded)
    assert is_transient(err.value) and len(wired.failures["optim_step"]) == 7  # 1 try + 2 recoveries
    assert isinstance(err.value.__cause__, tinker.RateLimitError)  # chained for debugging
    wired.failures.clear()  # Prefect would retry the task, which resumes:
    result = run_sft(svc, start, renderer, data, tmp_path / "run", cfg)
    assert result.resumed_from == 1 and result.steps == 2

    wired.fail("forward_backward", http_error(tinker.AuthenticationError, 401, f"key {KEY} revoked"))
    with pytest.raises(BackendFatalError) as err:
        run_sft(svc, start, renderer, data, tmp_path / "other", cfg)
    assert not is_transient(err.value) and "TINKER_API_KEY" in str(err.value) and KEY not in str(err.value)
    assert err.value.__cause__ is None  # it quoted the key

    wired.fail("forward_backward", http_error(tinker.PermissionDeniedError, 403, "project mismatch"))
    with pytest.raises(BackendFatalError, match="403") as err:
        run_sft(svc, start, renderer, data, tmp_path / "third", cfg)
    assert isinstance(err.value.__cause__, tinker.PermissionDeniedError)  # chained for debugging


# -- the fake behaves like the SDK where recovery depends on it ------------------------------------------
FAKE_VS_SDK = {
    "FakeServiceClient": (
        tinker.ServiceClient,
        [
            "create_lora_training_client",
            "create_training_client_from_state",
            "create_training_client_from_state_with_optimizer",
            "create_sampling_client",
        ],
    ),
    "FakeTrainingClient": (
        tinker.TrainingClient,
        [
            "forward_backward",
            "forward_backward_custom",
            "optim_step",
            "save_state",
            "save_weights_for_sampler",
            "save_weights_external",
            "get_tokenizer",
        ],
    ),
    "FakeSamplingClient": (tinker.SamplingClient, ["sample", "compute_logprobs", "get_tokenizer", "get_base_model"]),
    "FakeRestClient": (
        tinker.RestClient,
        [
            "get_server_capabilities",
            "get_weights_info_by_tinker_path",
            "get_external_weights_urls",
            "delete_checkpoint_from_tinker_path",
        ],
    ),
}


@pytest.mark.parametrize("fake_name", sorted(FAKE_VS_SDK))
def test_fake_matches_the_sdk_signatures(fake_name):
    """An SDK upgrade that renames, adds or reorders a parameter we fake fails here, loudly."""
    import inspect

    import fake_tinker

    sdk_cls, methods = FAKE_VS_SDK[fake_name]
    for name in methods:
        ours = inspect.signature(getattr(getattr(fake_tinker, fake_name), name)).parameters.values()
        theirs = inspect.signature(getattr(sdk_cls, name)).parameters.values()
        shape = lambda ps: [
            (
                p.name,
                p.kind,
                p.default
                if p.default is None
                or isinstance(  # noqa: E731
                    p.default, (bool, int, str)
                )
                else "object",
            )
            for p in ps
        ]
        assert shape(ours) == shape(theirs), f"{fake_name}.{name} differs from tinker.{sdk_cls.__name__}.{name}"


def _loss(data, logprobs):
    return sum(-lp.sum() for lp in logprobs), {}


def test_a_failed_custom_loss_poisons_the_client_and_later_calls_fail_in_order(wired):
    svc = service()
    trainer = svc.create_lora_training_client(STUDENT, rank=4)
    wired.fail("forward_backward_custom", http_error(tinker.InternalServerError, 503))
    fb = trainer.forward_backward_custom([datum([1, 2, 3, 4])], _loss)
    opt = trainer.optim_step(types.AdamParams(learning_rate=0.1))  # submitted before the failure surfaces
    save = trainer.save_state("after")
    with pytest.raises(TransientBackendError, match="InternalServerError 503") as err:
        fb.result()
    assert isinstance(err.value.__cause__, tinker.InternalServerError)
    for later in (opt, save):
        with pytest.raises(TransientBackendError, match="poisoned.*InternalServerError") as err:
            later.result()
        sdk = err.value.__cause__  # the SDK's RuntimeError, chained to the failure that poisoned the client
        assert isinstance(sdk, RuntimeError) and isinstance(sdk.__cause__, tinker.InternalServerError)
        assert is_transient(err.value)  # it only wraps a transient cause
    assert not wired.states  # nothing was saved from the poisoned client
    # a fatal cause stays fatal through the wrapper
    wired.fail("forward_backward_custom", ValueError("bug in the loss"))
    other = svc.create_lora_training_client(STUDENT, rank=4)
    other.forward_backward_custom([datum([1, 2, 3])], _loss)
    with pytest.raises(BackendFatalError, match="poisoned.*bug in the loss") as err:
        other.optim_step(types.AdamParams(learning_rate=0.1)).result()
    assert not is_transient(err.value) and "\n" not in str(err.value)


def test_a_failed_forward_backward_does_not_stop_the_queued_optimizer_step(wired):
    """The case that makes a same-client retry wrong: the step already ran, on no gradients."""
    trainer = service().create_lora_training_client(STUDENT, rank=4)
    wired.fail("forward_backward", http_error(tinker.InternalServerError, 500))
    fb = trainer.forward_backward([datum([1, 2, 3])], "cross_entropy")
    opt = trainer.optim_step(types.AdamParams(learning_rate=0.1))
    with pytest.raises(TransientBackendError):
        fb.result()
    assert opt.result().metrics["grad_norm"] == 0.0 and trainer.sdk.steps == 1


def _final_delta(fake, cfg) -> torch.Tensor:
    final = read_record(cfg)["stages"]["sft"]
    return fake.states[final["sampler"]]["delta"]


@pytest.mark.slow
def test_a_fifth_of_training_calls_failing_on_the_fake_sdk_changes_no_weight(wired, tmp_path, monkeypatch):
    """DPO then SFT through the real loop with 20% of training calls failing in every shape the SDK lets reach
    `.result()` (after later calls were submitted; expired results and stalls after the request ran;
    custom-loss failures poison their client): same final weights, bit for bit."""
    opt = OptimConfig(learning_rate=5e-2, batch_size=2, save_every=2, warmup_ratio=0.0, max_recoveries=100)
    base = tinker_build_config(tmp_path, "clean", opt, dpo_pairs=16, reflections=10)
    run_sequential(base)
    clean = _final_delta(wired, base).clone()

    monkeypatch.setenv("CHARACTER_TINKER_RESULT_TIMEOUT_S", "1")  # a stall is given up after 1 s
    wired.inject_faults(0.2, seed=1, stalls=True)
    wired.events.clear()
    faulty = base.model_copy(update={"build_id": "faulty"})
    run_sequential(faulty)
    assert torch.equal(_final_delta(wired, faulty), clean)
    assert clean.abs().sum() > 0
    assert {"forward_backward", "forward_backward_custom", "optim_step", "save_state"} <= set(wired.injected), (
        wired.injected
    )
    kinds = {"RequestFailedError", "RetryableException", "InternalServerError", "APIConnectionError", "stall"}
    assert set(wired.injected_kinds) == kinds, wired.injected_kinds
    # failures that surfaced only after the optimizer step behind them was submitted
    order = {e: i for i, e in enumerate(wired.events)}
    late = [
        fid
        for op, fid in wired.injected_fids
        if op.startswith("forward_backward")
        and ("wait", op, fid) in order
        and ("submit", "optim_step", fid + 1) in order
        and order[("submit", "optim_step", fid + 1)] < order[("wait", op, fid)]
    ]
    assert late, wired.injected_fids
    # every step is recorded once, as in the clean build
    for stage in ("dpo", "sft"):
        rows = [json.loads(x)["step"] for x in (faulty.build_dir() / stage / "metrics.jsonl").read_text().splitlines()]
        ref = [json.loads(x)["step"] for x in (base.build_dir() / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows == ref, stage
    resumed = [c for c in wired.calls if c[0] == "create_training_client_from_state_with_optimizer"]
    assert resumed, "no recovery went through a saved state"


def test_remote_sampling_clients_have_the_local_interface(wired):
    """Base model, sampler and training checkpoints all sample and score like local clients (remote evaluation)."""
    import inspect

    from character.backend import SamplingClient
    from character.backend.local import LocalSamplingClient

    for name in ("sample", "compute_logprobs", "get_tokenizer"):
        want = list(inspect.signature(getattr(SamplingClient, name)).parameters)
        assert list(inspect.signature(getattr(tb.TinkerSamplingClient, name)).parameters) == want
        assert list(inspect.signature(getattr(LocalSamplingClient, name)).parameters) == want
    svc = service()
    trainer = svc.create_lora_training_client(STUDENT, rank=4)
    ckpts = [trainer.save_weights_for_sampler("s").result().path, trainer.save_state("w").result().path]
    clients = [svc.create_sampling_client(base_model=STUDENT)] + [
        svc.create_sampling_client(model_path=p) for p in ckpts
    ]
    tokens = [1, 2, 3, 4, 5]
    for client in clients:
        lps = client.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
        assert lps[0] is None and len(lps) == len(tokens) and all(x < 0 for x in lps[1:])
        out = client.sample(types.ModelInput.from_ints(tokens), 2, types.SamplingParams(max_tokens=64, seed=0))
        assert len(out.result().sequences) == 2 and client.get_tokenizer() is wired.tok
    assert [c for c in wired.calls if c[0] == "create_sampling_client"][-2:] == [
        ("create_sampling_client", p) for p in ckpts
    ]


def test_sampling_keeps_a_bounded_number_of_requests_in_flight(wired):
    wired.sample_delay = 0.01
    svc = service(max_in_flight=3)
    client = svc.create_sampling_client(base_model=TEACHER)
    prompt = types.ModelInput.from_ints([1, 2, 3])
    futures = [client.sample(prompt, 1, types.SamplingParams(max_tokens=32, seed=i)) for i in range(12)]
    futures += [client.compute_logprobs(prompt) for _ in range(4)]
    results = [f.result() for f in futures]
    assert len(results) == 16 and results[0].sequences[0].stop_reason == "stop"
    assert wired.max_outstanding == 3  # the bound was reached and never passed


# -- the pipeline's stages on Tinker ------------------------------------------------------------------
def test_sequential_and_paper_pipelines_run_on_tinker_and_never_show_the_key(wired, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    wired.fail("sample", http_error(tinker.InternalServerError, 503))  # datagen resubmits that one request
    opt = OptimConfig(learning_rate=5e-2, batch_size=2, save_every=1, warmup_ratio=0.0)
    cfg = tinker_build_config(tmp_path, "tinker-seq", opt, dpo_pairs=4, reflections=2)
    assert isinstance(pipeline._service(cfg), tb.TinkerService)
    out = run_sequential(cfg)
    for ck in out.values():
        assert ck.state.startswith("tinker://") and ck.sampler.startswith("tinker://")
    assert wired.failures["sample"] == []  # the failed request was resubmitted
    stages = read_record(cfg)["stages"]
    assert {"dpo_data", "dpo", "introspection", "sft"} <= set(stages)
    assert stages["dpo_data"]["rows"] > 0 and stages["introspection"]["rows"] > 0
    assert stages["dpo"]["lora_alpha"] == stages["sft"]["lora_alpha"] == tb.TINKER_LORA_ALPHA  # what Tinker used
    # sequential SFT continues from the DPO state with a fresh optimizer
    assert ("create_training_client_from_state", out["dpo"].state) in wired.calls
    assert ("create_sampling_client", out["dpo"].sampler) in wired.calls

    # the same build again redoes nothing: tinker:// outputs are trusted from the record
    before = len(wired.calls)
    assert run_sequential(cfg) == out
    assert not any(c[0].startswith("create_") for c in wired.calls[before:])

    # paper mode: SFT starts from the base model, independently of DPO
    paper = cfg.model_copy(update={"mode": "paper", "build_id": "tinker-paper"})
    intro = stages["introspection"]["path"]
    wired.calls.clear()
    sft = pipeline.stage_sft(paper, intro, None)
    trainers = [c for c in wired.calls if c[0].startswith("create_") and "training" in c[0]]
    assert trainers == [("create_lora_training_client", STUDENT, 4)] and sft.sampler.startswith("tinker://")

    assert KEY not in caplog.text
    for f in Path(cfg.workdir).rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    assert KEY not in json.dumps(cfg.model_dump(mode="json"))


def test_teacher_and_judge_candidates_are_read_from_model_names():
    from types import SimpleNamespace

    from character.backend.tinker import model_roles, model_size_b

    student = "meta-llama/Llama-3.1-8B-Instruct"
    roles = lambda name, sampleable=True: model_roles(
        SimpleNamespace(model_name=name, sampleable=sampleable),  # noqa
        student,
    )
    assert (
        model_size_b("Qwen/Qwen3-235B-A22B-Instruct-2507") == 235
        and model_size_b("x/Mystery-Model") is None
        and model_size_b("moonshotai/Kimi-K2.6") == 1000
    )
    assert roles(Settings().tinker_teacher_model) == ["teacher", "judge"]  # the documented default qualifies
    assert roles("meta-llama/Llama-3.3-70B-Instruct") == ["teacher", "judge"]
    assert roles("Qwen/Qwen3-30B-A3B") == ["judge"]  # under 4x an 8B student
    assert roles("meta-llama/Llama-3.1-70B") == [] and roles("Qwen/Qwen3-8B-Base") == []  # base models
    assert roles("openai/gpt-oss-120b", sampleable=False) == [] and roles(student) == []
    # big enough for both roles, but refused by the renderers (character.train.families): never offered
    assert roles("deepseek-ai/DeepSeek-V3.1") == roles("moonshotai/Kimi-K2.6") == roles("openai/gpt-oss-120b") == []


def test_cli_lists_tinker_models(wired, capsys, monkeypatch):
    from character import cli

    monkeypatch.setattr(sys, "argv", ["character", "tinker", "models"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert STUDENT in out and TEACHER in out and KEY not in out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows[TEACHER].rstrip().endswith("teacher, judge") and rows[STUDENT].rstrip().endswith("-")
    monkeypatch.delenv("TINKER_API_KEY")
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "TINKER_API_KEY" in err[0]


# -- checkpoints: Tinker -> PEFT ---------------------------------------------------------------------
R, ALPHA = 4, 32


def crafted_tinker_adapter(layers: int, hidden: int, inter: int, vocab: int, unembed: bool = True):
    """Tinker-named LoRA tensors with distinct values (A: r x in, B: out x r)."""
    g = torch.Generator().manual_seed(7)
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden // 2, hidden),
        "self_attn.v_proj": (hidden // 2, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    out = {}
    for i in range(layers):
        for mod, (o, n) in shapes.items():
            out[f"base_model.model.model.layers.{i}.{mod}.lora_A.weight"] = torch.randn(R, n, generator=g)
            out[f"base_model.model.model.layers.{i}.{mod}.lora_B.weight"] = torch.randn(o, R, generator=g)
    if unembed:
        out["base_model.model.model.unembed_tokens.lora_A.weight"] = torch.randn(R, hidden, generator=g)
        out["base_model.model.model.unembed_tokens.lora_B.weight"] = torch.randn(vocab, R, generator=g)
    return out


def write_tinker_adapter(folder: Path, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": ALPHA}))
    return folder


def test_tensor_names_round_trip_through_the_table():
    tensors = crafted_tinker_adapter(3, 16, 32, 64)
    renamed = {peft_name(k): k for k in tensors}
    assert len(renamed) == len(tensors)
    assert all(tinker_name(p) == k for p, k in renamed.items())
    assert "base_model.model.lm_head.lora_B.weight" in renamed
    assert "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight" in renamed
    with pytest.raises(UnsupportedAdapter, match="mixture-of-experts"):
        peft_name("base_model.model.model.layers.0.mlp.experts.w1.lora_A.weight")
    with pytest.raises(UnsupportedAdapter, match="dense Llama"):
        peft_name("base_model.model.model.layers.0.linear_attn.in_proj_qkv.lora_A.weight")
    with pytest.raises(UnsupportedAdapter):
        tinker_name("base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight")


def _cookbook_peft_name(tinker_key: str) -> str:
    """An independent reference for the renaming: the procedure of tinker-cookbook's adapter conversion,
    restated (thinking-machines-lab/tinker-cookbook, tinker_cookbook/weights/_adapter.py at commit
    125e52e40a9c41a993ed266088a75088127438a6: `_convert_adapter` and `_add_peft_weight`; name remaps from
    tinker_cookbook/weights/_merge_utils.py at 0234e66ca693b8b3663c36077afa89d1362cec91: `build_name_remaps`).
    For a dense text model (no language_model level, no extra or expert remaps) the cookbook: takes the
    weight name by dropping the `.lora_A`/`.lora_B` part; replaces `base_model.model.` by nothing, then
    `model.unembed_tokens` by `lm_head` (plain substring replacements, in that order); and writes the pair
    under `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, <module> being the name less `.weight`.
    Its adapter_config takes r and lora_alpha from Tinker's config and lists the sorted leaf module names."""
    half = "A" if ".lora_A." in tinker_key else "B"
    weight = tinker_key.replace(f".lora_{half}", "")
    for old, new in (("base_model.model.", ""), ("model.unembed_tokens", "lm_head")):
        weight = weight.replace(old, new)
    return f"base_model.model.{weight.removesuffix('.weight')}.lora_{half}.weight"


def test_tensor_names_agree_with_tinker_cookbook(tmp_path):
    crafted = crafted_tinker_adapter(3, 16, 32, 64)
    expected = {_cookbook_peft_name(k): v for k, v in crafted.items()}
    assert "base_model.model.lm_head.lora_A.weight" in expected  # the reference is not a copy of ours
    assert all(peft_name(k) == _cookbook_peft_name(k) for k in crafted)
    out = tinker_to_peft(
        write_tinker_adapter(tmp_path / "tinker", crafted), tmp_path / "peft", "meta-llama/Llama-3.1-8B-Instruct"
    )
    saved = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    cfg = json.loads((out / "adapter_config.json").read_text())
    leaves = sorted({k.removesuffix(".lora_A.weight").rsplit(".", 1)[-1] for k in expected if ".lora_A." in k})
    assert cfg["target_modules"] == leaves and (cfg["r"], cfg["lora_alpha"]) == (R, ALPHA)
    assert (cfg["peft_type"], cfg["task_type"], cfg["bias"]) == ("LORA", "CAUSAL_LM", "none")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_converted_adapter_loads_in_peft_with_the_same_update(tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    hidden, inter, vocab, layers = 16, 32, 64, 2
    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**kw) if family == "llama" else Qwen2Config(**kw)
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    crafted = crafted_tinker_adapter(layers, hidden, inter, vocab)
    out = tinker_to_peft(write_tinker_adapter(tmp_path / "tinker", crafted), tmp_path / "peft", str(base_dir))

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA and cfg["peft_type"] == "LORA"
    assert cfg["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )
    saved = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(saved[peft_name(k)], v) for k, v in crafted.items())

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, out).merge_and_unload().state_dict()
    scale = ALPHA / R
    for key in ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]:
        module = key.removesuffix(".weight")
        t = "model.unembed_tokens" if module == "lm_head" else module
        a = crafted[f"base_model.model.{t}.lora_A.weight"]
        b = crafted[f"base_model.model.{t}.lora_B.weight"]
        torch.testing.assert_close(merged[key] - before[key], scale * b @ a, rtol=1e-4, atol=1e-5)


def test_unsupported_families_are_refused_clearly(tmp_path):
    for ok in [
        "meta-llama/Llama-3.1-8B-Instruct",
        "Qwen/Qwen3-8B",
        "Qwen/Qwen3-32B",
        "meta-llama/Llama-3.3-70B-Instruct",
    ]:
        check_family(ok)
    for bad, why in [
        ("Qwen/Qwen3-30B-A3B-Instruct-2507", "mixture-of-experts"),
        ("Qwen/Qwen3-VL-30B-A3B-Instruct", "mixture-of-experts"),
        ("openai/gpt-oss-120b", "not mapped"),
        ("deepseek-ai/DeepSeek-V3.1", "not mapped"),
        ("mistralai/Mistral-7B", "not supported"),
    ]:
        with pytest.raises(UnsupportedAdapter, match=why) as err:
            check_family(bad)
        assert "dense Llama" in str(err.value)
    moe = crafted_tinker_adapter(1, 8, 16, 32, unembed=False)
    moe["base_model.model.model.layers.0.mlp.experts.w1.lora_A.weight"] = torch.zeros(2, R, 8)
    with pytest.raises(UnsupportedAdapter, match="mixture-of-experts"):
        tinker_to_peft(write_tinker_adapter(tmp_path / "moe", moe), tmp_path / "out", "Qwen/Qwen3-8B")
    assert not (tmp_path / "out").exists()


def test_download_exports_a_training_state_and_converts_it(wired, tmp_path):
    svc = service()
    trainer = svc.create_lora_training_client(STUDENT, rank=4)
    state = trainer.save_state("final").result().path
    wired.export_tensors = crafted_tinker_adapter(2, 8, 16, 32)
    dst = download_adapter(svc, state, tmp_path / "adapter")
    cfg = json.loads((dst / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "meta-llama/Llama-3.1-8B-Instruct" and cfg["r"] == R
    got = load_file(dst / "adapter_model.safetensors")
    assert got.keys() == {peft_name(k) for k in wired.export_tensors}
    names = [c[0] for c in wired.calls]
    assert (
        names.index("create_training_client_from_state")
        < names.index("get_external_weights_urls")
        < names.index("delete_checkpoint_from_tinker_path")
    )  # the temporary export is cleaned up
    sampler = trainer.save_weights_for_sampler("s").result().path
    with pytest.raises(UserError, match="sampler checkpoints cannot be downloaded"):
        download_adapter(svc, sampler, tmp_path / "no")


def test_the_core_imports_without_prefect():
    code = (
        "import sys; import character.backend.tinker, character.weights.tinker_export, "
        "character.backend.errors; assert 'prefect' not in sys.modules, 'prefect imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TINKER_API_KEY": ""},
    )
    assert proc.returncode == 0, proc.stderr


def test_tiny_on_a_loopback_tinker_keeps_its_defaults_with_the_learning_rate_carried_over():
    """`--backend tinker --base-model tiny` (a loopback service): tiny's own defaults, with each learning rate
    multiplied by local scale / Tinker scale (2 / (32 / rank)), the README's rule; real models keep the paper's."""
    from character.backend.tinker import TINKER_LORA_ALPHA
    from character.config import TINKER_LORA_ALPHA as CONFIG_ALPHA
    from character.config import TINY_DEFAULTS

    assert CONFIG_ALPHA == TINKER_LORA_ALPHA
    local = PipelineConfig(persona="pirate", base_model="tiny")
    remote = PipelineConfig(persona="pirate", backend="tinker", base_model="tiny")
    rank = TINY_DEFAULTS["lora_rank"]
    assert remote.lora_rank == local.lora_rank == rank and remote.max_new_tokens == local.max_new_tokens == 96
    for stage in ("dpo", "sft"):
        want = getattr(local, stage).learning_rate * 2 / (TINKER_LORA_ALPHA / rank)
        assert getattr(remote, stage).learning_rate == pytest.approx(want)
        assert getattr(remote, stage).epochs == getattr(local, stage).epochs
    assert PipelineConfig(persona="pirate", backend="tinker", base_model=STUDENT).dpo.learning_rate == 5e-5
    given = PipelineConfig(persona="pirate", backend="tinker", base_model="tiny", dpo={"learning_rate": 0.01})
    assert given.dpo.learning_rate == 0.01  # an explicit value wins
