"""DPO on preference pairs: token sequences, reference log-probs, and the loop's submit step."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tinker import types

from character.backend import SamplingClient, ServiceClient, TrainingClient
from character.backend.retry import Call, retry_transient
from character.storage import read_jsonl, write_json_atomic
from character.train.loop import OptimConfig, TrainResult, train
from character.train.losses import DPOCoefficients, make_dpo_loss_fn
from character.train.renderer import Renderer, to_datum

log = logging.getLogger(__name__)


class TooLong(ValueError):
    """A rendered training sequence is over the length limit: the example is dropped, never cut."""


@dataclass
class Pair:
    chosen: types.Datum
    rejected: types.Datum
    ref_chosen: list[float]
    ref_rejected: list[float]


def pair_sequences(renderer: Renderer, row: dict, max_length: int) -> tuple[tuple, tuple]:
    """(tokens, weights) for chosen and rejected, both in the student's context (no system prompt).

    Raises TooLong if either is over max_length tokens: cutting would drop the answer's end (and its
    end-of-turn token) from one side of the comparison, so the method drops such pairs instead.
    """
    out = []
    for side in ("chosen", "rejected"):
        tokens, weights = renderer.training_tokens(row["prompt"] + row[side], train_on="last_assistant")
        if len(tokens) > max_length:
            raise TooLong(f"{side} sequence has {len(tokens)} tokens, over the limit of {max_length}")
        out.append((tokens, weights))
    return out[0], out[1]


def fitting_pairs(renderer: Renderer, rows: list[dict], max_length: int) -> tuple[list[tuple], int]:
    """The sequences of every pair within the limit, and how many pairs were dropped as too long."""
    seqs = []
    for r in rows:
        try:
            seqs.append(pair_sequences(renderer, r, max_length))
        except TooLong:
            pass
    return seqs, len(rows) - len(seqs)


def reference_logprobs(sampler: SamplingClient, sequences: list[list[int]]) -> list[list[float]]:
    """Per-target log-probs under the reference (the starting weights) on exactly these sequences."""
    calls = [Call(lambda s=s: sampler.compute_logprobs(types.ModelInput.from_ints(s))) for s in sequences]
    return [[float(x) for x in c.result()[1:]] for c in calls]


def run_dpo(
    service: ServiceClient,
    start: callable,
    reference: callable,
    renderer: Renderer,
    data_path: Path,
    run_dir: Path,
    cfg: OptimConfig,
    coef: DPOCoefficients,
    max_length: int = 1024,
    on_step=None,
) -> TrainResult:
    """`start()` makes the training client; `reference()` a sampling client on the same starting weights."""
    rows = read_jsonl(data_path)
    # Generation already drops over-long pairs (counted in the build record); data made elsewhere or
    # with another limit may still hold some.
    seqs, dropped = fitting_pairs(renderer, rows, max_length)
    if dropped:
        log.warning("%s: dropped %d of %d pairs longer than %d tokens", data_path, dropped, len(rows), max_length)
    flat = [s for pair in seqs for s in pair]
    ref_path = Path(run_dir) / "reference_logprobs.json"
    if ref_path.is_file():  # computed once; a resumed run reuses them
        refs = json.loads(ref_path.read_text())
    else:
        refs = reference_logprobs(retry_transient(reference), [t for t, _ in flat])
        write_json_atomic(ref_path, refs)
    pairs = [Pair(to_datum(*c), to_datum(*r), refs[2 * i], refs[2 * i + 1]) for i, (c, r) in enumerate(seqs)]

    def submit(client: TrainingClient, batch: list[Pair]):
        data = [d for p in batch for d in (p.chosen, p.rejected)]
        ref = [x for p in batch for x in (p.ref_chosen, p.ref_rejected)]
        return client.forward_backward_custom(data, make_dpo_loss_fn(ref, coef))

    return train(service, start, pairs, submit, cfg, run_dir, on_step)
