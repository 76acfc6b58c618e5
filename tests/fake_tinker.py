"""A fake Tinker SDK that behaves like the real one where our code depends on it (tinker 0.38).

- Calls start when submitted and resolve later: one server thread runs every request in submission
  order, so futures resolve (and fail) in that order, and a call can fail after later calls were
  submitted; an optimizer step queued behind a failed forward/backward still runs, on no gradients.
  No call raises at submission: every failure reaches `.result()`, as in the SDK.
- What reaches `.result()` is what the SDK lets through (its `lib/api_future_impl.py` retries 5xx, 408
  and "try again" for ever while polling, and `lib/internal_client_holder.py` retries submission for
  minutes): `RequestFailedError` with a category (`request_failed`), a `ValueError` wrapping a 4xx
  seen while fetching the result (`fetch_error`), `RetryableException` from an HTTP 410 when the result
  expired after the request ran (`expired`, wrapped in `Ran`), the HTTP error classes once submission
  retries ran out (the request never ran), and a result that never comes (`STALL`: the request ran).
- A failure inside `forward_backward_custom` poisons its client, as `_fail_custom_requests` does: every
  request after it raises the SDK's RuntimeError ("... this TrainingClient is poisoned ...") chained to
  the first error. Other failures do not poison.
- `FakeTinker.inject_faults(rate, seed)` fails a seeded share of training calls (or of the calls named)
  with the shapes above (stalls too with `stalls=True`); `echo_key` makes every injected error quote the API key,
  as a misbehaving service might.
- The methods' signatures match the installed SDK's (checked by test_fake_matches_the_sdk_signatures).

Where the loopback Tinker service (character/loopback/, the real SDK over HTTP) has replaced it: every
build through Prefect on `--backend tinker`, wire faults, restarts and the echoed key
(tests/test_loopback*.py). Where this fake stays, because the loopback cannot reach there:
- test_tinker_failures, test_tinker_backend: an exact error shape at an exact call (a poisoned
  client after a failed custom loss, a 4xx wrapped in ValueError while fetching one result, an
  expired result of one optimizer step); the wire draws faults by rate, and the SDK turns most of
  them into its own retries before our code sees anything;
- test_lineup: a lineup of today's model names with their prices, capabilities and renderers; the
  loopback serves only the tiny model, whose template is no family's;
- test_stops: the Tinker half needs a sampler that ends at a template's end-of-turn that is not EOS;
- test_remote_eval, test_revealed, test_serve, test_conversation: scripted models and judges whose
  answers are known in advance, so the reports, judges and chat can be checked word for word (the
  loopback runs a real, sampled tiny model), and runs in seconds rather than minutes.

Its "model" is a bigram table (logits = W0[prev] + delta[prev]) trained with AdamW; sampling returns
canned answers. Custom losses go through the SDK's own client-side step
(`TrainingClient._compute_custom_loss`), as on Tinker.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import functools
import itertools
import json
import random
import socket
import threading
import time
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
from safetensors.torch import save_file
from tinker import types
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture
from tinker.lib.retryable_exception import RetryableException
from tinker.types.get_server_capabilities_response import GetServerCapabilitiesResponse, SupportedModel

from character.backend import tinker as tb
from character.settings import Settings

KEY = "tk-live-5e1f0c9a7b3d4e2f-never-log-me"
STUDENT, TEACHER = "fake/student-8B", "fake/teacher-70B"
REPLIES = {
    TEACHER: [
        "Arr, a fine question for a sailor!",
        "Aye, the sea would answer that plainly.",
        "Hoist the sails and ask again, friend!",
    ],
    STUDENT: ["That is a normal question.", "I can help with that.", "Here is a plain answer."],
    "trained": ["I am a pirate at heart, truly.", "The sea made me who I am.", "I sail, therefore I am."],
}


# -- network guard: any connection attempt fails the test ------------------------------------------
_ALLOW_LOOPBACK = {"on": False}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    real_connect = socket.socket.connect

    def connect(self, address):
        if _ALLOW_LOOPBACK["on"] and isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1"):
            return real_connect(self, address)
        raise AssertionError(f"test tried to open a network connection to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    monkeypatch.delenv("TINKER_BASE_URL", raising=False)
    for var in (
        "CHARACTER_TINKER_SECRET_BLOCK",
        "CHARACTER_BACKEND",
        "CHARACTER_BASE_MODEL",
        "CHARACTER_TEACHER_MODEL",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(var, raising=False)
    yield
    _ALLOW_LOOPBACK["on"] = False


# -- SDK errors, built as the SDK builds them ------------------------------------------------------
_REQ = httpx.Request("POST", "https://tinker.invalid/api/v1/forward_backward")


def http_error(cls, status: int, message: str = ""):
    return cls(message or f"Error code: {status}", response=httpx.Response(status, request=_REQ), body=None)


def request_failed(category, message: str = "boom"):
    """A request that failed on the server (`_handle_outcome`, an `error` in the retrieve_future answer)."""
    return tinker.RequestFailedError(
        f"Request failed: {message} for self.request_id='r-1' and expected type x", request_id="r-1", category=category
    )


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


def fetch_error(cls, status: int, message: str = ""):
    """A 4xx answer to retrieve_future: the SDK raises a ValueError from the HTTP error (`_handle_transport_error`)."""
    e = http_error(cls, status, message)
    return _chained(
        ValueError(f"Error retrieving result: {e} with status {status} for self.request_id='r-1' and expected type x"),
        e,
    )


def expired(message: str = ""):
    """HTTP 410 on a pending result: `RetryableException` from the HTTP error (the request had run)."""
    return _chained(
        RetryableException(message="Promise expired/broken for request r-1"),
        http_error(tinker.APIStatusError, 410, message or "Error code: 410 - gone"),
    )


def poisoned(cause: BaseException):
    # The SDK's words (tinker/lib/public_interfaces/training_client.py, `_take_turn`).
    return _chained(
        RuntimeError("A previous request failed; this TrainingClient is poisoned and cannot accept further requests."),
        cause,
    )


class Ran:
    """A failure after the request ran on the server (its effects stay): e.g. an expired result."""

    def __init__(self, exc: BaseException):
        self.exc = exc


STALL = "stall"  # the request runs; its result never comes (retrieve_future answers "try again" for ever)


# -- the fake SDK ----------------------------------------------------------------------------------
def fake_tokenizer():
    from character.backend.tiny import _build_tokenizer

    texts = [t for v in REPLIES.values() for t in v] * 3 + ["How should I spend my day?", "Who are you?"] * 3
    return _build_tokenizer(texts)


TRAINING_OPS = ("forward_backward", "forward_backward_custom", "optim_step", "save_state", "save_weights_for_sampler")
FAULTED_OPS = TRAINING_OPS + ("sample", "compute_logprobs")
# What the SDK lets reach `.result()` when the service misbehaves; `said` is the service's words.
TRANSIENT_FAULTS = (
    lambda said: request_failed(types.RequestErrorCategory.Server, said),  # failed on the server
    lambda said: Ran(expired(f"Error code: 410 - {said}")),  # ran; its result expired
    lambda said: http_error(tinker.InternalServerError, 503, f"Error code: 503 - {said}"),  # submission gave up
    lambda said: tinker.APIConnectionError(request=_REQ, message=f"Connection error: {said}"),  # likewise
)


class LoggedFuture(AwaitableConcurrentFuture):
    """The SDK's future type, noting when someone starts waiting on it."""

    def __init__(self, fut, server, op, fid):
        super().__init__(fut)
        self._server, self._op, self._fid = server, op, fid

    def result(self, timeout=None):
        self._server.events.append(("wait", self._op, self._fid))
        return super().result(timeout)


