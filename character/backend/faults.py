"""Fault injection: a seeded share of backend calls fail with a transient error.

`CHARACTER_FAULT_RATE=0.2` (off by default) makes about a fifth of the calls to the service, and
to the training and sampling clients it creates, raise `TransientBackendError`: half of them when
the call is submitted, half when its result is asked for. `CHARACTER_FAULT_SEED` picks which.
A faulted call never reaches the real backend, so no state is half-changed and making the call
again gives exactly what the first attempt would have given.

Training calls fail the way Tinker's do. A call failing "at result" was made on the real client at
submission, and its future fails only when awaited, after the loop has submitted later calls (an
optimizer step that then ran without its gradients). A failed `forward_backward_custom` poisons the
client, as in the SDK: every call submitted after it fails with a RuntimeError chained to the first
error. The training loop must therefore drop the client and resume from its last saved state;
retrying the call on the same client would not do. Sampling calls pass through at once.

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
    def __init__(self, what: str):
        self._what = what

    def result(self):
        raise _fail(self._what, "result")


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

    def _draw(self, what: str) -> str | None:
        fault = self._faults.draw(what)
        if fault == "submit":
            raise _fail(what, "submission")
        return fault


class FaultyTrainingClient(_Wrapper):
    _poison: BaseException | None = None

    def _call(self, name: str, *args) -> Any:
        if self._poison is not None:
            return _Poisoned(self._poison)
        fault = self._faults.draw(name)
        if name == "forward_backward_custom" and fault:
            self._poison = _fail(name, "its custom loss")  # the forward pass ran; the client is poisoned
            getattr(self._inner, name)(*args)
            return _Failed(name)
        if fault == "submit":
            raise _fail(name, "submission")
        future = getattr(self._inner, name)(*args)  # the call runs, whatever its future says later
        return _Failed(name) if fault == "result" else future

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
        if self._draw(name) == "result":
            return _Failed(name)
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
