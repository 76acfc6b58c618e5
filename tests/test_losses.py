"""The DPO loss against a hand computation and against TRL's own implementation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from character.train.losses import DPOCoefficients, dpo_loss, make_dpo_loss_fn
from character.train.renderer import to_datum


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_matches_hand_computation():
    # one pair; prompt token weights 0, completion weights 1
    pol_c = torch.tensor([-9.0, -1.0, -2.0])
    pol_r = torch.tensor([-9.0, -3.0, -1.5, -0.5])
    ref_c = torch.tensor([-9.0, -1.5, -2.5])
    ref_r = torch.tensor([-9.0, -2.0, -1.0, -0.25])
    w_c = torch.tensor([0.0, 1.0, 1.0])
    w_r = torch.tensor([0.0, 1.0, 1.0, 1.0])
    coef = DPOCoefficients(beta=0.1, nll_coef=0.1, kl_coef=0.001)
    loss, m = dpo_loss([pol_c, pol_r], [ref_c, ref_r], [w_c, w_r], coef)

    chosen_ratio = (-1 - 2) - (-1.5 - 2.5)  # 1.0
    rejected_ratio = (-3 - 1.5 - 0.5) - (-2 - 1 - 0.25)  # -1.75
    dpo = -_logsig(0.1 * (chosen_ratio - rejected_ratio))
    nll = (1 + 2) / 2
    sq = [(-1 + 1.5) ** 2, (-2 + 2.5) ** 2, (-3 + 2) ** 2, (-1.5 + 1) ** 2, (-0.5 + 0.25) ** 2]
    kl = sum(sq) / 5
    expected = dpo + 0.1 * nll + 0.001 * kl
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["dpo_loss"] == pytest.approx(dpo, rel=1e-6)
    assert m["nll"] == pytest.approx(nll, rel=1e-6)
    assert m["kl"] == pytest.approx(kl, rel=1e-6)
    assert m["reward_accuracy"] == 1.0


def test_dpo_loss_averages_pairs_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    pol = [torch.randn(6, generator=g, requires_grad=True) for _ in range(4)]
    ref = [torch.randn(6, generator=g) for _ in range(4)]
    w = [torch.tensor([0, 0, 1, 1, 1, 1.0]) for _ in range(4)]
    coef = DPOCoefficients(beta=0.5, nll_coef=0.0, kl_coef=0.0)
    loss, _ = dpo_loss(pol, ref, w, coef)
    by_pair = [dpo_loss(pol[i : i + 2], ref[i : i + 2], w[i : i + 2], coef)[0] for i in (0, 2)]
    assert loss.item() == pytest.approx((by_pair[0].item() + by_pair[1].item()) / 2, rel=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad[:2].abs().sum() == 0 for p in pol)  # prompt tokens get no gradient


def test_custom_loss_fn_reads_weights_from_datums():
    tokens = [5, 6, 7, 8]
    d_c = to_datum(tokens, [0, 0, 1, 1])
    d_r = to_datum(tokens, [0, 0, 1, 1])
    pol = [torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.0, -4.0, -5.0])]
    ref = [[-1.0, -2.5, -3.5], [-1.0, -3.0, -3.0]]
    coef = DPOCoefficients()
    via_fn, _ = make_dpo_loss_fn(ref, coef)([d_c, d_r], pol)
    direct, _ = dpo_loss(pol, [torch.tensor(r) for r in ref], [torch.tensor([0, 1.0, 1.0])] * 2, coef)
    assert via_fn.item() == pytest.approx(direct.item(), rel=1e-7)


def _trl_sigmoid_loss(chosen_tok, rejected_tok, ref_chosen, ref_rejected, mask, beta):
    """Run TRL's DPOTrainer._compute_loss on fixed per-token log-probs (no model, no accelerator)."""
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    per_token = torch.cat([chosen_tok, rejected_tok]) * mask[:, 1:]
    n, t = per_token.shape

    class FakeModel(torch.nn.Module):
        def forward(self, **kw):
            return SimpleNamespace(
                log_probs=per_token,
                entropy=torch.zeros(n, t),
                mean_logits=torch.zeros(n, t),
                is_top1=torch.zeros(n, t, dtype=torch.bool),
            )

    acc = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    from collections import defaultdict

    fake = SimpleNamespace(
        model=FakeModel(),
        accelerator=acc,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_type=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(),
    )
    fake.model.train()
    inputs = {
        "input_ids": torch.ones(n, t + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, t + 1, dtype=torch.long),
        "completion_mask": mask.long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(fake, fake.model, inputs, False)


def test_dpo_loss_equals_trl_sigmoid_when_extra_terms_are_off():
    g = torch.Generator().manual_seed(3)
    b, t = 3, 7
    mask = torch.zeros(2 * b, t + 1)
    mask[:, 3:] = 1.0
    pol = torch.randn(2 * b, t, generator=g) - 2
    ref = torch.randn(2 * b, t, generator=g) - 2
    w = mask[:, 1:]
    beta = 0.1
    ref_sums = (ref * w).sum(1)
    trl_loss = _trl_sigmoid_loss(pol[:b], pol[b:], ref_sums[:b], ref_sums[b:], mask, beta)
    # ours takes pairs interleaved: chosen_0, rejected_0, chosen_1, ...
    order = [i for k in range(b) for i in (k, b + k)]
    ours, _ = dpo_loss(
        [pol[i] for i in order],
        [ref[i] for i in order],
        [w[i] for i in order],
        DPOCoefficients(beta=beta, nll_coef=0.0, kl_coef=0.0),
    )
    assert ours.item() == pytest.approx(float(trl_loss), rel=1e-6)
