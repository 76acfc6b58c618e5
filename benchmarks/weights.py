"""2. Merge vs PEFT add_weighted_adapter and 3. fold vs PEFT merge_and_unload + save_pretrained.

The base is a random model with Llama-3.2-1B's shapes (1.24B parameters, bf16, tied embeddings,
one 2.5 GB model.safetensors like the real checkpoint); the adapters are random rank-64 LoRAs on
every linear layer of every block, in PEFT's file format. The copy floor is the time to read the
inputs and write the output's bytes, measured in the same run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from benchmarks.measure import Row, alternate, run_child

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128001,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def build_base(folder: str) -> dict:
    """Write the random 1B-shaped base model (tensor by tensor; never all in memory)."""
    import torch
    from transformers import LlamaConfig

    from character.weights.safetensors_io import StreamingSafetensorsWriter

    out = Path(folder)
    if (out / "model.safetensors").is_file():
        return {"seconds": 0.0}
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**LLAMA_1B, dtype="bfloat16")
    config.save_pretrained(out)
    state = {k: v for k, v in _meta_model(config).state_dict().items() if k != "lm_head.weight"}  # tied
    specs = [(k, "BF16", tuple(v.shape)) for k, v in sorted(state.items())]
    gen = torch.Generator().manual_seed(0)
    tmp = out / "model.safetensors.tmp"
    with StreamingSafetensorsWriter(tmp, specs) as w:
        for k, _, shape in specs:
            t = torch.ones(shape) if k.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
            w.write(k, t.to(torch.bfloat16))
    tmp.rename(out / "model.safetensors")
    return {"seconds": time.perf_counter() - t0}


def build_adapter(folder: str, base: str, rank: int, seed: int) -> dict:
    """A random PEFT LoRA adapter (A and B both nonzero) on every linear layer of every block."""
    import torch
    from peft import LoraConfig
    from transformers import AutoConfig

    from character.weights.safetensors_io import StreamingSafetensorsWriter

    out = Path(folder)
    if (out / "adapter_model.safetensors").is_file():
        return {}
    out.mkdir(parents=True, exist_ok=True)
    model = _meta_model(AutoConfig.from_pretrained(base))
    specs = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            specs.append((f"base_model.model.{name}.lora_A.weight", "F32", (rank, module.in_features)))
            specs.append((f"base_model.model.{name}.lora_B.weight", "F32", (module.out_features, rank)))
    specs.sort()
    gen = torch.Generator().manual_seed(seed)
    with StreamingSafetensorsWriter(out / "adapter_model.safetensors", specs) as w:
        for k, _, shape in specs:
            w.write(k, torch.randn(shape, generator=gen) * 0.01)
    LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=TARGETS,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    ).save_pretrained(out)
    return {}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))


# -- merge ----------------------------------------------------------------------------------------------
# One-off commands: each side's clock starts before it imports its libraries.
def merge_ours(dpo: str, sft: str, out: str, method: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # every side writes a fresh folder
    t0 = time.perf_counter()
    from character.weights.merge import merge_adapters

    merge_adapters(dpo, sft, out, dpo_weight=1.0, sft_weight=0.25, method=method, overwrite=True)
    return {"seconds": time.perf_counter() - t0, "output_bytes": _size(Path(out))}


def merge_peft(base: str, dpo: str, sft: str, out: str, method: str) -> dict:
    """What a PEFT user runs: load the base, both adapters, add_weighted_adapter, save the result."""
    shutil.rmtree(out, ignore_errors=True)  # every side writes a fresh folder
    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, dpo, adapter_name="dpo")
    model.load_adapter(sft, adapter_name="sft")
    model.add_weighted_adapter(
        ["dpo", "sft"], [1.0, 0.25], "merged", combination_type={"exact": "cat", "linear": "linear"}[method]
    )
    model.save_pretrained(out, selected_adapters=["merged"])
    return {"seconds": time.perf_counter() - t0, "output_bytes": _size(Path(out))}


def copy_floor(inputs: list[str], output_bytes: int, out: str, chunk: int = 16 << 20) -> dict:
    """Read every input file once and write `output_bytes` bytes: no arithmetic, no parsing."""
    t0 = time.perf_counter()
    for path in inputs:
        with open(path, "rb") as f:
            while f.read(chunk):
                pass
    block = bytes(chunk)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        left = output_bytes
        while left > 0:
            left -= f.write(block[: min(chunk, left)])
    return {"seconds": time.perf_counter() - t0}


# -- fold -------------------------------------------------------------------------------------------------
def fold_ours(adapter: str, base: str, out: str, workdir: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # every side writes a fresh folder
    t0 = time.perf_counter()
    from character.weights.fold import fold_adapter

    fold_adapter(adapter, out, base_model=base, workdir=workdir, overwrite=True)
    return {"seconds": time.perf_counter() - t0, "output_bytes": _size(Path(out))}


def fold_peft(adapter: str, base: str, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # every side writes a fresh folder
    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    return {"seconds": time.perf_counter() - t0, "output_bytes": _size(Path(out))}


def compare(root: Path, repeats: int) -> list[Row]:
    base, dpo, sft = root / "llama-1b-shaped", root / "adapter-dpo", root / "adapter-sft"
    run_child("benchmarks.weights:build_base", folder=str(base))
    run_child("benchmarks.weights:build_adapter", folder=str(dpo), base=str(base), rank=64, seed=1)
    run_child("benchmarks.weights:build_adapter", folder=str(sft), base=str(base), rank=64, seed=2)
    inputs = [str(dpo / "adapter_model.safetensors"), str(sft / "adapter_model.safetensors")]
    rows = []
    for method, peft_name in (("exact", "cat"), ("linear", "linear")):
        out = root / f"merge-{method}"
        s = alternate(
            {
                "ours": (
                    "benchmarks.weights:merge_ours",
                    dict(dpo=str(dpo), sft=str(sft), out=str(out / "ours"), method=method),
                ),
                "peft": (
                    "benchmarks.weights:merge_peft",
                    dict(base=str(base), dpo=str(dpo), sft=str(sft), out=str(out / "peft"), method=method),
                ),
            },
            repeats,
        )
        floor = alternate(
            {
                "floor": (
                    "benchmarks.weights:copy_floor",
                    dict(inputs=inputs, output_bytes=int(s["ours"].median("output_bytes")), out=str(out / "floor.bin")),
                )
            },
            repeats,
        )["floor"]
        name = f"2. merge `{method}` vs PEFT `{peft_name}` (1.24B, r=64)"
        sizes = f"output {s['ours'].median('output_bytes') / 1e6:.0f} MB ours, {s['peft'].median('output_bytes') / 1e6:.0f} MB PEFT"
        rows += [
            Row(
                name,
                "wall time",
                s["ours"].median("seconds"),
                s["peft"].median("seconds"),
                f"PEFT add_weighted_adapter({peft_name})",
                "s",
                "<= 0.2",
                "a one-off command: each side's time includes importing its libraries; PEFT loads the base "
                f"lazily (memory-mapped), so its memory is what it touches; {sizes}"
                + (" (PEFT's cat adapter takes the base's bfloat16; ours stays float32)" if method == "exact" else ""),
            ),
            Row(
                name,
                "peak memory",
                s["ours"].median("peak_rss_mb"),
                s["peft"].median("peak_rss_mb"),
                f"PEFT add_weighted_adapter({peft_name})",
                "MB",
                "<= 0.1",
            ),
            Row(
                name,
                "wall time vs copy floor",
                s["ours"].median("seconds"),
                floor.median("seconds"),
                "read inputs + write output bytes",
                "s",
                "<= 3",
            ),
        ]
    out = root / "fold"
    s = alternate(
        {
            "ours": (
                "benchmarks.weights:fold_ours",
                dict(adapter=str(dpo), base=str(base), out=str(out / "ours"), workdir=str(root)),
            ),
            "peft": ("benchmarks.weights:fold_peft", dict(adapter=str(dpo), base=str(base), out=str(out / "peft"))),
        },
        repeats,
    )
    floor = alternate(
        {
            "floor": (
                "benchmarks.weights:copy_floor",
                dict(
                    inputs=files(base) + inputs[:1],
                    output_bytes=int(s["ours"].median("output_bytes")),
                    out=str(out / "floor.bin"),
                ),
            )
        },
        repeats,
    )["floor"]
    name = "3. fold vs PEFT merge_and_unload + save_pretrained (1.24B bf16, r=64)"
    peer = "PEFT merge_and_unload + save_pretrained"
    rows += [
        Row(
            name,
            "peak memory",
            s["ours"].median("peak_rss_mb"),
            s["peft"].median("peak_rss_mb"),
            peer,
            "MB",
            "<= 0.333",
            "ours streams unchanged tensors byte for byte and holds one adapted weight at a time",
        ),
        Row(name, "wall time", s["ours"].median("seconds"), s["peft"].median("seconds"), peer, "s", ""),
        Row(
            name,
            "wall time vs copy floor",
            s["ours"].median("seconds"),
            floor.median("seconds"),
            "read inputs + write output bytes",
            "s",
            "",
        ),
    ]
    return rows


def files(folder: Path) -> list[str]:
    return [str(p) for p in sorted(Path(folder).glob("*.safetensors"))]