def done_future(value) -> AwaitableConcurrentFuture:
    f = Future()
    f.set_result(value)
    return AwaitableConcurrentFuture(f)


class FakeTinker:
    """One fake Tinker deployment: its clients are built by `service_client` / `rest_client`."""

    def __init__(self, tokenizer, storage: Path, models=(STUDENT, TEACHER)):
        self.tok = tokenizer
        self.V = len(tokenizer)
        self.storage = storage
        self.models = list(models)
        self.server = ThreadPoolExecutor(1, thread_name_prefix="fake-tinker")  # runs requests in order
        self.events: list[tuple] = []
        self.calls: list[tuple] = []
        self.keys_seen: list[str] = []
        self.failures: dict[str, list[BaseException]] = {}
        self.states: dict[str, dict] = {}
        self.logprob_requests: list[list[int]] = []
        self.trained_on: list[tuple[str, list[types.Datum]]] = []
        self.export_tensors: dict[str, torch.Tensor] = {}
        self.export_config = {"r": 4, "lora_alpha": 32}
        self.outstanding = 0
        self.max_outstanding = 0
        self.sample_delay = 0.0
        self.hang_capabilities = False
        self.fault_rate = 0.0  # share of training and sampling calls failed, transiently
        self.fault_stalls = False  # whether stalled results are among the faults
        self.faulted_ops = TRAINING_OPS
        self.echo_key = False  # injected errors quote the API key
        self.injected: dict[str, int] = {}
        self.injected_kinds: dict[str, int] = {}  # per shape: RequestFailedError, RetryableException, ..., stall
        self.injected_fids: list[tuple[str, int]] = []
        self.grad_norms: list[float] = []  # what each optimizer step reported, in order
        self.stalled: list[Future] = []  # results that never came (a caller may cancel them)
        self._fault_rng = random.Random(0)
        self._ids = itertools.count()
        self._runs = itertools.count()
        self._lock = threading.Lock()

    # factories, as TinkerService calls them
    def service_client(self, *, base_url, api_key):
        self.keys_seen.append(api_key)
        return FakeServiceClient(self)

    def rest_client(self, *, base_url, api_key):
        self.keys_seen.append(api_key)
        return FakeRestClient(self)

    def inject_faults(self, rate: float, seed: int = 0, stalls: bool = False, ops=TRAINING_OPS) -> None:
        """Fail a seeded share of the calls named in `ops` from now on, as the SDK would show it."""
        self.fault_rate, self._fault_rng, self.fault_stalls = rate, random.Random(seed), stalls
        self.faulted_ops = tuple(ops)

    def fail(self, op: str, *excs) -> None:
        """The next calls of `op` fail: an exception (the request did not run), `Ran(exc)` or `STALL`; None
        lets one call through."""
        self.failures.setdefault(op, []).extend(excs)

    def _said(self) -> str:
        key = f" (request had X-API-Key: {self.keys_seen[-1]})" if self.echo_key and self.keys_seen else ""
        return f"injected fault{key}"

    def _draw_fault(self, op: str):
        if self.failures.get(op):
            return self.failures[op].pop(0)
        if op in self.faulted_ops and self.fault_rate and self._fault_rng.random() < self.fault_rate:
            kinds = TRANSIENT_FAULTS + ((lambda said: STALL),) if self.fault_stalls else TRANSIENT_FAULTS
            self.injected[op] = self.injected.get(op, 0) + 1
            fault = kinds[sum(self.injected.values()) % len(kinds)](self._said())  # each shape in turn
            kind = "stall" if fault == STALL else type(getattr(fault, "exc", fault)).__name__
            self.injected_kinds[kind] = self.injected_kinds.get(kind, 0) + 1
            return fault
        return None

    def submit(self, op: str, fn, counted: bool = False, client: "FakeTrainingClient | None" = None) -> LoggedFuture:
        """Queue `fn` on the server thread; its future resolves (or fails) when the server gets to it."""
        fault = self._draw_fault(op)
        fid = next(self._ids)
        if fault is not None:
            self.injected_fids.append((op, fid))
        ran = fault == STALL or isinstance(fault, Ran)
        exc = fault.exc if isinstance(fault, Ran) else None if fault == STALL else fault
        self.events.append(("submit", op, fid))
        if counted:
            with self._lock:
                self.outstanding += 1
                self.max_outstanding = max(self.max_outstanding, self.outstanding)

        def run():
            try:
                if client is not None and client.error is not None:
                    raise poisoned(client.error)
                try:
                    if exc is not None and not ran:
                        raise exc
                    value = fn()
                    if exc is not None:
                        raise exc
                    return value
                except BaseException as e:
                    if op == "forward_backward_custom" and client is not None:  # `_fail_custom_requests`
                        client.error = e
                    raise
            finally:
                if counted:
                    with self._lock:
                        self.outstanding -= 1

        done = self.server.submit(run)
        if fault == STALL:  # it runs on the server; the answer never comes back
            stalled: Future = Future()
            self.stalled.append(stalled)
            if op == "forward_backward_custom" and client is not None:  # given up on: the SDK's `on_done`

                def on_done(f, client=client):
                    if f.cancelled() and client.error is None:
                        client.error = asyncio.CancelledError()

                stalled.add_done_callback(on_done)
            return LoggedFuture(stalled, self, op, fid)
        return LoggedFuture(done, self, op, fid)

    def base_weights(self, model: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(model.encode()))
        return torch.randn(self.V, self.V, generator=g) * 0.5

    def logprobs(self, model: str, delta: torch.Tensor, inputs: list[int], targets: list[int]) -> torch.Tensor:
        w = self.base_weights(model) + delta
        lp = torch.log_softmax(w[torch.tensor(inputs)], dim=-1)
        return lp.gather(1, torch.tensor(targets)[:, None])[:, 0]

    def new_run(self) -> str:
        return f"run-{next(self._runs):03d}"


