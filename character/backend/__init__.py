"""The Tinker-shaped interface every training loop and data generator is written against.

Data types are the Tinker SDK's own (`Datum`, `ModelInput`, `AdamParams`, `SamplingParams`,
`SampledSequence`); calls return futures with `.result()`, so a loop submits work before waiting
and runs unchanged on the local backend and on Tinker.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

from tinker import types

T = TypeVar("T", covariant=True)

CustomLossFn = Callable[[list[types.Datum], list[Any]], tuple[Any, dict[str, float]]]


class Future(Protocol[T]):
    def result(self) -> T: ...


class SamplingClient(Protocol):
    def sample(
        self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams
    ) -> Future[types.SampleResponse]: ...

    def compute_logprobs(self, prompt: types.ModelInput) -> Future[list[float | None]]: ...

    def get_tokenizer(self) -> Any: ...


class TrainingClient(Protocol):
    def forward_backward(self, data: list[types.Datum], loss_fn: str) -> Future[types.ForwardBackwardOutput]: ...

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: CustomLossFn
    ) -> Future[types.ForwardBackwardOutput]: ...

    def optim_step(self, adam_params: types.AdamParams) -> Future[Any]: ...

    def save_state(self, name: str) -> Future[types.SaveWeightsResponse]: ...

    def save_weights_for_sampler(self, name: str) -> Future[types.SaveWeightsForSamplerResponse]: ...

    def get_tokenizer(self) -> Any: ...


class ServiceClient(Protocol):
    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = False,
    ) -> TrainingClient: ...

    def create_training_client_from_state(self, path: str) -> TrainingClient: ...

    def create_training_client_from_state_with_optimizer(self, path: str) -> TrainingClient: ...

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> SamplingClient: ...

    def get_tokenizer(self, base_model: str) -> Any: ...


class Done:
    """An already-resolved future (the local backend computes eagerly)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value
