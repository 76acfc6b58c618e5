"""The SDK's training and sampling clients, wrapped so that a fatal error reads as one line.

Every call returns at once with the SDK's own future (a `CheckedFuture` around it): results and
transient errors pass through unchanged (`character.backend.errors.is_transient`, Prefect's retry
condition, recognizes them); an SDK error that retrying cannot fix becomes a `BackendFatalError`
naming what to fix, with the key redacted.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import tinker
from pydantic import SecretStr
from tinker import types

from character.backend.errors import BackendFatalError, describe_fatal, is_transient
from character.backend.tinker_key import redact, safe_cause


def _fatal(e: BaseException, doing: str, secret: SecretStr | None) -> BaseException:
    """The error to raise: SDK errors that retrying cannot fix become one clear line."""
    if isinstance(e, tinker.TinkerError) and not is_transient(e):
        return BackendFatalError(redact(describe_fatal(e, doing), secret))
    return e


class CheckedFuture:
    """An SDK future whose fatal errors read as one line; results and transient errors pass unchanged."""

    def __init__(self, fut, doing: str, secret: SecretStr | None = None):
        self._fut, self._doing, self._secret = fut, doing, secret

    def result(self, timeout: float | None = None):
        try:
            return self._fut.result(timeout)
        except Exception as e:  # noqa: BLE001
            err = _fatal(e, self._doing, self._secret)
            if err is e:
                raise
            raise err from safe_cause(e, self._secret)

    def future(self):
        return self._fut.future()


class TinkerTrainingClient:
    """The SDK TrainingClient; every call returns at once with a future."""

    def __init__(self, sdk_client, secret: SecretStr | None = None, what: str = ""):
        self.sdk = sdk_client
        self._secret = secret
        self._what = what

    def _f(self, fut, doing: str) -> CheckedFuture:
        return CheckedFuture(fut, f"{doing} ({self._what})" if self._what else doing, self._secret)

    def forward_backward(self, data: list[types.Datum], loss_fn: str = "cross_entropy"):
        return self._f(self.sdk.forward_backward(data, loss_fn), "forward_backward")

    def forward_backward_custom(self, data: list[types.Datum], loss_fn):
        return self._f(self.sdk.forward_backward_custom(data, loss_fn), "forward_backward_custom")

    def optim_step(self, adam_params: types.AdamParams):
        return self._f(self.sdk.optim_step(adam_params), "optim_step")

    def save_state(self, name: str):
        return self._f(self.sdk.save_state(name), f"saving training state {name!r}")

    def save_weights_for_sampler(self, name: str):
        return self._f(self.sdk.save_weights_for_sampler(name), f"saving sampler weights {name!r}")

    def save_weights_external(self, name: str, ttl_seconds: int | None = None):
        return self._f(self.sdk.save_weights_external(name, ttl_seconds=ttl_seconds), f"exporting weights {name!r}")

    def get_tokenizer(self):
        return self.sdk.get_tokenizer()


class TinkerSamplingClient:
    """The SDK SamplingClient with a shared bound on requests in flight.

    A slot is taken at submission (blocking while the bound is reached) and given back when the
    request finishes, whether or not anyone has asked for its result yet.
    """

    def __init__(self, sdk_client, slots: threading.Semaphore, secret: SecretStr | None = None, what: str = ""):
        self.sdk = sdk_client
        self._slots = slots
        self._secret = secret
        self._what = what

    def _bounded(self, submit: Callable[[], Any], doing: str) -> CheckedFuture:
        self._slots.acquire()
        try:
            fut = submit()
        except BaseException:
            self._slots.release()
            raise
        fut.future().add_done_callback(lambda _: self._slots.release())
        return CheckedFuture(fut, f"{doing} ({self._what})" if self._what else doing, self._secret)

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams):
        return self._bounded(lambda: self.sdk.sample(prompt, num_samples, sampling_params), "sampling")

    def compute_logprobs(self, prompt: types.ModelInput):
        return self._bounded(lambda: self.sdk.compute_logprobs(prompt), "computing log-probs")

    def get_tokenizer(self):
        return self.sdk.get_tokenizer()
