"""Fault injection: a seeded share of backend calls fail with a transient error.

`CHARACTER_FAULT_RATE=0.2` (off by default) makes about a fifth of the calls to the service, and
to the training and sampling clients it creates, fail with `TransientBackendError`.
`CHARACTER_FAULT_SEED` picks which. Calls fail the way the Tinker SDK's do (0.38): a training or
sampling call never raises when submitted; its future fails when awaited. Half of the faults are
drawn "submit" (the request never ran: refused, or its submission retries ran out) and half "result"
(it ran, and its result was lost: an expired result, HTTP 410). Creating a client fails at once (our
services wait for the SDK's creation future themselves).

So a training call fails after the loop has submitted later calls, which run regardless (an
optimizer step behind a failed forward/backward runs on no gradients). A failed
`forward_backward_custom` poisons the client, as in the SDK: every call submitted after it fails with
a RuntimeError chained to the first error. The training loop must therefore drop the client and resume
from its last saved state; retrying the call on the same client would not do. A faulted sampling call
never reaches the backend (it changes no state), so making it again gives exactly what the first
attempt would have given.

Every service made in one process draws from the same seeded sequence, so a stage retried by
Prefect meets fresh draws rather than the same fault again.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from character.backend.errors import TransientBackendError


class Faults:
    """Decides, call by call, whether and where a call fails."""

    def __init__(self, rate: float, seed: int = 0):
        self.rate = rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.calls = 0
        self.injected: dict[str, int] = {}  # per call name, for tests

    def draw(self, what: str) -> str | None:
        """None (the call goes through), "submit" or "result" (where it fails)."""
        with self._lock:
            self.calls += 1
            x = self._rng.random()
            if x >= self.rate:
                return None
            self.injected[what] = self.injected.get(what, 0) + 1
        return "submit" if x < self.rate / 2 else "result"


_shared: dict[tuple[float, int], Faults] = {}
_shared_lock = threading.Lock()


def shared_faults(rate: float, seed: int) -> Faults:
    with _shared_lock:
        return _shared.setdefault((rate, seed), Faults(rate, seed))


def with_faults(service, rate: float, seed: int = 0):
    """`service` itself when the rate is 0, else a wrapper that injects faults at that rate."""
    if not rate:
        return service
    return FaultyService(service, shared_faults(rate, seed))


def _fail(what: str, where: str):
    return TransientBackendError(f"injected fault: {what} failed at {where} (CHARACTER_FAULT_RATE)")


class _Failed:
    def __init__(self, what: str, fault: str = "result"):
        self._what, self._where = what, "submission (it never ran)" if fault == "submit" else "result"

    def result(self):
        raise _fail(self._what, self._where)


class _Poisoned:
    def __init__(self, cause: BaseException):
        self._cause = cause

    def result(self):
        # The SDK's words (tinker/lib/public_interfaces/training_client.py, `_take_turn`).
        raise RuntimeError(
            "A previous request failed; this TrainingClient is poisoned and cannot accept further requests."
        ) from self._cause


class _Wrapper:
    def __init__(self, inner, faults: Faults):
        self._inner, self._faults = inner, faults

    def __getattr__(self, name):  # anything not wrapped below goes straight through
        return getattr(self._inner, name)


class FaultyTrainingClient(_Wrapper):
    _poison: BaseException | None = None

    def _call(self, name: str, *args) -> Any:
        if self._poison is not None:
            return _Poisoned(self._poison)
        fault = self._faults.draw(name)
        if fault is None:
            return getattr(self._inner, name)(*args)
        if fault == "result":
            getattr(self._inner, name)(*args)  # the call runs, whatever its future says later
        if name == "forward_backward_custom":
            self._poison = _fail(name, "its custom loss")  # as `_fail_custom_requests` does
        return _Failed(name, fault)

    def forward_backward(self, data, loss_fn="cross_entropy"):
        return self._call("forward_backward", data, loss_fn)

    def forward_backward_custom(self, data, loss_fn):
        return self._call("forward_backward_custom", data, loss_fn)

    def optim_step(self, adam_params):
        return self._call("optim_step", adam_params)

    def save_state(self, name):
        return self._call("save_state", name)

    def save_weights_for_sampler(self, name):
        return self._call("save_weights_for_sampler", name)


class FaultySamplingClient(_Wrapper):
    def _call(self, name: str, *args) -> Any:
        fault = self._faults.draw(name)
        if fault is not None:  # it changes no state: whether it ran makes no difference
            return _Failed(name, fault)
        return getattr(self._inner, name)(*args)

    def sample(self, prompt, num_samples, sampling_params):
        return self._call("sample", prompt, num_samples, sampling_params)

    def compute_logprobs(self, prompt):
        return self._call("compute_logprobs", prompt)


class FaultyService(_Wrapper):
    """Creating a client can fail too; it fails at once (it returns a client, not a future)."""

    def _create(self, what: str, wrap, *args, **kwargs):
        if self._faults.draw(what):
            raise _fail(what, "submission")
        return wrap(getattr(self._inner, what)(*args, **kwargs), self._faults)

    def create_lora_training_client(self, *args, **kwargs):
        return self._create("create_lora_training_client", FaultyTrainingClient, *args, **kwargs)

    def create_training_client_from_state(self, path):
        return self._create("create_training_client_from_state", FaultyTrainingClient, path)

    def create_training_client_from_state_with_optimizer(self, path):
        return self._create("create_training_client_from_state_with_optimizer", FaultyTrainingClient, path)

    def create_sampling_client(self, *args, **kwargs):
        return self._create("create_sampling_client", FaultySamplingClient, *args, **kwargs)
