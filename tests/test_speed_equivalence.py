"""The local backend's fast paths compute what the slower ones did: one pass for a decomposable loss,
batched reference log-probs, the frozen head's gradient in its forward pass; a DPO build makes the
same adapter as with the paths it had before (two passes, one sequence per reference forward, the
head's backward through recomputed logits)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from adapters import saturated
from lora_training import lora_client, random_reference_logprobs, rendered_pairs
from tinker import types

from character.backend import generation
from character.backend.local import LocalService
from character.backend.local_memory import grouped_micro_batches
from character.settings import Workspace
from character.train.losses import DPOCoefficients, make_dpo_loss_fn
from character.train.renderer import Renderer, to_datum

COEF = DPOCoefficients(beta=0.1, nll_coef=0.1, kl_coef=0.001)


def _pairs(client, n: int) -> list[types.Datum]:
    return rendered_pairs(
        client,
        n,
        lambda i: (
            f"What about item {i}" + " really" * i + "?",
            f"Item {i}, darling, is a marvel" + " indeed" * (i + 1) + ".",
            f"Item {i} is a thing.",
        ),
    )


def _counting(client) -> list[bool]:
    """Record the `grad` flag of every scoring pass the client makes."""
    calls: list[bool] = []
    original = client._logprobs

    def counted(seqs, grad):
        calls.append(grad)
        return original(seqs, grad)

    client._logprobs = counted
    return calls


def test_grouped_micro_batches_keep_pairs_whole():
    assert grouped_micro_batches([5, 6, 7, 8, 9, 9], 4, 0, 2) == [[0, 1, 2, 3], [4, 5]]
    assert grouped_micro_batches([5, 6, 7, 8], 3, 0, 2) == [[0, 1], [2, 3]]  # 3 sequences: one pair each
    assert grouped_micro_batches([5, 6], 1, 0, 2) is None  # a pair over the size: two passes instead
    assert grouped_micro_batches([10, 10, 30, 10, 10, 10], None, 60, 2) == [[0, 1], [2, 3], [4, 5]]
    assert grouped_micro_batches([10, 10, 10, 10], None, 40, 2) == [[0, 1, 2, 3]]
    assert grouped_micro_batches([10, 40], None, 60, 2) is None  # the pair alone is 2 x 40 tokens


@pytest.mark.parametrize("kl_coef", [0.001, 0.5])
def test_one_pass_dpo_gradients_equal_the_two_pass_path(workdir, one_thread, kl_coef):
    """One pair per micro-batch: the decomposable loss scores each micro-batch once, with gradients; the same
    loss as a plain function takes the two passes. Same gradients (1e-5), loss and metrics."""
    one, two = lora_client(workdir, micro_batch_size=2), lora_client(workdir, micro_batch_size=2)
    data = _pairs(one, 4)
    refs = random_reference_logprobs(data)
    coef = DPOCoefficients(beta=0.1, nll_coef=0.1, kl_coef=kl_coef)
    loss_fn = make_dpo_loss_fn(refs, coef)
    calls_one, calls_two = _counting(one), _counting(two)
    out_one = one.forward_backward_custom(data, loss_fn).result()
    out_two = two.forward_backward_custom(data, lambda d, lp: loss_fn(d, lp)).result()
    assert calls_one == [True] * 4 and calls_two == [False] * 4 + [True] * 4
    for k, v in out_two.metrics.items():
        assert out_one.metrics[k] == pytest.approx(v, abs=1e-6), k
    for a, b in zip(out_one.loss_fn_outputs, out_two.loss_fn_outputs):
        torch.testing.assert_close(a["logprobs"].to_torch(), b["logprobs"].to_torch(), atol=1e-5, rtol=0)
    g_one = {k: p.grad for k, p in one.model.named_parameters() if p.grad is not None}
    g_two = {k: p.grad for k, p in two.model.named_parameters() if p.grad is not None}
    assert g_one.keys() == g_two.keys() and len(g_one) > 0
    for k in g_one:
        torch.testing.assert_close(g_one[k], g_two[k], atol=1e-5, rtol=1e-5)


def test_loss_parts_sum_to_the_batch_loss():
    g = torch.Generator().manual_seed(0)
    data = [to_datum(list(range(3, 3 + n)), [0.0] * 3 + [1.0] * (n - 3)) for n in (7, 9, 8, 12, 6, 10)]
    pol = [-torch.rand(len(d.model_input.to_ints()), generator=g) for d in data]
    refs = [(-torch.rand(len(d.model_input.to_ints()), generator=g)).tolist() for d in data]
    loss_fn = make_dpo_loss_fn(refs, COEF)
    whole, _ = loss_fn(data, pol)
    parts = [loss_fn.part(data, idx, [pol[i] for i in idx]) for idx in ([0, 1], [2, 3, 4, 5])]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)
    with pytest.raises(ValueError, match="whole pairs"):
        loss_fn.part(data, [1, 2], pol[1:3])


def test_batched_reference_logprobs_equal_one_at_a_time(workdir, one_thread, monkeypatch):
    import random

    from character.backend import local_sampling

    svc = LocalService(Workspace(workdir), device="cpu")
    sampler = svc.create_sampling_client(base_model="tiny")
    rng = random.Random(0)
    seqs = [[rng.randrange(3, 1000) for _ in range(n)] for n in (300, 5, 280, 120, 40, 41, 260, 180, 7, 64)]
    forwards = []
    real = local_sampling.token_logprobs
    monkeypatch.setattr(
        local_sampling, "token_logprobs", lambda m, s, *a, **k: forwards.append(len(s)) or real(m, s, *a, **k)
    )
    futures = [sampler.compute_logprobs(types.ModelInput.from_ints(s)) for s in seqs]
    batched = [f.result() for f in futures]
    assert forwards == [len(seqs)]  # the whole queue in one padded micro-batch (it fits the budget)
    for s, got in zip(seqs, batched):
        alone = real(sampler.model, [s], sampler.tokenizer.pad_token_id)[0]
        assert got[0] is None and len(got) == len(s)
        # 1e-5, or a few float32 steps of a log-prob near -14 (measured: 1.1e-5 there, 8e-7 relative)
        torch.testing.assert_close(torch.tensor(got[1:]), alone, atol=1e-5, rtol=1e-6)
    # A budget for about one sequence at a time splits the queue into several micro-batches, same values.
    per_token = local_sampling.inference_bytes_per_token(sampler.model.config, 300, torch.device("cpu"))
    sampler.memory_budget_gb = 2 * 300 * per_token / 2**30
    forwards.clear()
    again = [f.result() for f in [sampler.compute_logprobs(types.ModelInput.from_ints(s)) for s in seqs]]
    assert len(forwards) > 3
    for a, b in zip(again, batched):
        torch.testing.assert_close(torch.tensor(a[1:]), torch.tensor(b[1:]), atol=1e-5, rtol=1e-6)


def _head_as_before(hidden, weight, targets, chunk):
    """The head as it ran before: each chunk through autograd under activation checkpointing."""
    from torch.utils.checkpoint import checkpoint

    def piece(h, t):
        logits = (h @ weight.T).float()
        return logits.gather(-1, t[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)

    run = (lambda h, t: checkpoint(piece, h, t, use_reentrant=False)) if torch.is_grad_enabled() else piece
    return torch.cat(
        [run(hidden[:, k : k + chunk], targets[:, k : k + chunk]) for k in range(0, hidden.shape[1], chunk)], 1
    )


def _dpo_build(workdir: Path, run: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from benchmarks.data import preference_rows
    from character.config import OptimConfig
    from character.storage import uri_to_path
    from character.train.dpo import run_dpo

    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(12)))
    svc = LocalService(Workspace(workdir), device="cpu", seed=0, micro_batch_size=4)
    result = run_dpo(
        svc,
        start=lambda: svc.create_lora_training_client("tiny", rank=8, seed=0),
        reference=lambda: svc.create_sampling_client(base_model="tiny"),
        renderer=Renderer(svc.get_tokenizer("tiny")),
        data_path=data,
        run_dir=workdir / run,
        cfg=OptimConfig(batch_size=8, epochs=1, save_every=100),  # the paper's learning rate, 5e-5
        coef=COEF,
        max_length=1024,
    )
    return load_file(uri_to_path(result.sampler) / "adapter_model.safetensors")


def assert_same_adapter(new: dict, before: dict, steps: int, lr: float) -> None:
    """Every element within 1e-5; in the LoRA of the saturated heads' query and key, a few elements (under
    10%) may differ by up to `steps` Adam steps of `lr`. Training moved the adapter (LoRA B starts at 0)."""
    assert new.keys() == before.keys() and len(new) > 0
    for k in new:
        d = (new[k] - before[k]).abs()
        if saturated(k):
            assert float(d.max()) <= 2 * steps * lr and float((d > 1e-5).float().mean()) < 0.1, (k, float(d.max()))
        else:
            torch.testing.assert_close(new[k], before[k], atol=1e-5, rtol=0)
    assert max(float(v.abs().max()) for v in new.values()) > 5e-5


@pytest.mark.slow
def test_dpo_build_makes_the_same_adapter_as_the_paths_before(workdir, one_thread, monkeypatch):
    """12 pairs, batch 8 (a full and a partial step), micro-batches of 4 sequences, the default optimizer.
    The paper's learning rate, 5e-5 (assert_same_adapter; measured: 4 of 2048 elements of layer 1's query
    LoRA A differ by at most 4.7e-5, every other element within 1e-5)."""
    new = _dpo_build(workdir, "new")
    from character.backend import local_sampling
    from character.train import dpo

    with monkeypatch.context() as m:
        plain = make_dpo_loss_fn  # a plain function: no `part`, so the two-pass path
        m.setattr(dpo, "make_dpo_loss_fn", lambda ref, coef: lambda d, lp: plain(ref, coef)(d, lp))
        m.setattr(
            local_sampling.LocalSamplingClient, "_scoring_batches", lambda self, seqs: [[i] for i in range(len(seqs))]
        )
        m.setattr(generation._FrozenHeadLogprobs, "apply", _head_as_before)
        before = _dpo_build(workdir, "before")
    assert_same_adapter(new, before, steps=2, lr=5e-5)


def _sft_build(workdir: Path, run: str, batch: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from benchmarks.data import preference_rows
    from character.config import OptimConfig
    from character.storage import uri_to_path
    from character.train.sft import run_sft

    data = workdir / "conversations.jsonl"  # the pairs' teacher sides as conversations: 12 of them
    rows = [{"messages": r["prompt"] + r["chosen"]} for r in preference_rows(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    svc = LocalService(Workspace(workdir), device="cpu", seed=0, micro_batch_size=4)
    result = run_sft(
        svc,
        start=lambda: svc.create_lora_training_client("tiny", rank=8, seed=0),
        renderer=Renderer(svc.get_tokenizer("tiny")),
        data_path=data,
        run_dir=workdir / run,
        cfg=OptimConfig(batch_size=batch, epochs=1, save_every=100),
        max_length=1024,
    )
    return load_file(uri_to_path(result.sampler) / "adapter_model.safetensors")


@pytest.mark.slow
def test_sft_build_makes_the_same_adapter_as_the_head_before(workdir, one_thread, monkeypatch):
    """SFT goes through the changed frozen head too (its gradient computed in the forward pass): the
    same 12 conversations (two steps) with the head as it ran before give the same adapter
    (assert_same_adapter; measured: 177 and 96 of 4096 elements of layer 0's query and key LoRA B differ,
    by at most 8.8e-5, every other element within 1e-7)."""
    new = _sft_build(workdir, "sft-new", 8)
    with monkeypatch.context() as m:
        m.setattr(generation._FrozenHeadLogprobs, "apply", _head_as_before)
        before = _sft_build(workdir, "sft-before", 8)
    assert_same_adapter(new, before, steps=2, lr=5e-5)


def test_lean_decode_steps_equal_the_model_forward(base, one_thread):
    """The decode steps without the module stack give the model's own logits (left-padded rows, a cache)."""
    from character.backend import local_decode

    assert local_decode.supports(base)
    prompts = [[5, 9, 40, 41, 42, 7], [8, 8, 100], [300, 301, 302, 303, 304, 305, 306, 307]]
    ids, mask = generation._left_padded(prompts, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        fast = local_decode.LlamaDecode(base, getattr(out, kw), mask, 5)
        past, last = getattr(out, kw), positions[:, -1]
        for step in range(5):
            nxt = torch.tensor([11 + step, 200 + step, 900 - step])
            last = last + 1
            mask = torch.cat([mask, torch.ones((3, 1), dtype=mask.dtype)], dim=1)
            ref = base(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], **{kw: past})
            past = getattr(ref, kw)
            torch.testing.assert_close(fast.step(nxt, last), ref.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_greedy_sampling_gives_the_tokens_of_transformers_generate(base, tiny_dir, one_thread):
    from transformers import AutoTokenizer

    from character.backend.generation import SampleRequest, sample_batch

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = [tok(q)["input_ids"] for q in ("Hello there, who are you?", "Tell me a story.", "Why is the sky blue?")]
    stops = frozenset({tok.eos_token_id})
    reqs = [SampleRequest(p, 0, 24, 0.0, 1.0, 0, stops, ()) for p in prompts]
    ours = [r.tokens for r in sample_batch(base, reqs, tok.pad_token_id)]
    ids, mask = generation._left_padded(prompts, tok.pad_token_id)
    with torch.inference_mode():
        out = base.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    for row, got in zip(out[:, ids.shape[1] :].tolist(), ours):
        cut = next((k + 1 for k, t in enumerate(row) if t == tok.eos_token_id), len(row))
        assert got == row[:cut]
