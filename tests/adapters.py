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


def untrained_adapter(base, out: Path) -> Path:
    """A PEFT LoRA adapter as PEFT starts it (B zero, so the base's outputs): what a fabricated build
    records as its models."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.save_pretrained(out)
    return out


# Layers 0 and 1 hold the tiny model's written heads (character.backend.tiny_circuit), whose attention is
# saturated (score margins of 16 to 100): the LoRA gradient of their query and key is float noise there,
# and Adam's first steps (about lr x sign(g)) turn noise into up to a step per step. Comparisons of two
# trainings that differ only in rounding allow those entries that much.
SATURATED = (
    "layers.0.self_attn.q_proj.",
    "layers.0.self_attn.k_proj.",
    "layers.1.self_attn.q_proj.",
    "layers.1.self_attn.k_proj.",
)


def saturated(name: str) -> bool:
    return any(part in name for part in SATURATED)


# A request made again after a fault is computed outside its first padded batch (reference log-probs,
# samples), and the loopback service batches whatever arrives together: equal to float rounding
# (tests/test_speed_equivalence.py, 1e-5), which Adam's first steps magnify in near-zero gradients. One
# training step more or less moves every weight by about the learning rate (1e-3 on tiny, a hundred times
# this bound at tiny's largest weight), so the bound still catches a step replayed or lost.
SAME_TRAINING_REL = 1e-3
# In the saturated heads' query and key (measured: 0.036 of max |W| after a build with 20% faults): a
# gross error (a wrong gradient, a step applied twice everywhere) is still caught there.
SATURATED_REL = 0.1


def assert_same_training(got: dict, want: dict, label: str = "") -> float:
    """`got` is the adapter `want` is, up to rounding: same tensors, max |dW| within SAME_TRAINING_REL of
    max |W|, except the saturated heads' query and key (SATURATED), where noise-level gradients let Adam's
    steps differ: those within SATURATED_REL. A replayed or lost step still shows, in every other tensor.
    Returns the measured ratio outside them (printed, with theirs, so a run shows how close it came)."""
    assert got.keys() == want.keys(), label
    scale = max(float(want[k].abs().max()) for k in want)

    def worst(keys) -> float:
        return max((float((got[k].float() - want[k].float()).abs().max()) for k in keys), default=0.0)

    diff, noisy = worst([k for k in want if not saturated(k)]), worst([k for k in want if saturated(k)])
    ratio = diff / scale
    print(
        f"{label} adapter vs reference: max |dW| {diff:.3g} of max |W| {scale:.3g} ({ratio:.2g}); "
        f"in the saturated heads' query and key {noisy:.3g} ({noisy / scale:.2g})"
    )
    assert ratio <= SAME_TRAINING_REL, f"{label}: max |dW| {diff:.3g} is {ratio:.2g} of max |W| {scale:.3g}"
    assert noisy <= SATURATED_REL * scale, f"{label}: saturated heads' max |dW| {noisy:.3g} of {scale:.3g}"
    return ratio
