"""The SDK's training, sampling and REST clients, wrapped so that every wait is bounded and every error
reads as one redacted line.

Every call returns at once with the SDK's own future (a `CheckedFuture` around it). Waiting on it is
bounded (`result_timeout_s`, CHARACTER_TINKER_RESULT_TIMEOUT_S): the SDK polls a pending result for ever
on 5xx, 408 and "try again", so a stalled service would otherwise hang a build. Running out of time
raises `ResultTimeout`, a transient error: the training loop resumes on a fresh client from its last
save, and a sampling request is made again. Whatever else the SDK raises (its HTTP errors, a
`RequestFailedError`, a `ValueError` wrapping a 4xx, `RetryableException`, the "poisoned" RuntimeError)
becomes a `TransientBackendError` or a `BackendFatalError` by `is_transient`, with a one-line message
that names what failed and, when fatal, what to fix. The key never appears in it, and the SDK error is
chained (for debugging) only when nothing in its chain quotes the key.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from pydantic import SecretStr
from tinker import types

from character.backend.errors import (
    BackendFatalError,
    ResultTimeout,
    TransientBackendError,
    describe_fatal,
    describe_transient,
    is_transient,
)
from character.backend.tinker_key import safe_cause

DEFAULT_RESULT_TIMEOUT_S = 600.0


def translate(e: BaseException, doing: str, secret: SecretStr | None, timeout_s: float | None = None) -> Exception:
    """The error to raise for `e`: one redacted line, transient or fatal as `is_transient` says."""
    if isinstance(e, (TransientBackendError, BackendFatalError)):
        return e  # already ours
    if isinstance(e, TimeoutError) and timeout_s is not None:
        return ResultTimeout(
            f"no result from Tinker within {timeout_s:g} s while {doing}: the service stalled or is overloaded "
            "(CHARACTER_TINKER_RESULT_TIMEOUT_S sets the bound)"
        )
    if is_transient(e):
        return TransientBackendError(describe_transient(e, doing, secret))
    return BackendFatalError(describe_fatal(e, doing, secret))


def _raise(e: BaseException, doing: str, secret: SecretStr | None, timeout_s: float | None = None):
    err = translate(e, doing, secret, timeout_s)
    if err is e:
        raise e
    raise err from safe_cause(e, secret)


class CheckedFuture:
    """An SDK future whose wait is bounded and whose errors read as one redacted line."""

    def __init__(
        self, fut, doing: str, secret: SecretStr | None = None, timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S
    ):
        self._fut, self._doing, self._secret, self._timeout_s = fut, doing, secret, timeout_s

    def result(self, timeout: float | None = None):
        bound = timeout if timeout is not None else self._timeout_s
        try:
            return self._fut.result(bound)
        except Exception as e:  # noqa: BLE001 - every shape is translated
            if isinstance(e, TimeoutError):
                self._give_up()
            _raise(e, self._doing, self._secret, bound)

    def _give_up(self) -> None:
        # Stop waiting for good: a cancelled sampling request is cancelled on the server too (the SDK does
        # that), and its in-flight slot comes back. A training client is dropped after a timeout anyway.
        try:
            self._fut.future().cancel()
        except Exception:  # noqa: BLE001 - best effort
            pass

    def future(self):
        return self._fut.future()


def submit_checked(
    submit: Callable[[], Any], doing: str, secret: SecretStr | None, timeout_s: float | None
) -> CheckedFuture:
    """`submit()`, an SDK call that returns a future, as a `CheckedFuture`; an error at submission is
    translated like one at the result."""
    try:
        fut = submit()
    except Exception as e:  # noqa: BLE001
        _raise(e, doing, secret)
    return CheckedFuture(fut, doing, secret, timeout_s)


class _Checked:
    """Submits SDK calls: each returns a `CheckedFuture`; an error raised at submission is translated too."""

    def __init__(self, secret: SecretStr | None, what: str, timeout_s: float | None):
        self._secret, self._what, self._timeout_s = secret, what, timeout_s

    def _doing(self, doing: str) -> str:
        return f"{doing} ({self._what})" if self._what else doing

    def _submit(self, submit: Callable[[], Any], doing: str) -> CheckedFuture:
        return submit_checked(submit, self._doing(doing), self._secret, self._timeout_s)


class TinkerTrainingClient(_Checked):
    """The SDK TrainingClient; every call returns at once with a future.

    `lora_alpha` is the alpha Tinker trains with (it fixes its own, whatever we ask for)."""

    def __init__(
        self,
        sdk_client,
        secret: SecretStr | None = None,
        what: str = "",
        timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S,
        lora_alpha: int | None = None,
    ):
        super().__init__(secret, what, timeout_s)
        self.sdk = sdk_client
        self.lora_alpha = lora_alpha

    def forward_backward(self, data: list[types.Datum], loss_fn: str = "cross_entropy"):
        return self._submit(lambda: self.sdk.forward_backward(data, loss_fn), "forward_backward")

    def forward_backward_custom(self, data: list[types.Datum], loss_fn):
        return self._submit(lambda: self.sdk.forward_backward_custom(data, loss_fn), "forward_backward_custom")

    def optim_step(self, adam_params: types.AdamParams):
        return self._submit(lambda: self.sdk.optim_step(adam_params), "optim_step")

    def save_state(self, name: str):
        return self._submit(lambda: self.sdk.save_state(name), f"saving training state {name!r}")

    def save_weights_for_sampler(self, name: str):
        return self._submit(lambda: self.sdk.save_weights_for_sampler(name), f"saving sampler weights {name!r}")

    def save_weights_external(self, name: str, ttl_seconds: int | None = None):
        return self._submit(
            lambda: self.sdk.save_weights_external(name, ttl_seconds=ttl_seconds), f"exporting weights {name!r}"
        )

    def get_tokenizer(self):
        return self.sdk.get_tokenizer()


class TinkerSamplingClient(_Checked):
    """The SDK SamplingClient with a shared bound on requests in flight.

    A slot is taken at submission (blocking while the bound is reached) and given back when the
    request finishes (or is given up on), whether or not anyone has asked for its result yet.
    """

    def __init__(
        self,
        sdk_client,
        slots: threading.Semaphore,
        secret: SecretStr | None = None,
        what: str = "",
        timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S,
    ):
        super().__init__(secret, what, timeout_s)
        self.sdk = sdk_client
        self._slots = slots

    def _bounded(self, submit: Callable[[], Any], doing: str) -> CheckedFuture:
        # Bounded too: a stalled request holds its slot until someone gives up on it, which may be this very
        # thread once it stops submitting (a window wider than the bound), so waiting for ever would hang.
        if not self._slots.acquire(timeout=self._timeout_s):
            raise ResultTimeout(
                f"no sampling request on Tinker finished within {self._timeout_s:g} s to make room for "
                f"{self._doing(doing)} (CHARACTER_TINKER_RESULT_TIMEOUT_S sets the bound)"
            )
        try:
            fut = self._submit(submit, doing)
        except BaseException:
            self._slots.release()
            raise
        fut.future().add_done_callback(lambda _: self._slots.release())
        return fut

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams):
        return self._bounded(lambda: self.sdk.sample(prompt, num_samples, sampling_params), "sampling")

    def compute_logprobs(self, prompt: types.ModelInput):
        return self._bounded(lambda: self.sdk.compute_logprobs(prompt), "computing log-probs")

    def get_tokenizer(self):
        return self.sdk.get_tokenizer()


class TinkerRestClient(_Checked):
    """The SDK RestClient (checkpoint info, export URLs, deletions): each call's future checked the same way."""

    def __init__(self, sdk_rest, secret: SecretStr | None = None, timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S):
        super().__init__(secret, "", timeout_s)
        self.sdk = sdk_rest

    def __getattr__(self, name: str):
        attr = getattr(self.sdk, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kwargs):
            return self._submit(lambda: attr(*args, **kwargs), f"{name.replace('_', ' ')}")

        return call
