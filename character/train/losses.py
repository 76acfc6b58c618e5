"""Loss functions on per-token log-probs, shared by every backend.

DPO follows the Open Character Training recipe: sigmoid DPO on summed completion log-probs,
plus `nll_coef` x the chosen answer's per-token mean NLL, plus `kl_coef` x the mean squared
per-token log-ratio between policy and reference over all completion tokens.

Each of the three terms is a sum over pairs divided by a normaliser fixed by the batch before any
forward pass (the number of pairs; the completion tokens of all sequences), so the loss is a sum of
per-pair parts: `DPOLoss.part` gives one set of pairs' share, and a backend that holds whole pairs
per micro-batch can backpropagate each micro-batch's share on its own (one pass, see
`character.backend.local_training`). Called as a plain function it is the Tinker SDK's custom loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DPOCoefficients:
    beta: float = 0.1
    nll_coef: float = 0.1
    kl_coef: float = 0.001


def dpo_loss(
    policy: list[torch.Tensor],
    reference: list[torch.Tensor],
    weights: list[torch.Tensor],
    coef: DPOCoefficients,
    totals: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequences come in pairs: [chosen_0, rejected_0, chosen_1, rejected_1, ...].

    `weights` mark the completion tokens (1) versus prompt and padding (0). `totals`, (pairs,
    completion tokens) of the whole batch, make this the share of these pairs in that batch's loss
    (None: these sequences are the batch); the shares of a batch's disjoint parts sum to its loss.
    """
    if len(policy) % 2:
        raise ValueError("DPO needs an even number of sequences (chosen, rejected pairs)")
    pairs, tokens = totals if totals is not None else (len(policy) // 2, float(sum(w.sum() for w in weights)))
    sums = torch.stack([(lp * w).sum() for lp, w in zip(policy, weights)])
    ref_sums = torch.stack([(lp * w).sum() for lp, w in zip(reference, weights)])
    counts = torch.stack([w.sum() for w in weights]).clamp(min=1.0)
    chosen_ratio = sums[0::2] - ref_sums[0::2]
    rejected_ratio = sums[1::2] - ref_sums[1::2]
    logits = coef.beta * (chosen_ratio - rejected_ratio)
    dpo = -F.logsigmoid(logits).sum() / pairs
    nll = -(sums[0::2] / counts[0::2]).sum() / pairs
    sq = sum(((lp - ref) ** 2 * w).sum() for lp, ref, w in zip(policy, reference, weights))
    kl = sq / max(tokens, 1.0)
    loss = dpo + coef.nll_coef * nll + coef.kl_coef * kl
    metrics = {
        "dpo_loss": float(dpo.detach()),
        "nll": float(nll.detach()),
        "kl": float(kl.detach()),
        "reward_accuracy": float((logits.detach() > 0).float().mean()),
        "reward_margin": float(logits.detach().mean()),
    }
    return loss, metrics


class DPOLoss:
    """A `forward_backward_custom` loss: closes over this batch's reference log-probs (aligned with targets).

    `group` and `part` say that the loss decomposes over whole pairs with normalisers known up front;
    backends that cannot use that (Tinker) just call it.
    """

    group = 2  # sequences that must be scored together: a pair

    def __init__(self, reference: list[list[float]], coef: DPOCoefficients):
        self.reference, self.coef = reference, coef

    def _inputs(self, data, logprobs, indices):
        device = logprobs[0].device
        refs = [torch.tensor(self.reference[i], dtype=lp.dtype, device=device) for i, lp in zip(indices, logprobs)]
        weights = [self._weights(data[i]).to(device, lp.dtype) for i, lp in zip(indices, logprobs)]
        return refs, weights

    @staticmethod
    def _weights(d) -> torch.Tensor:
        return d.loss_fn_inputs["weights"].to_torch()

    def __call__(self, data, logprobs):
        refs, weights = self._inputs(data, logprobs, range(len(data)))
        return dpo_loss(list(logprobs), refs, weights, self.coef)

    def part(self, data, indices: list[int], logprobs) -> torch.Tensor:
        """The share of the pairs at `indices` (whole pairs, positions in `data`) in the loss of all of `data`."""
        if len(indices) % 2 or any(
            indices[k] % 2 or indices[k + 1] != indices[k] + 1 for k in range(0, len(indices), 2)
        ):
            raise ValueError("a part of the DPO loss holds whole pairs (chosen at an even position, then its rejected)")
        totals = (len(data) // 2, float(sum(self._weights(d).sum() for d in data)))
        refs, weights = self._inputs(data, logprobs, indices)
        return dpo_loss(list(logprobs), refs, weights, self.coef, totals)[0]


def make_dpo_loss_fn(reference: list[list[float]], coef: DPOCoefficients) -> DPOLoss:
    """The DPO loss of one batch, for `forward_backward_custom`."""
    return DPOLoss(reference, coef)
