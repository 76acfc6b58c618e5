"""The copy circuit written into `tiny` before its warm-up: an induction head, as pre-training gives one
to every real language model.

A real instruct model copies words from its prompt because pre-training on trillions of tokens formed
induction heads in it: one head moves each token's identity to the position after it ("the previous
token was X"), and a later head looks for an earlier position whose previous token is the current one and
predicts the token that stood there. Within a CPU budget a model trained from scratch never gets there
(measured on random-token copy tasks: no progress in 600 steps), so the recipe writes the two heads into
the initial weights and the warm-up learns everything else, above all *when* to copy.

Layout of the residual stream (hidden size d): dims [0, T) hold the token embedding, [T, T+k) the
previous token (written by layer 0), d-1 a constant (every embedding has `alpha` there) that gives the
previous-token head a content-free query. RoPE rotates each query/key pair i by position times
theta**(-2i/head_dim): the previous-token head matches on fast pairs (its score peaks at a distance of
one), the induction head on the slow pairs, which barely rotate over a few thousand positions, so it
matches on content alone. The output layer is not tied to the embedding (see `write_copy_circuit`). The written entries are frozen during the warm-up (`frozen_masks`), so what it
learns goes around the circuit rather than through it.
"""

from __future__ import annotations

import math


def _pairs(config) -> tuple[list[int], list[int]]:
    import torch

    hd = config.head_dim
    inv = config.rope_parameters["rope_theta"] ** (-torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
    fast = [i for i in range(hd // 2) if inv[i] > 0.05][:8]
    slow = [i for i in range(hd // 2) if inv[i] < 5e-4]
    return fast, slow, inv


def _distance_head(attn, hd: int, inv, fast: list[int], c: int, s: float, distance: int, head: int) -> None:
    """Query and key of `head` read only the constant, so its score depends on distance alone: the sum over
    the fast pairs of cos((distance' - distance) * theta_i), at least 0.10 lower at any other distance."""
    q, k = attn.q_proj.weight, attn.k_proj.weight
    half, base = hd // 2, head * hd
    for i in fast:
        q[base + i, c] = s
        k[base + i, c] = s * math.cos(distance * inv[i])
        k[base + i + half, c] = s * math.sin(distance * inv[i])


def _embedding_and_output(model, T: int, r: float, alpha: float, c: int, g):
    """Token embeddings: random directions of norm r in dims [0, T), the constant alpha in dim c. The output
    layer is the embedding turned by a random rotation A (u_v = A e_v), which it returns: the induction head
    writes A e_j to predict j, while the current token's own embedding, still in the stream, scores about 0
    against its output row. Tied, that term makes every token predict itself."""
    import torch

    emb = model.model.embed_tokens.weight
    e = torch.randn(emb.shape[0], T, generator=g)
    emb.zero_()
    emb[:, :T] = e / e.norm(dim=1, keepdim=True) * r
    emb[:, c] = alpha
    turn = torch.linalg.qr(torch.randn(T, T, generator=g))[0]
    head = model.lm_head.weight
    head.zero_()
    head[:, :T] = emb[:, :T] @ turn.T
    return turn


def write_copy_circuit(model, circuit: dict, seed: int) -> None:
    """Write the previous-token heads (layer 0, heads 0 and 1: one and two tokens back) and the induction
    head (layer 1, head 0), which matches the current and the previous token against each position's two
    predecessors and predicts the token found there."""
    import torch

    cfg = model.config
    d, hd, T = cfg.hidden_size, cfg.head_dim, circuit["token_dims"]
    half, c = hd // 2, d - 1
    r, alpha = circuit["embedding_norm"], circuit["constant"]
    fast, slow, inv = _pairs(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        turn = _embedding_and_output(model, T, r, alpha, c, g)
        rms = math.sqrt((r * r + alpha * alpha) / d)  # the input norm divides by this

        dims = slow + [i + half for i in slow]
        n_a = len(dims) // 2 + len(dims) % 2  # slow dims matching the current token
        n_b = len(dims) - n_a  # ... and the previous one
        proj = torch.linalg.qr(torch.randn(T, n_a, generator=g))[0].T  # orthonormal rows
        P, P2 = T, T + n_a  # residual offsets: previous token (n_a dims), the one before (n_b dims)
        assert P2 + n_b < c, "the previous-token subspaces overlap the constant"

        a0 = model.model.layers[0].self_attn
        q, k, v, o = (p.weight for p in (a0.q_proj, a0.k_proj, a0.v_proj, a0.o_proj))
        q[: 2 * hd], k[: 2 * hd], v[: 2 * hd], o[:, : 2 * hd] = 0, 0, 0, 0
        s = math.sqrt(circuit["previous_logit"] / len(fast) * math.sqrt(hd) / 0.10) / (alpha / rms)
        _distance_head(a0, hd, inv, fast, c, s, distance=1, head=0)
        _distance_head(a0, hd, inv, fast, c, s, distance=2, head=1)
        for j in range(n_a):  # values on the head's slow dims; the output undoes the input norm
            v[dims[j], :T] = proj[j]
            o[P + j, dims[j]] = rms
        for j in range(n_b):
            v[hd + dims[j], :T] = proj[j]
            o[P2 + j, hd + dims[j]] = rms

        # Layer 1, head 0. Score of position j from position t, on the slow pairs (they barely rotate, so
        # the match is on content alone): <t, j-1> + <t-1, j-2> - <t, j>. The last term keeps it from
        # predicting the current token again, so one stutter does not lock into a loop ("make make make").
        a1 = model.model.layers[1].self_attn
        q, k, v, o = (p.weight for p in (a1.q_proj, a1.k_proj, a1.v_proj, a1.o_proj))
        q[:hd], k[:hd], v[:hd], o[:, :hd] = 0, 0, 0, 0
        rms1 = math.sqrt((r * r * (1 + len(dims) / T) + alpha * alpha) / d)
        unit = (r * r * n_a / T) / (rms1 * rms1) / math.sqrt(hd)  # score of one matching term at m = 1
        m = math.sqrt(circuit["match_logit"] / unit)
        for j in range(n_a):
            q[dims[j], :T] = m * proj[j]
            k[dims[j], P + j] = m
            k[dims[j], :T] = -circuit["repeat_penalty"] * m * proj[j]
        for j in range(n_b):
            q[dims[n_a + j], P + j] = m * circuit["bigram"]
            k[dims[n_a + j], P2 + j] = m
        out = torch.linalg.qr(torch.randn(T, hd, generator=g))[0].T
        v[:hd, :T] = out
        o[:T, :hd] = circuit["copy_gain"] * rms1 * turn @ out.T


def frozen_masks(model) -> dict[str, object]:
    """Gradient masks (1 = trained) for the entries `write_copy_circuit` wrote, by parameter name."""
    import torch

    hd, c = model.config.head_dim, model.config.hidden_size - 1
    masks = {}
    for name, p in model.named_parameters():
        mask = None
        if name == "model.embed_tokens.weight":
            mask = torch.ones_like(p)
            mask[:, c] = 0
        elif name.startswith(("model.layers.0.", "model.layers.1.")):
            if "input_layernorm" in name:
                mask = torch.zeros_like(p)
            elif any(x in name for x in ("q_proj", "k_proj", "v_proj")):
                mask = torch.ones_like(p)
                mask[: 2 * hd if ".0." in name else hd] = 0
            elif "o_proj" in name:
                mask = torch.ones_like(p)
                mask[:, : 2 * hd if ".0." in name else hd] = 0
        if mask is not None:
            masks[name] = mask
    return masks
