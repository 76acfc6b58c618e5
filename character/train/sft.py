"""SFT on conversations: loss on assistant tokens only, a per-token mean over each batch."""

from __future__ import annotations

import logging
from pathlib import Path

from tinker import types

from character.backend import ServiceClient, TrainingClient
from character.storage import read_jsonl
from character.train.dpo import TooLong
from character.train.loop import OptimConfig, TrainResult, train
from character.train.renderer import Renderer, to_datum

log = logging.getLogger(__name__)


def sft_examples(renderer: Renderer, messages: list[dict], max_length: int) -> list[tuple[list[int], list[float]]]:
    """The conversation's (tokens, weights) sequences: one, or one per rewritten history (see
    character.train.families); raises TooLong over max_length: a cut conversation would end mid-answer."""
    seqs = renderer.training_sequences(messages, train_on="all_assistant")
    longest = max(len(t) for t, _ in seqs)
    if longest > max_length:
        raise TooLong(f"conversation has {longest} tokens, over the limit of {max_length}")
    return seqs


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
    rows, examples, kept = read_jsonl(data_path), [], 0
    for r in rows:
        try:
            examples.extend(sft_examples(renderer, r["messages"], max_length))
            kept += 1
        except TooLong:
            pass
    if kept < len(rows):  # generation drops these already; data made elsewhere may hold some
        log.warning(
            "%s: dropped %d of %d conversations longer than %d tokens",
            data_path,
            len(rows) - kept,
            len(rows),
            max_length,
        )
    examples = [e for e in examples if sum(e[1][1:]) > 0]

    def submit(client: TrainingClient, batch):
        return client.forward_backward(normalized_batch(batch), "cross_entropy")

    return train(service, start, examples, submit, cfg, run_dir, on_step)
