"""The embedded default base model `tiny`: a small Llama built deterministically offline.

A byte-level BPE tokenizer with a ChatML template is trained on text the project ships, then a
4-layer Llama is briefly warmed up on chat-formatted conversations made from the same text, so that
it speaks in turns and ends them with <|im_end|>. Nothing is downloaded; the result is cached in the
workspace under a name derived from the recipe, so a changed recipe never reuses a stale model.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from pathlib import Path

from character import progress

TINY_RECIPE = {
    "version": 1,
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "warmup_steps": 200,
    "warmup_batch": 16,
    "warmup_max_len": 160,
    "seed": 1234,
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[list[dict]]:
    """Deterministic chat conversations built from the shipped personas and prompts."""
    from character.constitution import load_constitution, shipped_personas
    from character.prompts import GREETINGS, REFLECTION_PROMPTS, general_prompts

    rng = random.Random(TINY_RECIPE["seed"])
    personas = [load_constitution(n) for n in shipped_personas()]
    questions = [q for c in personas for q in c.questions] + general_prompts() + REFLECTION_PROMPTS + GREETINGS
    convos = []
    for i in range(1200):
        c = personas[i % len(personas)]
        answer = " ".join(rng.choice(c.traits).trait for _ in range(rng.randint(1, 2)))
        msgs = [{"role": "user", "content": rng.choice(questions)}, {"role": "assistant", "content": answer}]
        if i % 5 == 0:
            msgs += [{"role": "user", "content": rng.choice(questions)},
                     {"role": "assistant", "content": rng.choice(c.traits).trait}]
        convos.append(msgs)
    return convos


def recipe_digest() -> str:
    body = json.dumps({"recipe": TINY_RECIPE, "corpus": _corpus(), "template": CHAT_TEMPLATE}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def _build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_RECIPE["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_model(out: Path) -> Path:
    """Build the tiny model into `out` (atomically: a temp folder renamed into place)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    r = TINY_RECIPE
    convos = _corpus()
    # Warm-up runs on at most two threads so that the bits depend little on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        tokenizer = _build_tokenizer([m["content"] for c in convos for m in c])
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad = tokenizer.convert_tokens_to_ids("<|pad|>")
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=r["hidden_size"],
            intermediate_size=r["intermediate_size"],
            num_hidden_layers=r["num_hidden_layers"],
            num_attention_heads=r["num_attention_heads"],
            num_key_value_heads=r["num_key_value_heads"],
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        torch.manual_seed(r["seed"])
        model = LlamaForCausalLM(config)
        seqs = [
            tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)[: r["warmup_max_len"]] for c in convos
        ]
        _warm_up(model, seqs, pad)
    finally:
        torch.set_num_threads(threads)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad).save_pretrained(tmp)
    (tmp / "character_recipe.json").write_text(json.dumps({"recipe": r, "digest": recipe_digest()}, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _warm_up(model, seqs: list[list[int]], pad: int) -> None:
    import torch

    r = TINY_RECIPE
    rng = random.Random(r["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0)
    steps, bsz = r["warmup_steps"], r["warmup_batch"]
    model.train()
    for step in range(steps):
        batch = [seqs[rng.randrange(len(seqs))] for _ in range(bsz)]
        width = max(len(s) for s in batch)
        ids = torch.full((bsz, width), pad, dtype=torch.long)
        mask = torch.zeros((bsz, width), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        for g in opt.param_groups:
            g["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        progress.report("building the tiny model (once per recipe)", step + 1, steps)
    model.eval()


def tiny_model_path(models_dir: Path) -> Path:
    """The cached tiny model for the current recipe, built on first use."""
    path = Path(models_dir) / f"tiny-{recipe_digest()}"
    if not (path / "config.json").is_file():
        build_tiny_model(path)
    return path
