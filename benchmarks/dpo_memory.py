"""7. One DPO step at real model width: peak memory, ours vs TRL's DPOTrainer, same micro-batch and accumulation.

A random-weight model of Llama-3.2-1B's shape (hidden 2048, 32 heads, 8 KV heads, MLP 8192, vocab
128256, tied embeddings; 16 layers, or fewer with --layers), LoRA r=64 on every linear layer, `pairs`
preference pairs of `length` tokens per sequence (prompt a quarter of it), micro-batches of
`micro_pairs` pairs accumulated to the full batch on both sides. Ours: reference log-probs (a sampling
client, freed before training), then one forward_backward_custom with our DPO loss and one optimizer step;
TRL: `DPOTrainer.train()` for one step (its reference is the adapter-disabled model, every step).
Peak memory: torch.cuda.max_memory_allocated on CUDA, else the process's peak RSS (wait4).

    python -m benchmarks.dpo_memory                       # CPU: 1 layer, 2 pairs x 256 tokens
    python -m benchmarks.dpo_memory --device cuda --layers 16 --pairs 32 --length 1024 --micro-pairs 4
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

from benchmarks.measure import Row, alternate

RANK, LR, BETA = 64, 5e-5, 0.1
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    head_dim=64,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    max_position_embeddings=4096,
)


def _dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def build_model(folder: str, layers: int, device: str) -> dict:
    """The random Llama-3.2-1B-shaped model, saved with the tiny model's tokenizer (ids < its vocab)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from character.backend.tiny import tiny_model_path

    out = Path(folder)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():  # an interrupted build redoes
        return {"path": folder}
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, **SHAPE)
    model = LlamaForCausalLM(cfg).to(_dtype(device))
    model.save_pretrained(out, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(tiny_model_path(out.parent.parent / "models"))
    tok.save_pretrained(out)
    return {"path": folder, "params": sum(p.numel() for p in model.parameters())}


def _texts(tok, pairs: int, length: int) -> list[dict]:
    """Plain-text pairs whose prompt+answer is `length` tokens on both sides (prompt: a quarter)."""
    import random

    rng = random.Random(0)
    words = ["alpha", "brisk", "cobalt", "dune", "ember", "fjord", "glint", "harbor", "ivory", "jolt"]

    def text(n_tokens: int) -> str:
        s = ""
        while len(tok(s, add_special_tokens=False)["input_ids"]) < n_tokens:
            s += " " + " ".join(rng.choice(words) for _ in range(8))
        ids = tok(s, add_special_tokens=False)["input_ids"][:n_tokens]
        return tok.decode(ids)

    return [
        {
            "prompt": text(length // 4),
            "chosen": text(length - length // 4 - 1),
            "rejected": text(length - length // 4 - 1),
        }
        for _ in range(pairs)
    ]


def _peak(device: str, started: float) -> dict:
    import torch

    out = {"seconds": time.perf_counter() - started}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def ours(
    model: str, workdir: str, device: str, pairs: int, length: int, micro_pairs: int, checkpointing: bool = False
) -> dict:
    import torch
    from tinker import types

    from character.backend.local import LocalService
    from character.settings import Workspace
    from character.train.dpo import reference_logprobs
    from character.train.losses import DPOCoefficients, make_dpo_loss_fn
    from character.train.renderer import to_datum

    svc = LocalService(
        Workspace(workdir),
        device=device,
        seed=0,
        micro_batch_size=2 * micro_pairs,
        gradient_checkpointing=checkpointing,
    )
    tok = svc.get_tokenizer(model)
    data, seqs = [], []
    for row in _texts(tok, pairs, length):
        p = tok(row["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            full = tok(row["prompt"] + row[side])["input_ids"] + [tok.eos_token_id]
            seqs.append(full)
            data.append(to_datum(full, [0.0] * len(p) + [1.0] * (len(full) - len(p))))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sampler = svc.create_sampling_client(base_model=model)
    t_load = time.perf_counter()
    refs = reference_logprobs(sampler, seqs)
    t_ref = time.perf_counter()
    del sampler
    gc.collect()
    client = svc.create_lora_training_client(model, rank=RANK, seed=0)
    t1 = time.perf_counter()
    out = client.forward_backward_custom(data, make_dpo_loss_fn(refs, DPOCoefficients(BETA, 0.0, 0.0))).result()
    client.optim_step(types.AdamParams(learning_rate=LR, beta1=0.9, beta2=0.98, eps=1e-8)).result()
    res = _peak(device, t0)
    res.update(
        step_seconds=time.perf_counter() - t1,
        ref_seconds=t_ref - t_load,
        load_seconds=(t_load - t0) + (t1 - t_ref),
        loss=out.metrics["loss"],
        tokens=sum(len(s) for s in seqs),
        micro_batches=len(client._micro_batches(seqs, 2) or client._micro_batches(seqs)),
    )
    # Like TRL's train(), which finds its model loaded: the reference log-probs and the step, not the loads.
    res["compute_seconds"] = res["ref_seconds"] + res["step_seconds"]
    return res


def trl(
    model: str, workdir: str, device: str, pairs: int, length: int, micro_pairs: int, checkpointing: bool = False
) -> dict:
    """One DPO step of TRL's DPOTrainer. Long because its config spells out every setting that matches ours."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    from character.backend.local import lora_target_modules

    hf_logging.set_verbosity_error()
    cuda = device.startswith("cuda")
    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = _texts(tok, pairs, length)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(model, dtype=_dtype(device)).to(device)
    args = DPOConfig(
        output_dir=str(Path(workdir) / "trl"),
        per_device_train_batch_size=micro_pairs,
        gradient_accumulation_steps=pairs // micro_pairs,
        max_steps=1,
        learning_rate=LR,
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=length + 8,
        gradient_checkpointing=checkpointing,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=not cuda,
        seed=0,
        dataloader_num_workers=0,
        bf16=cuda,
        fp16=False,
    )
    trainer = DPOTrainer(
        model=m,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(
            r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=lora_target_modules(m, True, True, False)
        ),
    )
    t1 = time.perf_counter()
    out = trainer.train()
    res = _peak(device, t0)
    res.update(step_seconds=time.perf_counter() - t1, loss=float(out.training_loss))
    return res


def floor_mb(model: str, device: str, length: int, micro_pairs: int, checkpointing: bool) -> float:
    """Weights plus one micro-batch's activations, by our estimate (character.backend.local)."""
    import torch
    from transformers import AutoConfig

    from character.backend.local import activation_bytes_per_token

    cfg = AutoConfig.from_pretrained(model)
    weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))  # stored in the training dtype
    act = activation_bytes_per_token(cfg, checkpointing, torch.device(device)) * 2 * micro_pairs * length
    return (weights + act) / 2**20


def compare(
    root: Path,
    repeats: int,
    device: str = "cpu",
    layers: int = 1,
    pairs: int = 2,
    length: int = 256,
    micro_pairs: int = 1,
    checkpointing: bool = False,
) -> list[Row]:
    from benchmarks.measure import run_child

    root.mkdir(parents=True, exist_ok=True)
    model = str(root / f"llama-1b-shape-{layers}l-{'bf16' if device.startswith('cuda') else 'f32'}")
    run_child("benchmarks.dpo_memory:build_model", folder=model, layers=layers, device=device)
    kw = dict(
        model=model, device=device, pairs=pairs, length=length, micro_pairs=micro_pairs, checkpointing=checkpointing
    )
    s = alternate(
        {side: (f"benchmarks.dpo_memory:{side}", dict(workdir=str(root / side), **kw)) for side in ("ours", "trl")},
        repeats,
    )
    key = "peak_gpu_mb" if device.startswith("cuda") else "peak_rss_mb"
    what = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "process RSS"
    name = (
        f"7. one DPO step, Llama-3.2-1B shape with {layers} of 16 layers, {pairs} pairs x {length} tokens, "
        f"micro-batch {micro_pairs} pair(s) x {pairs // micro_pairs} accumulated, LoRA r={RANK}, {device}"
        + (", activation checkpointing" if checkpointing else "")
    )
    peer = f"TRL {version('trl')} DPOTrainer"
    floor = floor_mb(model, device, length, micro_pairs, checkpointing)
    ours_mb = s["ours"].median(key)
    return [
        Row(
            name,
            f"peak memory ({what})",
            ours_mb,
            s["trl"].median(key),
            peer,
            "MB",
            "<= 1",
            f"our micro-batches: {s['ours'].runs[-1]['micro_batches']}; weights + one micro-batch's activations "
            f"(our estimate) {floor:.0f} MB, ours / that = {ours_mb / floor:.2f} (goal <= 2)",
        ),
        Row(
            name,
            "time per step, reference log-probs included (ours: reference pass + step; TRL: train() of one step)",
            s["ours"].median("compute_seconds"),
            s["trl"].median("step_seconds"),
            peer,
            "s",
            "<= 0.8",
            f"ours: reference log-probs {s['ours'].median('ref_seconds'):.1f} s (once, padded micro-batches) + step "
            f"{s['ours'].median('step_seconds'):.1f} s (one forward+backward per micro-batch); TRL's train(): per "
            "micro-batch a reference forward (adapter disabled) and a forward/backward, then the step; model loading "
            f"excluded on both sides (ours {s['ours'].median('load_seconds'):.1f} s)",
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dpo_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (the real model has 16)")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per step (the paper: 32)")
    ap.add_argument("--length", type=int, default=256, help="tokens per sequence (the paper: 1024)")
    ap.add_argument("--micro-pairs", type=int, default=1, help="pairs per micro-batch on both sides")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both sides")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/character-bench/dpo-memory")
    ap.add_argument("--json", help="also write the rows here as JSON")
    a = ap.parse_args()
    if a.pairs % a.micro_pairs:
        print("error: --pairs must be a multiple of --micro-pairs", file=sys.stderr)
        sys.exit(2)
    from benchmarks.__main__ import table

    rows = compare(Path(a.workdir), a.repeats, a.device, a.layers, a.pairs, a.length, a.micro_pairs, a.checkpointing)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
