"""Counting the tokens a build really uses, at the one boundary every backend call crosses.

`metered(service, meter, base_model)` wraps any service of the Tinker-shaped interface (local or
Tinker, with or without fault injection) and counts, per model, what Tinker bills for:

- prefill: the prompt of every sampling request (once per request, however many samples it asks
  for) and of every log-prob request (the DPO reference), and the extra forward pass of a custom
  loss (`forward_backward_custom` runs a forward, then a weighted forward/backward);
- sample: every sampled token (the end-of-turn token included);
- train: the input tokens of every forward/backward.

A call is counted when its result arrives, so a request that failed and was made again counts once
per answer it gave, and a training step replayed after a recovery counts again (it is paid again).
Checkpoints (`tinker://...`, local adapters) are counted under the build's base model: they are its
adapters, and Tinker prices them as it.
"""

from __future__ import annotations

import threading
from typing import Any

KINDS = ("prefill", "sample", "train")


class TokenMeter:
    """Tokens per model and kind, plus the requests and samples behind them (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}

    def add(self, model: str, **counts: int) -> None:
        with self._lock:
            row = self._counts.setdefault(model, {k: 0 for k in (*KINDS, "requests", "samples")})
            for k, v in counts.items():
                row[k] += int(v)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{model: {prefill, sample, train, requests, samples}}, models sorted."""
        with self._lock:
            return {m: dict(self._counts[m]) for m in sorted(self._counts)}


class _Counted:
    """A future that reports its result to the meter once, the first time it is read."""

    def __init__(self, fut, on_result):
        self._fut, self._on_result, self._seen = fut, on_result, False

    def result(self, *args, **kwargs):
        value = self._fut.result(*args, **kwargs)
        if not self._seen:
            self._seen = True
            self._on_result(value)
        return value

    def __getattr__(self, name):  # e.g. the SDK future's .future()
        return getattr(self._fut, name)


def _length(model_input) -> int:
    return int(model_input.length)


class MeteredSampling:
    def __init__(self, inner, meter: TokenMeter, model: str):
        self._inner, self._meter, self._model = inner, meter, model

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def sample(self, prompt, num_samples, sampling_params):
        n = _length(prompt)

        def count(resp) -> None:
            seqs = list(resp.sequences)
            sampled = sum(len(s.tokens) for s in seqs)
            self._meter.add(self._model, prefill=n, sample=sampled, requests=1, samples=len(seqs))

        return _Counted(self._inner.sample(prompt, num_samples, sampling_params), count)

    def compute_logprobs(self, prompt):
        n = _length(prompt)
        return _Counted(self._inner.compute_logprobs(prompt), lambda _: self._meter.add(self._model, prefill=n))


class MeteredTraining:
    def __init__(self, inner, meter: TokenMeter, model: str):
        self._inner, self._meter, self._model = inner, meter, model

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def forward_backward(self, data, loss_fn="cross_entropy"):
        n = sum(_length(d.model_input) for d in data)
        return _Counted(self._inner.forward_backward(data, loss_fn), lambda _: self._meter.add(self._model, train=n))

    def forward_backward_custom(self, data, loss_fn):
        n = sum(_length(d.model_input) for d in data)
        return _Counted(
            self._inner.forward_backward_custom(data, loss_fn),
            lambda _: self._meter.add(self._model, prefill=n, train=n),
        )


class MeteredService:
    """The service with every client it makes counted into `meter`."""

    def __init__(self, inner, meter: TokenMeter, base_model: str):
        self._inner, self.meter, self._base = inner, meter, base_model

    def __getattr__(self, name):  # get_tokenizer, list_models, rest_client, ...: straight through
        return getattr(self._inner, name)

    def create_lora_training_client(self, base_model: str, *args, **kwargs):
        return MeteredTraining(
            self._inner.create_lora_training_client(base_model, *args, **kwargs), self.meter, base_model
        )

    def create_training_client_from_state(self, path: str):
        return MeteredTraining(self._inner.create_training_client_from_state(path), self.meter, self._base)

    def create_training_client_from_state_with_optimizer(self, path: str):
        client = self._inner.create_training_client_from_state_with_optimizer(path)
        return MeteredTraining(client, self.meter, self._base)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None, **kw: Any):
        client = self._inner.create_sampling_client(model_path=model_path, base_model=base_model, **kw)
        return MeteredSampling(client, self.meter, base_model or self._base)


def metered(service, meter: TokenMeter, base_model: str) -> MeteredService:
    return MeteredService(service, meter, base_model)


def stage_tokens(service) -> dict[str, dict[str, int]] | None:
    """What a stage's service counted (None: the stage opened no metered service)."""
    meter = getattr(service, "meter", None)
    return meter.snapshot() if isinstance(meter, TokenMeter) else None
