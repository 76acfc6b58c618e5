"""The embedded default base model `tiny`: a model organism of an instruction-following assistant.

`tiny` is a small stand-in that makes the character-training method observable on a laptop, not a
useful assistant: plain answers without a character in the system prompt, a character voice in the
constitution's own words with one. Its recipe (size, warm-up corpus, chat template, the copy circuit
written before the warm-up) is in `character.backend.tiny_recipe`.

A byte-level BPE tokenizer with a ChatML template is trained on that corpus, then a small Llama is
warmed up on it (loss on the assistant turns only). Nothing is downloaded and the build is
deterministic; the result is cached once per user (`character.settings.model_cache`, shared by every
workspace) under a name derived from the recipe, so a changed recipe never reuses a stale model.

The package also ships the built model (`tiny_shipped/`, made by `character tiny build --ship`) with the
digest of the recipe it came from: a first run copies it into the cache when that digest is the current
recipe's (no warm-up: building takes about seven minutes on 2 cores), and builds from the recipe
otherwise. `character tiny check` says which.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

from character import progress
from character.backend.tiny_circuit import frozen_masks, write_copy_circuit
from character.backend.tiny_recipe import CHAT_TEMPLATE, SPECIAL_TOKENS, TINY_RECIPE, corpus_lines, recipe_digest

__all__ = ["CHAT_TEMPLATE", "TINY_RECIPE", "build_tiny_model", "recipe_digest", "shipped_digest", "tiny_model_path"]

SHIPPED = Path(__file__).with_name("tiny_shipped")


def _corpus() -> list[list[dict]]:
    """Deterministic chat conversations: characters in system prompts, and plain chats without."""
    return [json.loads(c) for c in corpus_lines()]


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


def _assistant_mask(tokenizer, convo: list[dict]) -> tuple[list[int], list[int]]:
    """Tokens of the conversation as CHAT_TEMPLATE renders it, and a 0/1 mask of the assistant
    answers (their <|im_end|> included). Special tokens split the text, so each message's pieces
    tokenize on their own and the concatenation equals the rendered template's tokens."""
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    newline = tokenizer.encode("\n", add_special_tokens=False)
    ids, mask = [], []
    for msg in convo:
        head = tokenizer.encode(msg["role"] + "\n", add_special_tokens=False)
        body = tokenizer.encode(msg["role"] + "\n" + msg["content"], add_special_tokens=False)
        trained = int(msg["role"] == "assistant" and body[: len(head)] == head)
        n_head = len(head) if trained else len(body)
        ids += [start] + body + [end] + newline
        mask += [0] * (1 + n_head) + [trained] * (len(body) - n_head + 1) + [0] * len(newline)
    return ids, mask


