"""A base model on a device for the local backend: finding it, loading it and its tokenizer, and
choosing the layers LoRA adapts."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import torch

from character.backend.tiny import tiny_model_path
from character.config import check_local_model
from character.errors import UserError
from character.settings import Workspace, model_cache

# PEFT calls a transformers API that warns on every model wrap; it is not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
_ATTN_HINTS = ("attn", "attention")


def resolve_model(name: str, ws: Workspace) -> Path:
    """`tiny` is built once per user (the shared model cache; a copy already in the workspace's models/
    is used as it is); anything else must be a local HF model folder."""
    if name == "tiny":
        return tiny_model_path(model_cache(), ws.models)
    check_local_model(name)
    return Path(name).expanduser().resolve()


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


@lru_cache(maxsize=4)
def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(model_dir: Path, device: torch.device):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (LoRA weights stay float32); CPU runs in float32 as loaded."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def lora_target_modules(model, train_attn: bool, train_mlp: bool, train_unembed: bool) -> list[str]:
    """Leaf names of the linear layers to adapt, split into attention and MLP by their path."""
    attn, mlp = set(), set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        leaf = name.rsplit(".", 1)[-1]
        (attn if any(h in name for h in _ATTN_HINTS) else mlp).add(leaf)
    targets = (attn if train_attn else set()) | (mlp if train_mlp else set())
    if train_unembed:
        targets.add("lm_head")
    if not targets:
        raise UserError("LoRA has nothing to train: enable attention, MLP or unembedding layers")
    return sorted(targets)
