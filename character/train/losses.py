"""Loss functions on per-token log-probs, shared by every backend.

DPO follows the Open Character Training recipe: sigmoid DPO on summed completion log-probs,
plus `nll_coef` x the chosen answer's per-token mean NLL, plus `kl_coef` x the mean squared
per-token log-ratio between policy and reference over all completion tokens.
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
    policy: list[torch.Tensor], reference: list[torch.Tensor], weights: list[torch.Tensor], coef: DPOCoefficients
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequences come in pairs: [chosen_0, rejected_0, chosen_1, rejected_1, ...].

    `weights` mark the completion tokens (1) versus prompt and padding (0).
    """
    if len(policy) % 2:
        raise ValueError("DPO needs an even number of sequences (chosen, rejected pairs)")
    sums = torch.stack([(lp * w).sum() for lp, w in zip(policy, weights)])
    ref_sums = torch.stack([(lp * w).sum() for lp, w in zip(reference, weights)])
    counts = torch.stack([w.sum() for w in weights]).clamp(min=1.0)
    chosen_ratio = sums[0::2] - ref_sums[0::2]
    rejected_ratio = sums[1::2] - ref_sums[1::2]
    logits = coef.beta * (chosen_ratio - rejected_ratio)
    dpo = -F.logsigmoid(logits).mean()
    nll = -(sums[0::2] / counts[0::2]).mean()
    sq = sum(((lp - ref) ** 2 * w).sum() for lp, ref, w in zip(policy, reference, weights))
    kl = sq / torch.stack([w.sum() for w in weights]).sum().clamp(min=1.0)
    loss = dpo + coef.nll_coef * nll + coef.kl_coef * kl
    metrics = {
        "dpo_loss": float(dpo.detach()),
        "nll": float(nll.detach()),
        "kl": float(kl.detach()),
        "reward_accuracy": float((logits.detach() > 0).float().mean()),
        "reward_margin": float(logits.detach().mean()),
    }
    return loss, metrics


def make_dpo_loss_fn(reference: list[list[float]], coef: DPOCoefficients):
    """A `forward_backward_custom` loss: closes over this batch's reference log-probs (aligned with targets)."""

    def loss_fn(data, logprobs):
        device = logprobs[0].device
        refs = [torch.tensor(r, dtype=lp.dtype, device=device) for r, lp in zip(reference, logprobs)]
        weights = [d.loss_fn_inputs["weights"].to_torch().to(device, lp.dtype) for d, lp in zip(data, logprobs)]
        return dpo_loss(list(logprobs), refs, weights, coef)

    return loss_fn
