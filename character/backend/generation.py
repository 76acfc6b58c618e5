"""Batched sampling and scoring for a Hugging Face causal LM (the local backend's engine).

Prompts are left-padded into one batch with an attention mask and a KV cache. Each row draws
from its own `torch.Generator`, so a row's sample depends on its seed alone, not on which other
prompts shared its batch.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from character.backend import local_decode


@dataclass
class SampleRequest:
    tokens: list[int]
    seed: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"


def _pick_rows(
    logits: torch.Tensor, rows: list[int], requests: list[SampleRequest], gens: list[torch.Generator]
) -> dict[int, tuple[int, float]]:
    """The next token and its log-prob for each row in `rows`, rows with the same settings at once.

    Sampling is by inverse CDF with one uniform draw from the row's own generator, so a row's
    token depends on its seed and logits alone, never on the other rows.
    """
    groups: dict[tuple, list[int]] = {}
    for i in rows:
        r = requests[i]
        groups.setdefault((r.temperature, r.top_p, r.top_k), []).append(i)
    out: dict[int, tuple[int, float]] = {}
    for (temperature, top_p, top_k), idx in groups.items():
        x = logits[idx]
        if temperature <= 0:
            logp = torch.log_softmax(x, -1)
            tok = x.argmax(-1)
        else:
            logp = torch.log_softmax(x / temperature, -1)
            probs = logp.exp()
            if 0 < top_k < probs.shape[-1]:
                kth = torch.topk(probs, top_k, dim=-1).values[:, -1:]
                probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
            if top_p < 1.0:
                sorted_p, order = torch.sort(probs, dim=-1, descending=True)
                # keep the smallest prefix whose mass reaches top_p (always at least the top token)
                drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            cdf = probs.cumsum(-1)
            u = torch.stack([torch.rand((), generator=gens[i], dtype=cdf.dtype) for i in idx])
            tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
        chosen = logp.gather(-1, tok[:, None])[:, 0]
        for i, t, lp in zip(idx, tok.tolist(), chosen.tolist()):
            out[i] = (t, lp)
    return out


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one left-padded batch of ids, and its attention mask."""
    width = max(len(t) for t in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, t in enumerate(prompts):
        ids[i, width - len(t) :] = torch.tensor(t)
        mask[i, width - len(t) :] = 1
    return ids, mask


def _stop_reason(r: SampleRequest, tokens: list[int], decode) -> str | None:
    """'stop' when the newest token, or the recent text, ends the request; 'length' at its token limit."""
    if tokens[-1] in r.stop_tokens:
        return "stop"
    if r.stop_strings and decode is not None and any(s in decode(tokens[-32:]) for s in r.stop_strings):
        return "stop"
    return "length" if len(tokens) >= r.max_tokens else None


@torch.inference_mode()
def sample_batch(model, requests: list[SampleRequest], pad_id: int, decode=None) -> list[SampleResult]:
    """Sample one continuation per request. `decode(tokens) -> str` is needed only for stop strings."""
    device = next(model.parameters()).device
    n = len(requests)
    ids, mask = _left_padded([r.tokens for r in requests], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    gens = [torch.Generator().manual_seed(r.seed) for r in requests]
    out_tokens: list[list[int]] = [[] for _ in requests]
    out_logps: list[list[float]] = [[] for _ in requests]
    reasons: list[str | None] = [None] * n

    # transformers 5 renamed `past_key_values` to `cache`; accept either.
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    # Only the last position's logits are needed: a prompt batch's full logits would be batch x width x vocab.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    past = getattr(out, cache_kw)
    logits = out.logits[:, -1, :].float().cpu()
    last_pos = positions[:, -1]
    steps = max(r.max_tokens for r in requests)
    fast = local_decode.LlamaDecode(model, past, mask, steps) if local_decode.supports(model, past) else None
    for step in range(steps):
        next_ids = torch.full((n,), pad_id, dtype=torch.long)
        for i, r in enumerate(requests):
            if reasons[i] is None and step >= r.max_tokens:
                reasons[i] = "length"
        live = [i for i in range(n) if reasons[i] is None]
        picks = _pick_rows(logits, live, requests, gens)
        for i in live:
            r = requests[i]
            tok, lp = picks[i]
            out_tokens[i].append(tok)
            out_logps[i].append(lp)
            next_ids[i] = tok
            reasons[i] = _stop_reason(r, out_tokens[i], decode)
        if all(x is not None for x in reasons):
            break
        last_pos = last_pos + 1
        if fast is not None:
            logits = fast.step(next_ids.to(device), last_pos).float().cpu()
            continue
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(
            input_ids=next_ids[:, None].to(device),
            attention_mask=mask,
            position_ids=last_pos[:, None],
            use_cache=True,
            **{cache_kw: past},
        )
        past = getattr(out, cache_kw)
        logits = out.logits[:, -1, :].float().cpu()
    return [SampleResult(t, lp, r or "length") for t, lp, r in zip(out_tokens, out_logps, reasons)]


def length_chunks(lengths: list[int], min_tokens: int = 2048, keep: float = 0.8) -> list[list[int]]:
    """Indices grouped by similar length, longest first, so padding stays under about 1 - keep of
    each chunk; a chunk is split only once it holds min_tokens, so small batches stay whole."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        cur = chunks[-1] if chunks else None
        if cur is None or (lengths[i] < keep * lengths[cur[0]] and len(cur) * lengths[cur[0]] >= min_tokens):
            chunks.append([])
        chunks[-1].append(i)
    return chunks


def token_logprobs(
    model, sequences: list[list[int]], pad_id: int, grad: bool = False, head_bytes: float | None = None
) -> list[torch.Tensor]:
    """log p(tokens[t] | tokens[:t]) for t >= 1, per sequence, in the order given.

    Sequences run in right-padded chunks of similar length (one forward each): padding to the
    longest sequence of a mixed batch would waste a third or more of the compute on real data.
    `head_bytes`: what the output layer's logits may take at once (None: HEAD_BYTES).
    """
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for chunk in length_chunks([len(s) for s in sequences]):
        seqs = [sequences[i] for i in chunk]
        for i, lp in zip(chunk, _padded_logprobs(model, seqs, pad_id, grad, head_bytes or HEAD_BYTES)):
            out[i] = lp
    return out


def _padded_logprobs(model, sequences: list[list[int]], pad_id: int, grad: bool, head_bytes: float) -> list:
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    parts = _decoder_and_head(model)
    if parts is not None:
        # With a large vocabulary the batch's logits are the biggest tensor by far (8 x 1024 positions x 128k
        # floats is 4 GB): the head runs a bounded number of positions at a time, with gradients or without.
        positions = head_chunk_positions(parts[1].weight.shape[0], len(sequences), head_bytes)
        return _chunked_head_logprobs(*parts, ids, mask, sequences, positions, grad)
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1, :].float()
        # x[t] - logsumexp(x) keeps one float copy of the logits for backward (log_softmax would keep its
        # output as well): the logits dominate activation memory with a large vocabulary.
        logp = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return [logp[i, : len(s) - 1] for i, s in enumerate(sequences)]


# What one head chunk may take when the caller has no memory budget: 2**25 logits (a 128k vocabulary gives
# ~260 positions per chunk; the tiny model's 2k vocabulary, one chunk for any batch it sees).
HEAD_BYTES = 2**25 * 10
# Bytes per logit while a chunk is live: the logits in the model's dtype and in float32, and their softmax.
_BYTES_PER_LOGIT = 10


def head_chunk_positions(vocab: int, rows: int, head_bytes: float) -> int:
    """Positions per head chunk for `rows` sequences, so that the chunk's logits fit `head_bytes`."""
    return max(1, int(head_bytes // (_BYTES_PER_LOGIT * vocab * max(1, rows))))


# Models whose logits are the head applied to the decoder's last hidden state, nothing more (no logit
# scale or soft-capping): for these, the head runs in chunks (below).
_PLAIN_HEAD = ("llama", "mistral", "qwen2", "qwen3")


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if getattr(cfg, "model_type", None) not in _PLAIN_HEAD or not hasattr(base, "get_decoder"):
        return None
    return base.get_decoder(), base.get_output_embeddings()


def _chunked_head_logprobs(decoder, head, ids, mask, sequences, chunk: int, grad: bool) -> list[torch.Tensor]:
    """Log-probs without ever holding the batch's logits: the head runs over `chunk` positions at a time.

    A frozen plain head (LoRA leaves it alone unless it trains the unembedding) gets its gradient with
    respect to the hidden states in the same pass (`_FrozenHeadLogprobs`): backward then keeps no logits
    and recomputes none. A trained head runs each chunk under activation checkpointing instead, so
    backward keeps only the hidden states and recomputes each chunk's logits.
    """
    from torch.utils.checkpoint import checkpoint

    with torch.set_grad_enabled(grad):
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
        targets = ids[:, 1:]
        frozen = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
        if frozen:
            logp = _FrozenHeadLogprobs.apply(hidden, head.weight, targets, chunk)
        else:
            piece = functools.partial(_head_piece, head)
            run = (lambda h, t: checkpoint(piece, h, t, use_reentrant=False)) if grad else piece
            pieces = [
                run(hidden[:, k : k + chunk], targets[:, k : k + chunk]) for k in range(0, hidden.shape[1], chunk)
            ]
            logp = torch.cat(pieces, dim=1)
    return [logp[i, : len(s) - 1] for i, s in enumerate(sequences)]


def _head_piece(head, h, t):
    logits = head(h).float()
    return logits.gather(-1, t[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


class _FrozenHeadLogprobs(torch.autograd.Function):
    """log p(target) from hidden states through a frozen head, chunk by chunk. Its gradient with respect to
    the hidden state at a position is W[target] - softmax(logits) @ W (times the incoming scalar): computed
    while the chunk's logits are at hand, it leaves backward one multiplication, where autograd would keep
    (or recompute) every chunk's logits for a backward through the head."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        want_grad = ctx.needs_input_grad[0]
        logps, grads = [], []
        for k in range(0, hidden.shape[1], chunk):
            h, t = hidden[:, k : k + chunk].to(weight.dtype), targets[:, k : k + chunk]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, -1, keepdim=True)
            logps.append(logits.gather(-1, t[..., None]).squeeze(-1) - lse.squeeze(-1))
            if want_grad:
                probs = logits.sub_(lse).exp_().to(weight.dtype)
                grads.append((weight[t] - probs @ weight).to(hidden.dtype))
        if want_grad:
            ctx.save_for_backward(torch.cat(grads, dim=1))
        return torch.cat(logps, dim=1)

    @staticmethod
    def backward(ctx, grad_logp):
        (dlogp_dhidden,) = ctx.saved_tensors
        return grad_logp[..., None].to(dlogp_dhidden.dtype) * dlogp_dhidden, None, None, None