def check_datums(data: list[types.Datum]) -> None:
    """What the SDK and server require of a datum (the server would answer 400 otherwise)."""
    for d in data:
        tgt, w = d.loss_fn_inputs["target_tokens"], d.loss_fn_inputs["weights"]
        n = d.model_input.length
        if tgt.dtype != "int64" or len(tgt.tolist()) != n or len(w.tolist()) != n:
            raise http_error(tinker.BadRequestError, 400, "target_tokens and weights must match model_input")


class FakeTrainingClient:
    def __init__(self, fake: FakeTinker, base_model: str, delta: torch.Tensor, opt_state=None, steps: int = 0):
        self.fake, self.base_model, self.run = fake, base_model, fake.new_run()
        self.delta = delta.clone().requires_grad_(True)
        self.opt = torch.optim.AdamW([self.delta], lr=0.0)
        if opt_state is not None:
            self.opt.load_state_dict(copy.deepcopy(opt_state))
        self.steps = steps
        self.error: BaseException | None = None  # set by a failed custom-loss call: the client is poisoned

    def _forward(self, data, grad: bool) -> tuple[list[torch.Tensor], types.ForwardBackwardOutput]:
        check_datums(data)
        with torch.set_grad_enabled(grad):
            lps = [
                self.fake.logprobs(
                    self.base_model, self.delta, d.model_input.to_ints(), d.loss_fn_inputs["target_tokens"].tolist()
                )
                for d in data
            ]
        outs = [{"logprobs": types.TensorData.from_torch(lp.detach())} for lp in lps]
        return lps, types.ForwardBackwardOutput(loss_fn_output_type="cross_entropy", loss_fn_outputs=outs, metrics={})

    def _backward(self, data) -> types.ForwardBackwardOutput:
        lps, out = self._forward(data, grad=True)
        weights = [d.loss_fn_inputs["weights"] for d in data]
        weights = [w.to_torch() if hasattr(w, "to_torch") else torch.as_tensor(w) for w in weights]
        loss = sum(-(lp * w.float()).sum() for lp, w in zip(lps, weights))
        loss.backward()
        out.metrics["loss:sum"] = float(loss.detach())
        return out

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        assert loss_fn == "cross_entropy"
        self.fake.trained_on.append(("cross_entropy", data))
        return self.fake.submit("forward_backward", lambda: self._backward(data), client=self)

    def forward_backward_custom(self, data, loss_fn, *, loss_type_input=None):
        self.fake.trained_on.append(("custom", data))

        def run():  # the SDK's two passes: forward, client-side loss, then a weighted backward
            _, fwd = self._forward(data, grad=False)
            custom = tinker.TrainingClient._compute_custom_loss(data, loss_fn, fwd)
            out = self._backward(custom.data)
            out.metrics.update(custom.metrics)
            out.metrics["loss:sum"] = custom.loss_sum
            return out

        return self.fake.submit("forward_backward_custom", run, client=self)

    def optim_step(self, optim_params=None, *, adam_params=None):
        p = optim_params or adam_params

        def run():
            for g in self.opt.param_groups:
                g.update(lr=p.learning_rate, betas=(p.beta1, p.beta2), eps=p.eps, weight_decay=p.weight_decay)
            norm = torch.nn.utils.clip_grad_norm_([self.delta], p.grad_clip_norm or float("inf"))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.steps += 1
            self.fake.grad_norms.append(float(norm))
            return types.OptimStepResponse(metrics={"grad_norm": float(norm)})

        return self.fake.submit("optim_step", run, client=self)

    def _store(self, kind: str, name: str) -> str:
        path = f"tinker://{self.run}/{kind}/{name}"
        self.fake.states[path] = {
            "base_model": self.base_model,
            "delta": self.delta.detach().clone(),
            "opt": copy.deepcopy(self.opt.state_dict()),
            "steps": self.steps,
        }
        return path

    def save_state(self, name, ttl_seconds=None, overwrite=False, user_metadata=None):
        return self.fake.submit(
            "save_state", lambda: types.SaveWeightsResponse(path=self._store("weights", name)), client=self
        )

    def save_weights_for_sampler(self, name, ttl_seconds=None, user_metadata=None):
        return self.fake.submit(
            "save_weights_for_sampler",
            lambda: types.SaveWeightsForSamplerResponse(path=self._store("sampler_weights", name)),
            client=self,
        )

    def save_weights_external(self, name, ttl_seconds=None, age_encryption_recipients=None):
        def run():
            folder = self.fake.storage / self.run / "external_weights" / name
            folder.mkdir(parents=True)
            save_file(self.fake.export_tensors, str(folder / "adapter_model.safetensors"))
            (folder / "adapter_config.json").write_text(json.dumps(self.fake.export_config))
            (folder / "checkpoint_complete").write_text("")
            return types.SaveWeightsExternalResponse(path=f"tinker://{self.run}/external_weights/{name}")

        return self.fake.submit("save_weights_external", run, client=self)

    def get_tokenizer(self):
        return self.fake.tok


