"""Random PEFT LoRA adapters on the tiny model, for the merge and fold tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def make_adapter(
    base, out: Path, r: int = 4, alpha: int = 8, seed: int = 0, targets=("q_proj", "v_proj", "down_proj"), **kw
) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B (PEFT starts B at zero), saved at `out`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(out)
    return out
