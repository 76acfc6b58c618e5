"""Metrics from log-probabilities: held-out preference accuracy and margin (the implicit DPO reward
against the base model) and introspection NLL, on token sequences rendered the same way for every model.

The implicit reward of an answer is beta x (log p_model - log p_base), summed over the answer's tokens,
computed on exactly the same token sequences for the model and its base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tinker import types

from character.backend import SamplingClient
from character.backend.retry import Call
from character.evaluation.data import EvalData
from character.evaluation.metrics import break_character_messages
from character.evaluation.multiturn import with_system
from character.train.dpo import pair_sequences
from character.train.renderer import Renderer


@dataclass
class Sequences:
    """An evaluation's data as one model's tokenizer renders it (weights: which tokens count)."""

    dpo: list[list[int]] = field(default_factory=list)
    dpo_w: list[list[float]] = field(default_factory=list)
    intro: list[list[int]] = field(default_factory=list)
    intro_w: list[list[float]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    robust: list[list[int]] = field(default_factory=list)


def render_sequences(
    renderer: Renderer, data: EvalData, max_length: int, sft_max_length: int, system: str | None = None
) -> Sequences:
    """`system`: the prompted baseline's system prompt, before every conversation (and before a
    break-character instruction); its introspection is not scored (the rows carry their own prompts)."""
    s = Sequences()
    # the pairs fit max_length without the system prompt; it must not make them too long
    empty = [{"role": "user", "content": ""}]
    extra = len(renderer.prompt(with_system(empty, system))) - len(renderer.prompt(empty)) if system else 0
    for row in data.heldout:
        row = {**row, "prompt": with_system(row["prompt"], system)} if system else row
        for tokens, weights in pair_sequences(renderer, row, max_length + extra):
            s.dpo.append(tokens)
            s.dpo_w.append(weights)
    for row in data.intro if system is None else []:
        for tokens, weights in renderer.training_sequences(row["messages"], train_on="all_assistant"):
            s.intro.append(tokens[:sft_max_length])
            s.intro_w.append(weights[:sft_max_length])
    s.prompts = [renderer.prompt(with_system([{"role": "user", "content": p}], system)) for p in data.prompts]
    s.robust = [
        renderer.prompt(with_system(break_character_messages(p, i), system)) for i, p in enumerate(data.prompts)
    ]
    return s


def submit_logprobs(client: SamplingClient, seqs: list[list[int]]) -> list[Call]:
    """Every request submitted now; each made again alone if it fails transiently (log-probs change nothing)."""
    return [Call(lambda s=s: client.compute_logprobs(types.ModelInput.from_ints(s))) for s in seqs]


def weighted_sums(futures, weights: list[list[float]]) -> list[tuple[float, float]]:
    """(sum of weighted target log-probs, sum of weights) per sequence; weights align with tokens."""
    out = []
    for f, w in zip(futures, weights):
        lps = f.result()[1:]
        out.append((sum(lp * x for lp, x in zip(lps, w[1:])), sum(w[1:])))
    return out


def dpo_metrics(policy: list[tuple[float, float]], reference: list[tuple[float, float]], beta: float) -> dict:
    """Sequences come as [chosen_0, rejected_0, ...]; rewards are beta x (policy - reference) summed log-probs."""
    chosen = [beta * (p[0] - r[0]) for p, r in zip(policy[0::2], reference[0::2])]
    rejected = [beta * (p[0] - r[0]) for p, r in zip(policy[1::2], reference[1::2])]
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = len(margins)
    if n == 0:
        return {"dpo_pairs": 0}
    return {
        "dpo_pairs": n,
        "dpo_accuracy": sum(m > 0 for m in margins) / n,
        "dpo_margin": sum(margins) / n,
        "dpo_reward_chosen": sum(chosen) / n,
        "dpo_reward_rejected": sum(rejected) / n,
    }


def nll_metrics(sums: list[tuple[float, float]]) -> dict:
    """Mean per-token NLL over all assistant tokens of all conversations (pooled)."""
    tokens = sum(w for _, w in sums)
    return {
        "introspection_nll": -sum(s for s, _ in sums) / tokens if tokens else None,
        "introspection_tokens": int(tokens),
    }