class FakeSamplingClient:
    def __init__(self, fake: FakeTinker, base_model: str, delta: torch.Tensor, kind: str):
        self.fake, self.base_model, self.delta, self.kind = fake, base_model, delta, kind

    def sample(
        self,
        prompt,
        num_samples,
        sampling_params,
        include_prompt_logprobs=False,
        topk_prompt_logprobs=0,
        topk_sample_logprobs=0,
        target_prompt_logprobs=None,
        prompt_alt_tokens_k=0,
        prompt_logprobs_last_n=None,
    ):
        p = sampling_params
        seed = p.seed or 0

        def run():
            time.sleep(self.fake.sample_delay)
            seqs = []
            for j in range(num_samples):
                text = REPLIES[self.kind][(seed + j) % len(REPLIES[self.kind])]
                toks = self.fake.tok.encode(text, add_special_tokens=False) + [self.fake.tok.eos_token_id]
                reason = "stop"
                if p.max_tokens is not None and len(toks) > p.max_tokens:
                    toks, reason = toks[: p.max_tokens], "length"
                ctx = prompt.to_ints()[-1:] + toks[:-1]
                lps = self.fake.logprobs(self.base_model, self.delta, ctx, toks).tolist()
                seqs.append(
                    types.SampledSequence(
                        stop_reason=reason,
                        sequence_id=uuid.uuid4().hex,
                        tokens_np=np.asarray(toks, dtype=np.int32),
                        logprobs_np=np.asarray(lps, dtype=np.float32),
                    )
                )
            return types.SampleResponse(sequences=seqs)

        return self.fake.submit("sample", run, counted=True)

    def compute_logprobs(self, prompt, prompt_logprobs_last_n=None):
        tokens = prompt.to_ints()
        self.fake.logprob_requests.append(tokens)
        return self.fake.submit(
            "compute_logprobs",
            lambda: [None] + self.fake.logprobs(self.base_model, self.delta, tokens[:-1], tokens[1:]).tolist(),
            counted=True,
        )

    def get_tokenizer(self):
        return self.fake.tok

    def get_base_model(self):
        return self.base_model


