"""SFT on conversations: loss on assistant tokens only, a per-token mean over each batch."""

from __future__ import annotations

from pathlib import Path

from tinker import types

from character.backend import ServiceClient, TrainingClient
from character.chat import Renderer, to_datum
from character.storage import read_jsonl
from character.training import OptimConfig, TrainResult, train


def sft_example(renderer: Renderer, messages: list[dict], max_length: int) -> tuple[list[int], list[float]]:
    tokens, weights = renderer.training_tokens(messages, train_on="all_assistant")
    return tokens[:max_length], weights[:max_length]


def normalized_batch(batch: list[tuple[list[int], list[float]]]) -> list[types.Datum]:
    """`cross_entropy` sums -logprob x weight; dividing by the batch's trained-token count makes it a mean."""
    total = sum(sum(w[1:]) for _, w in batch) or 1.0
    return [to_datum(t, [x / total for x in w]) for t, w in batch]


def run_sft(
    service: ServiceClient,
    start: callable,
    renderer: Renderer,
    data_path: Path,
    run_dir: Path,
    cfg: OptimConfig,
    max_length: int = 3072,
    on_step=None,
) -> TrainResult:
    examples = [sft_example(renderer, r["messages"], max_length) for r in read_jsonl(data_path)]
    examples = [e for e in examples if sum(e[1][1:]) > 0]

    def submit(client: TrainingClient, batch):
        return client.forward_backward(normalized_batch(batch), "cross_entropy")

    return train(service, start, examples, submit, cfg, run_dir, on_step)
