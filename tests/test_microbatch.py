"""Local training at scale: micro-batches with gradient accumulation give the full batch's update."""

from __future__ import annotations

import pytest
import torch
from lora_training import lora_client, random_reference_logprobs, rendered_pairs
from tinker import types

from character.backend.local import micro_batches
from character.train.losses import DPOCoefficients, make_dpo_loss_fn


def _clients(workdir, **kw):
    """Two clients on identical weights (tests/lora_training.py): one forwards the whole batch at once, one in
    micro-batches."""
    return [lora_client(workdir, **opts) for opts in ({"memory_budget_gb": 1000.0}, kw)]


def _pairs(client, n=4):
    return rendered_pairs(
        client,
        n,
        lambda i: (
            f"Tell me about thing number {i}" + " please" * i + "?",
            f"Arr, thing {i} be a fine treasure" + ", matey" * (i + 1) + "!",
            f"Thing {i} is an object.",
        ),
    )


def _grads(client) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in client.model.named_parameters() if p.grad is not None}


def _lora(client) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in client.model.named_parameters() if "lora_" in k}


def _assert_same_update(full, micro):
    g_full, g_micro = _grads(full), _grads(micro)
    assert g_full.keys() == g_micro.keys() and len(g_full) > 0
    for k in g_full:
        torch.testing.assert_close(g_micro[k], g_full[k], atol=1e-5, rtol=1e-5)
    # Adam's first step is about lr x sign(g): with eps 1e-8 a gradient element near zero turns a 1e-9
    # difference into a visible one. eps 1e-4 keeps the step a smooth function of the gradient.
    adam = types.AdamParams(learning_rate=1e-3, beta1=0.9, beta2=0.98, eps=1e-4)
    full.optim_step(adam).result(), micro.optim_step(adam).result()
    w_full, w_micro = _lora(full), _lora(micro)
    for k in w_full:
        torch.testing.assert_close(w_micro[k], w_full[k], atol=1e-5, rtol=0)


def test_micro_batches_group_in_order():
    assert micro_batches([5, 6, 7, 8, 9], 2, 0) == [[0, 1], [2, 3], [4]]
    assert micro_batches([10, 10, 30, 10], None, 30) == [[0, 1], [2], [3]]  # sequences x longest <= budget
    assert micro_batches([50, 10], None, 30) == [[0], [1]]  # one sequence over the budget still runs alone


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_micro_batched_dpo_update_equals_full_batch(workdir, one_thread, checkpointing):
    """3 sequences per micro-batch: chosen and rejected of a pair land in different micro-batches."""
    full, micro = _clients(workdir, micro_batch_size=3, gradient_checkpointing=checkpointing)
    data = _pairs(full)
    assert len(micro._micro_batches(micro._sequences(data))) == 3
    refs = random_reference_logprobs(data)
    loss_fn = make_dpo_loss_fn(refs, DPOCoefficients(beta=0.1, nll_coef=0.1, kl_coef=0.001))
    out_full = full.forward_backward_custom(data, loss_fn).result()
    out_micro = micro.forward_backward_custom(data, loss_fn).result()
    assert out_micro.metrics["loss"] == pytest.approx(out_full.metrics["loss"], abs=1e-6)
    _assert_same_update(full, micro)


@pytest.mark.slow
def test_micro_batched_cross_entropy_update_equals_full_batch(workdir, one_thread):
    """The micro-batch size chosen from a (tiny) memory budget: one sequence per micro-batch here."""
    from character.train.sft import normalized_batch

    full, micro = _clients(workdir, memory_budget_gb=1e-4)
    data = _pairs(full, n=3)
    assert len(micro._micro_batches(micro._sequences(data))) == len(data)
    batch = normalized_batch(
        [
            (
                d.model_input.to_ints() + d.loss_fn_inputs["target_tokens"].tolist()[-1:],
                [0.0] + d.loss_fn_inputs["weights"].tolist(),
            )
            for d in data
        ]
    )
    out_full = full.forward_backward(batch, "cross_entropy").result()
    out_micro = micro.forward_backward(batch, "cross_entropy").result()
    assert out_micro.metrics["loss:sum"] == pytest.approx(out_full.metrics["loss:sum"], abs=1e-6)
    _assert_same_update(full, micro)


@pytest.mark.parametrize("train_unembed", [False, True])
def test_head_in_small_chunks_gives_the_same_logprobs_and_gradients(workdir, one_thread, train_unembed):
    """A 128k vocabulary makes the head run a few positions at a time, with and without gradients: the
    same log-probs and gradients as one pass over the whole batch (forced here on the tiny model). A frozen
    head computes its gradient in the forward pass; a trained one (LoRA on the unembedding) recomputes."""
    from character.backend.generation import head_chunk_positions, token_logprobs

    def client():
        return lora_client(workdir, training={"train_unembed": train_unembed})

    full, chunked = client(), client()
    data = _pairs(full)
    seqs = full._sequences(data)
    vocab, pad = full.model.config.vocab_size, full.tokenizer.pad_token_id
    whole, small = 1e12, 3 * 10 * vocab * len(seqs)
    assert head_chunk_positions(vocab, len(seqs), small) == 3  # many pieces per sequence

    def run(c, head_bytes):
        plain = [lp.detach() for lp in token_logprobs(c.model, seqs, pad, head_bytes=head_bytes)]
        lps = token_logprobs(c.model, seqs, pad, grad=True, head_bytes=head_bytes)
        sum((lp * (i + 1)).sum() for i, lp in enumerate(lps)).backward()
        return plain, lps

    ref_plain, ref_grad = run(full, whole)
    got_plain, got_grad = run(chunked, small)
    for got, want in zip(got_plain + got_grad, ref_plain + ref_grad):
        torch.testing.assert_close(got.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    g_full, g_chunked = _grads(full), _grads(chunked)
    assert g_full.keys() == g_chunked.keys() and len(g_full) > 0
    assert any("lm_head" in k for k in g_full) == train_unembed
    # Sums over positions in another order: float32 noise, relative to each gradient's scale (this loss is
    # unnormalised, so gradients reach thousands; measured at most about 1e-6 of the largest entry)
    for k in g_full:
        scale = float(g_full[k].abs().max())
        assert float((g_chunked[k] - g_full[k]).abs().max()) <= 1e-5 * scale + 1e-7, k