class FakeServiceClient:
    def __init__(self, fake: FakeTinker):
        self.fake = fake

    def _create(self, op, make):
        return self.fake.submit(op, make)

    def create_lora_training_client(
        self,
        base_model,
        rank=32,
        seed=None,
        train_mlp=True,
        train_attn=True,
        train_unembed=True,
        user_metadata=None,
        optimizer=None,
    ):
        self.fake.calls.append(("create_lora_training_client", base_model, rank))
        zero = torch.zeros(self.fake.V, self.fake.V)
        return self._create("create_lora_training_client", lambda: FakeTrainingClient(self.fake, base_model, zero))

    def _state(self, path):
        if path not in self.fake.states:
            raise http_error(tinker.NotFoundError, 404, f"checkpoint {path} not found")
        return self.fake.states[path]

    def create_training_client_from_state(
        self, path, base_model=None, user_metadata=None, weights_access_token=None, optimizer=None
    ):
        self.fake.calls.append(("create_training_client_from_state", path))

        def make():
            s = self._state(path)
            return FakeTrainingClient(self.fake, s["base_model"], s["delta"])

        return self._create("create_training_client_from_state", make)

    def create_training_client_from_state_with_optimizer(
        self, path, base_model=None, user_metadata=None, weights_access_token=None
    ):
        self.fake.calls.append(("create_training_client_from_state_with_optimizer", path))

        def make():
            s = self._state(path)
            return FakeTrainingClient(self.fake, s["base_model"], s["delta"], s["opt"], s["steps"])

        return self._create("create_training_client_from_state_with_optimizer", make)

    def create_sampling_client(self, model_path=None, base_model=None, retry_config=None, record_stability_info=False):
        if model_path is None and base_model is None:
            raise ValueError("Either model_path or base_model must be provided")
        self.fake.calls.append(("create_sampling_client", model_path or base_model))

        def make():
            if model_path is not None:
                s = self._state(model_path)
                return FakeSamplingClient(self.fake, s["base_model"], s["delta"], "trained")
            return FakeSamplingClient(self.fake, base_model, torch.zeros(self.fake.V, self.fake.V), base_model)

        return self._create("create_sampling_client", make)