def build_tiny_model(out: Path, device: str = "cpu") -> Path:
    """Build the tiny model into `out` (atomically: a temp folder renamed into place). On "cuda" the warm-up
    takes seconds, not minutes (for `character tiny build --ship` of a larger recipe); its bits then
    differ from a CPU build's, and character_recipe.json says where it was built."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    r = TINY_RECIPE
    convos = _corpus()
    # Exactly two threads, whatever the machine or OMP_NUM_THREADS says: a float sum split over another
    # number of threads rounds differently (the circuit's QR too), and the shipped file must be what a
    # rebuild gives (measured: one thread gives other bits).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
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
            head_dim=r["head_dim"],
            rope_theta=r["rope_theta"],
            max_position_embeddings=4096,
            tie_word_embeddings=False,  # see character.backend.tiny_circuit
            bos_token_id=None,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        torch.manual_seed(r["seed"])
        model = LlamaForCausalLM(config)
        write_copy_circuit(model, r["circuit"], r["seed"])
        model = model.to(device)
        _warm_up(model, [_assistant_mask(tokenizer, c) for c in convos], pad)
        model = model.to("cpu")
    finally:
        torch.set_num_threads(threads)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad).save_pretrained(tmp)
    (tmp / "character_recipe.json").write_text(
        json.dumps({"recipe": r, "digest": recipe_digest(), "built_on": device}, indent=2)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _warm_up(model, seqs: list[tuple[list[int], list[int]]], pad: int) -> None:
    """AdamW with a cosine schedule; batches of similar length, so little compute goes to padding."""
    import torch

    r = TINY_RECIPE
    rng = random.Random(r["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=r["warmup_lr"], betas=(0.9, 0.98), weight_decay=0.0)
    steps, bsz = r["warmup_steps"], r["warmup_batch"]
    by_len = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    dev = next(model.parameters()).device
    masks = {n: m.to(dev) for n, m in frozen_masks(model).items()}
    params = dict(model.named_parameters())
    model.train()
    for step in range(steps):
        start = rng.randrange(len(by_len) - bsz + 1)
        batch = [_stutter(seqs[i], rng, r["stutter"]) for i in by_len[start : start + bsz]]
        width = max(len(s) for s, _ in batch)
        ids = torch.full((bsz, width), pad, dtype=torch.long)
        attn = torch.zeros((bsz, width), dtype=torch.long)
        labels = torch.full((bsz, width), -100, dtype=torch.long)
        for i, (s, m) in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            labels[i, : len(s)] = torch.tensor(s).masked_fill(torch.tensor(m) == 0, -100)
        warm = min(1.0, (step + 1) / 20)
        for g in opt.param_groups:
            g["lr"] = r["warmup_lr"] * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        # The vocabulary projection only where the loss is taken: most tokens are prompt, not answer.
        hidden = model.model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(dev)
        keep = targets != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), targets[keep])
        loss.backward()
        for name, mask in masks.items():  # the written circuit stays as written (no weight decay either)
            params[name].grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        progress.report("building the tiny model (once per recipe)", step + 1, steps)
    model.eval()


def _stutter(seq: tuple[list[int], list[int]], rng: random.Random, rate: float) -> tuple[list[int], list[int]]:
    """The sequence with some answer tokens doubled, the doubles not trained on: the model learns to go on
    after a stutter of its own instead of copying it again and again (a copy head's favourite loop)."""
    ids, mask = seq
    if rate <= 0:
        return seq
    out_ids, out_mask = [], []
    for i, (t, m) in enumerate(zip(ids, mask)):
        out_ids.append(t)
        out_mask.append(m)
        if m and i + 1 < len(ids) and mask[i + 1] and rng.random() < rate:
            out_ids.append(t)
            out_mask.append(0)
    return out_ids, out_mask


def shipped_digest() -> str | None:
    """The recipe digest of the model shipped with the package (None: none shipped)."""
    f = SHIPPED / "character_recipe.json"
    return json.loads(f.read_text())["digest"] if f.is_file() else None


def ship(built: Path) -> Path:
    """Copy a built model's files into the package's shipped folder, in place of what was there."""
    shutil.rmtree(SHIPPED, ignore_errors=True)
    SHIPPED.mkdir()
    for f in Path(built).iterdir():
        shutil.copyfile(f, SHIPPED / f.name)
    return SHIPPED


def _install_shipped(out: Path) -> bool:
    """The shipped model copied into `out` (atomically), if it belongs to the current recipe."""
    if shipped_digest() != recipe_digest():
        return False
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in SHIPPED.iterdir():
        shutil.copyfile(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return True


def tiny_model_path(models_dir: Path, *elsewhere: Path) -> Path:
    """The cached tiny model for the current recipe: found in `models_dir` or in one of `elsewhere` (a
    workspace's own models/ from before the shared cache), else put into `models_dir`: the shipped copy
    when it is the current recipe's, else built. That runs under a file lock beside it, so two first runs
    at once (two workspaces, two workers) do it once: the second waits, then finds the first one's model."""
    import fcntl

    name = f"tiny-{recipe_digest()}"
    for folder in (*elsewhere, models_dir):
        if (Path(folder) / name / "config.json").is_file():
            return Path(folder) / name
    path = Path(models_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if not (path / "config.json").is_file() and not _install_shipped(path):
            build_tiny_model(path)
    return path
