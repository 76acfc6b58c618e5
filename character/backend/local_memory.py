"""How many sequences the local backend puts in one forward/backward: an estimate of what a token
costs in memory, the memory there is, and the grouping of a batch into micro-batches."""

from __future__ import annotations

import os

import torch


def memory_budget_bytes(device: torch.device, budget_gb: float | None) -> float:
    """What activations may use: the given budget, else most of what is free on the device now."""
    if budget_gb is not None:
        return budget_gb * 2**30
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.7 * free
    avail = (
        next(
            (int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable")),
            8 * 2**30,
        )
        if os.path.exists("/proc/meminfo")
        else 8 * 2**30
    )
    return 0.5 * avail


def decoder_bytes_per_token(config, checkpointing: bool, device: torch.device) -> float:
    """A rough upper estimate of what the decoder layers keep for backward per trained token: about
    34 x hidden values per layer without checkpointing, 2 x hidden with it (bf16 on CUDA, float32 on CPU)."""
    cfg = getattr(config, "text_config", config)
    width = 2 if device.type == "cuda" else 4
    return cfg.num_hidden_layers * (2 if checkpointing else 34) * cfg.hidden_size * width


def activation_bytes_per_token(config, checkpointing: bool, device: torch.device) -> float:
    """A rough upper estimate of the memory one trained token costs: the layers' saved activations
    (`decoder_bytes_per_token`) plus the logits (float32 copies kept for the log-softmax and its backward)."""
    cfg = getattr(config, "text_config", config)
    width = 2 if device.type == "cuda" else 4
    return decoder_bytes_per_token(config, checkpointing, device) + cfg.vocab_size * (width + 2 * 4)


def inference_bytes_per_token(config, length: int, device: torch.device) -> float:
    """A rough upper estimate of what a scored token (no gradients) costs while one layer runs: the
    residual stream and its projections, the MLP's intermediate values and a row of attention scores."""
    cfg = getattr(config, "text_config", config)
    width = 2 if device.type == "cuda" else 4
    inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    return (8 * cfg.hidden_size + 3 * inter + cfg.num_attention_heads * length) * width


# The share of the budget one output-layer chunk may take, at the least the size it had when it was fixed.
# The chunk's logits exist while the decoder's activations are all held (the end of the forward pass), so
# every byte of it adds to the step's peak, and past a few hundred positions a bigger chunk adds little speed:
# at the default budget of an 80 GB GPU this is about 2**25 logits, where the peak matched TRL's.
HEAD_SHARE = 1 / 128
HEAD_FLOOR = 2**25 * 10


def head_bytes(budget: float, activations: float) -> float:
    """What the output layer's chunk may take: what the budget leaves after the micro-batch's activations,
    but no more than those activations (the chunk never more than doubles the peak) nor than HEAD_SHARE
    of the budget (or HEAD_FLOOR, if more); at least one position per chunk."""
    return max(1.0, min(budget - activations, activations, max(HEAD_SHARE * budget, HEAD_FLOOR)))


def micro_batches(lengths: list[int], size: int | None, token_budget: float) -> list[list[int]]:
    """Indices grouped into micro-batches, in order: `size` sequences each if given, else as many as
    keep (sequences x longest) within token_budget (at least one sequence each)."""
    if size is not None:
        return [list(range(k, min(k + size, len(lengths)))) for k in range(0, len(lengths), size)]
    out: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if out and (len(out[-1]) + 1) * max(longest, n) <= token_budget:
            out[-1].append(i)
            longest = max(longest, n)
        else:
            out.append([i])
            longest = n
    return out


def grouped_micro_batches(
    lengths: list[int], size: int | None, token_budget: float, group: int
) -> list[list[int]] | None:
    """Like `micro_batches`, but each run of `group` consecutive sequences (a DPO pair) stays in one
    micro-batch; None when one group alone is over `size` sequences or over token_budget."""
    if len(lengths) % group:
        return None
    units = [list(range(k, k + group)) for k in range(0, len(lengths), group)]
    if size is not None:
        per = size // group
        if per < 1:
            return None
        return [[i for u in units[k : k + per] for i in u] for k in range(0, len(units), per)]
    out: list[list[int]] = []
    longest = 0
    for u in units:
        n = max(lengths[i] for i in u)
        if group * n > token_budget:
            return None
        if out and (len(out[-1]) + group) * max(longest, n) <= token_budget:
            out[-1] += u
            longest = max(longest, n)
        else:
            out.append(list(u))
            longest = n
    return out