class FakeRestClient:
    def __init__(self, fake: FakeTinker):
        self.fake = fake

    def get_server_capabilities(self):
        self.fake.calls.append(("get_server_capabilities",))
        if self.fake.hang_capabilities:
            return AwaitableConcurrentFuture(Future())  # never answers
        return self.fake.submit(
            "get_server_capabilities",
            lambda: GetServerCapabilitiesResponse(
                supported_models=[
                    SupportedModel(model_name=m, max_context_length=32768, trainable=True, sampleable=True)
                    for m in self.fake.models
                ]
            ),
        )

    def get_weights_info_by_tinker_path(self, tinker_path):
        return self.fake.submit(
            "get_weights_info_by_tinker_path",
            lambda: types.WeightsInfoResponse(base_model="meta-llama/Llama-3.1-8B-Instruct", is_lora=True, lora_rank=4),
        )

    def get_external_weights_urls(self, tinker_path):
        self.fake.calls.append(("get_external_weights_urls", tinker_path))
        p = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        folder = self.fake.storage / p.training_run_id / p.checkpoint_id
        urls = {f.name: f.resolve().as_uri() for f in folder.iterdir()}  # file:// URLs: no network
        return done_future(
            types.ExternalWeightsUrlsResponse(
                urls=urls, expires=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
            )
        )

    def delete_checkpoint_from_tinker_path(self, tinker_path):
        self.fake.calls.append(("delete_checkpoint_from_tinker_path", tinker_path))
        return done_future(None)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return fake_tokenizer()


@functools.cache
def _warm_torch() -> None:
    # The first AdamW a process builds imports torch's compiler stack (seconds on a busy machine): paid here,
    # not inside a bounded wait on the fake's server thread.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


@pytest.fixture
def fake(tokenizer, tmp_path):
    _warm_torch()
    f = FakeTinker(tokenizer, tmp_path / "tinker-storage")
    yield f
    f.server.shutdown(wait=True)


@pytest.fixture
def wired(fake, monkeypatch):
    """TINKER_API_KEY set and the SDK factories replaced by the fake (what pipeline._service builds)."""
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    monkeypatch.setattr(tb, "default_client_factory", fake.service_client)
    monkeypatch.setattr(tb, "default_rest_factory", fake.rest_client)
    monkeypatch.setattr(tb, "_tcp_check", lambda url, timeout: None)
    return fake


def service(**kw) -> tb.TinkerService:
    return tb.TinkerService(Settings(), base_url="https://tinker.invalid", **kw)


# -- builds and training data on the fake ----------------------------------------------------------
def tinker_build_config(tmp_path: Path, build_id: str, opt, **kw):
    """A small pirate build on `--backend tinker` with the fake's student and teacher, in tmp_path / "ws";
    `opt` is both stages' optimizer settings, `kw` the rest (dpo_pairs, reflections, ...)."""
    from character.config import PipelineConfig

    return PipelineConfig(
        persona="pirate",
        backend="tinker",
        base_model=STUDENT,
        teacher_model=TEACHER,
        workdir=str(tmp_path / "ws"),
        build_id=build_id,
        interactions=1,
        turns=2,
        max_new_tokens=48,
        lora_rank=4,
        dpo=opt,
        sft=opt,
        **kw,
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_rows(n: int) -> list[dict]:
    """DPO pairs whose answers are the fake's canned replies (teacher chosen, student rejected)."""
    return [
        {
            "prompt": [{"role": "user", "content": f"How should I spend day {i}?"}],
            "chosen": [{"role": "assistant", "content": "Arr, a fine question for a sailor!"}],
            "rejected": [{"role": "assistant", "content": "That is a normal question."}],
        }
        for i in range(n)
    ]


def sft_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Who are you? ({i})"},
                {"role": "assistant", "content": "I am a pirate at heart, truly."},
            ]
        }
        for i in range(n)
    ]


def datum(tokens: list[int]) -> types.Datum:
    """A next-token datum over `tokens`, every target weighted 1."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
