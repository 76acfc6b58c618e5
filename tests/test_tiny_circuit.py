"""The copy circuit written into the tiny model (character.backend.tiny_circuit): before any training it
copies, and the warm-up leaves the written entries as they were."""

from __future__ import annotations

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from character.backend.tiny_circuit import frozen_masks, write_copy_circuit
from character.backend.tiny_recipe import TINY_RECIPE


def _wired() -> LlamaForCausalLM:
    r = TINY_RECIPE
    config = LlamaConfig(
        vocab_size=r["vocab_size"],
        hidden_size=r["hidden_size"],
        intermediate_size=r["intermediate_size"],
        num_hidden_layers=r["num_hidden_layers"],
        num_attention_heads=r["num_attention_heads"],
        num_key_value_heads=r["num_key_value_heads"],
        head_dim=r["head_dim"],
        rope_theta=r["rope_theta"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(r["seed"])
    model = LlamaForCausalLM(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as the build (character.backend.tiny): the QR's bits depend on it
    try:
        write_copy_circuit(model, r["circuit"], r["seed"])
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _copy_task(rng: random.Random, words: int) -> tuple[list[int], list[int]]:
    """Random "words" of 2-5 random tokens, then three of them again: every token of a repeated word but
    its first can only be predicted by finding the word earlier on and copying what followed."""
    bank = [[rng.randrange(10, 2000) for _ in range(rng.randint(2, 5))] for _ in range(words)]
    ids = [t for w in bank for t in w + [3]]
    targets = [0] * len(ids)
    for w in rng.sample(bank, 3):
        ids += [4] + w
        targets += [0, 0] + [1] * (len(w) - 1)
    return ids, targets


def test_the_untrained_circuit_copies_what_it_saw_earlier_in_the_context():
    """No warm-up at all: on 40 random words (about 200 tokens) the next token of a repeated word is
    predicted right almost always; with the circuit's heads cut out, at chance (1 in 2000)."""
    model = _wired()
    rng = random.Random(0)
    hits = {"wired": [], "cut": []}
    for _ in range(8):
        ids, targets = _copy_task(rng, words=40)
        x = torch.tensor([ids])
        for side in hits:
            with torch.no_grad():
                if side == "cut":
                    hd = model.config.head_dim
                    model.model.layers[1].self_attn.o_proj.weight[:, :hd] = 0
                pred = model(input_ids=x).logits[0, :-1].argmax(-1)
            hits[side] += [int(pred[i - 1] == ids[i]) for i, t in enumerate(targets) if t]
        model = _wired()
    wired, cut = (sum(h) / len(h) for h in hits.values())
    assert wired >= 0.9, wired
    assert cut <= 0.05, cut


def test_the_warm_up_leaves_the_written_circuit_as_written(tiny_dir):
    """The shipped (or built) model holds the circuit's entries bit for bit as written before warm-up."""
    from safetensors.torch import load_file

    fresh = _wired()
    built = load_file(str(tiny_dir / "model.safetensors"))
    params = dict(fresh.named_parameters())
    checked = 0
    for name, mask in frozen_masks(fresh).items():
        frozen = mask == 0
        assert torch.equal(built[name][frozen], params[name].detach()[frozen]), name
        checked += int(frozen.sum())
    assert checked > 10_000
