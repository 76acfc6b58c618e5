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
        n = x.shape[0]
        attn_mask = self.valid[:, None, None, : t + 1]
        for i, layer in enumerate(base.layers):
            a = layer.self_attn
            h = _rms(x, layer.input_layernorm)
            q = F.linear(h, a.q_proj.weight).view(n, 1, self.heads, self.head_dim).transpose(1, 2)
            k = F.linear(h, a.k_proj.weight).view(n, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = F.linear(h, a.v_proj.weight).view(n, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            self.keys[i, :, :, t] = k[:, :, 0]
            self.values[i, :, :, t] = v[:, :, 0]
            out = F.scaled_dot_product_attention(
                q,
                self.keys[i, :, :, : t + 1],
                self.values[i, :, :, : t + 1],
                attn_mask=attn_mask,
                scale=a.scaling,
                enable_gqa=self.heads != self.kv_heads,
            )
            x = x + F.linear(out.transpose(1, 2).reshape(n, 1, -1), a.o_proj.weight)
            m = layer.mlp
            h = _rms(x, layer.post_attention_layernorm)
            x = x + F.linear(
                F.silu(F.linear(h, m.gate_proj.weight)) * F.linear(h, m.up_proj.weight), m.down_proj.weight
            )
        return F.linear(_rms(x, base.norm)[:, 0], self.model.lm_head.weight)
