"""Decode steps for a plain Llama model without the transformers module stack.

Sampling a small model one token at a time is bound by per-call overhead, not arithmetic: a
transformers forward builds masks, walks a cache object that concatenates its tensors at every step,
and calls a few dozen modules per layer. `LlamaDecode` takes over after the prompt's forward: it copies
that forward's cache into tensors sized for the whole answer, writes each new key and value in place,
and runs each layer as a handful of tensor operations on the model's own weights (the same
operations, in the same order, as the model's forward: RMSNorm in float32, rotary embeddings from the
model's own rotary module, scaled-dot-product attention, SiLU MLP). Only models it reproduces exactly
qualify (`supports`); any other model decodes through its own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(model, past=None) -> bool:
    """A plain `LlamaForCausalLM` (no adapter wrapper, no biases, SiLU, no logit scaling), and a prompt cache
    (`past`, when given) that holds each layer's keys and values as tensors."""
    cfg = getattr(model, "config", None)
    layers = getattr(past, "layers", None) if past is not None else []
    return (
        layers is not None
        and all(isinstance(getattr(layer, "keys", None), torch.Tensor) for layer in layers)
        and type(model).__name__ == "LlamaForCausalLM"
        and getattr(cfg, "model_type", None) == "llama"
        and getattr(cfg, "hidden_act", None) == "silu"
        and not getattr(cfg, "attention_bias", True)
        and not getattr(cfg, "mlp_bias", True)
        and getattr(cfg, "pretraining_tp", 1) == 1
        and getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
        and all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in model.model.layers)
    )


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    if x.dtype == torch.float32:  # the same arithmetic as below, as one operation
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LlamaDecode:
    """One token per row per `step`, continuing from a prompt forward's cache (`past`, left-padded rows)."""

    def __init__(self, model, past, mask: torch.Tensor, max_new: int):
        self.model = model
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        n, width = mask.shape
        self.length = width
        total = width + max_new
        layers = past.layers
        like = layers[0].keys
        self.keys = like.new_zeros((len(layers), n, self.kv_heads, total, self.head_dim))
        self.values = torch.zeros_like(self.keys)
        for i, layer in enumerate(layers):
            self.keys[i, :, :, :width] = layer.keys
            self.values[i, :, :, :width] = layer.values
        self.valid = torch.zeros((n, total), dtype=torch.bool, device=mask.device)
        self.valid[:, :width] = mask.bool()
        self.weights = [_layer_weights(layer, _fuse(model)) for layer in model.model.layers]

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (rows x vocab) of the next token, given each row's newest token and its position."""
        base = self.model.model
        t = self.length
        self.valid[:, t] = True
        self.length += 1
        x = base.embed_tokens(ids[:, None])
        cos, sin = base.rotary_emb(x, positions[:, None])
        cos, sin = cos[:, None], sin[:, None]
        n, q_width = x.shape[0], self.heads * self.head_dim
        attn_mask = self.valid[:, None, None, : t + 1]
        for i, (layer, w) in enumerate(zip(base.layers, self.weights)):
            h = _rms(x, layer.input_layernorm)
            qkv = [F.linear(h, m) for m in w["qkv"]] if isinstance(w["qkv"], tuple) else [F.linear(h, w["qkv"])]
            qkv = torch.cat(qkv, dim=-1) if len(qkv) > 1 else qkv[0]
            # q and k rotate together: one set of operations for both
            qk = _rotate(qkv[..., : q_width + self.kv_heads * self.head_dim].view(n, 1, -1, self.head_dim), cos, sin)
            q = qk[:, :, : self.heads].transpose(1, 2)
            k = qk[:, :, self.heads :].transpose(1, 2)
            v = qkv[..., q_width + self.kv_heads * self.head_dim :].view(n, 1, self.kv_heads, self.head_dim)
            self.keys[i, :, :, t] = k[:, :, 0]
            self.values[i, :, :, t] = v[:, 0]
            out = F.scaled_dot_product_attention(
                q,
                self.keys[i, :, :, : t + 1],
                self.values[i, :, :, : t + 1],
                attn_mask=attn_mask,
                scale=layer.self_attn.scaling,
                enable_gqa=self.heads != self.kv_heads,
            )
            x = x + F.linear(out.transpose(1, 2).reshape(n, 1, -1), w["o"])
            h = _rms(x, layer.post_attention_layernorm)
            if isinstance(w["gate_up"], tuple):
                gate, up = (F.linear(h, m) for m in w["gate_up"])
            else:
                gate, up = F.linear(h, w["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w["down"])
        return F.linear(_rms(x, base.norm)[:, 0], self.model.lm_head.weight)


# Below this many weight bytes a decode step is bound by the number of operations, not by arithmetic: the
# projections that read the same input run as one matrix product (copies of their weights, concatenated).
_FUSE_BELOW_BYTES = 2**28


def _fuse(model) -> bool:
    return sum(p.numel() * p.element_size() for p in model.parameters()) < _FUSE_BELOW_BYTES


def _layer_weights(layer, fuse: bool) -> dict:
    a, m = layer.self_attn, layer.mlp
    qkv = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
    gate_up = (m.gate_proj.weight, m.up_proj.weight)
    if fuse:
        qkv, gate_up = torch.cat(qkv, dim=0), torch.cat(gate_up, dim=0)
    return {"qkv": qkv, "o": a.o_proj.weight, "gate_up": gate_up, "down": m.down_proj.weight}
