"""1. Local DPO training vs TRL's DPOTrainer: same tiny model, pairs, batch, LoRA, max length, one epoch, CPU.

Both sides use the sigmoid DPO loss alone (our NLL and KL terms off), the same optimizer settings
(AdamW, betas, eps, no weight decay, clip 1.0, warmup then cosine) and save one adapter at the end.
Each side's time covers loading the model, preparing the data, the reference log-probs, training and
saving. TRL runs twice: at its defaults (the reference log-probs of every batch recomputed at every step
by the adapter-disabled model) and with `precompute_ref_log_probs=True`, its documented fast path, which
computes them once before training, in batches of the training batch size, as we do. Ours computes them
once (padded micro-batches within the memory budget), then one forward and backward per micro-batch.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from importlib.metadata import version
from pathlib import Path

from benchmarks.measure import Row, alternate

PAIRS, BATCH, RANK, MAX_LENGTH, LR, BETA = 128, 8, 32, 512, 5e-5, 0.1


def _warm_imports() -> None:
    """Libraries both sides load lazily, imported before either clock starts."""
    import peft.tuners.lora  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401


def ours(workdir: str, pairs: int = PAIRS) -> dict:
    import torch

    from benchmarks.data import preference_rows
    from character.backend.local import LocalService
    from character.settings import Workspace
    from character.storage import write_text_atomic
    from character.train.dpo import run_dpo
    from character.train.loop import OptimConfig
    from character.train.losses import DPOCoefficients
    from character.train.renderer import Renderer

    _warm_imports()
    shutil.rmtree(Path(workdir) / "dpo", ignore_errors=True)  # a finished run would be resumed, not redone
    torch.manual_seed(0)
    data = Path(workdir) / "pairs.jsonl"
    write_text_atomic(data, "".join(json.dumps(r) + "\n" for r in preference_rows(pairs)))
    t0 = time.perf_counter()
    svc = LocalService(Workspace(workdir), device="cpu")
    cfg = OptimConfig(learning_rate=LR, batch_size=BATCH, epochs=1, save_every=10**9, weight_decay=0.0)
    result = run_dpo(
        svc,
        start=lambda: svc.create_lora_training_client("tiny", rank=RANK, seed=0),
        reference=lambda: svc.create_sampling_client(base_model="tiny"),
        renderer=Renderer(svc.get_tokenizer("tiny")),
        data_path=data,
        run_dir=Path(workdir) / "dpo",
        cfg=cfg,
        coef=DPOCoefficients(beta=BETA, nll_coef=0.0, kl_coef=0.0),
        max_length=MAX_LENGTH,
    )
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": result.steps, "final_loss": result.metrics[-1]["loss"]}


def trl(workdir: str, pairs: int = PAIRS, precompute: bool = False) -> dict:
    """TRL's DPOTrainer on the same job. Long because its config spells out every setting that matches ours."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    from benchmarks.data import preference_rows
    from character.backend.local import lora_target_modules
    from character.backend.tiny import tiny_model_path

    hf_logging.set_verbosity_error()
    _warm_imports()
    shutil.rmtree(Path(workdir) / "trl", ignore_errors=True)
    torch.manual_seed(0)
    rows = preference_rows(pairs)
    model_dir = tiny_model_path(Path(workdir) / "models")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    targets = lora_target_modules(model, train_attn=True, train_mlp=True, train_unembed=False)
    args = DPOConfig(
        output_dir=str(Path(workdir) / "trl"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=math.ceil(0.1 * math.ceil(pairs / BATCH)),
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=MAX_LENGTH,
        truncation_mode="keep_start",
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
        precompute_ref_log_probs=precompute,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=targets),
    )
    out = trainer.train()
    trainer.save_model(str(Path(workdir) / "trl" / "final"))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": out.global_step, "final_loss": float(out.training_loss)}


def compare(root: Path, models: Path, repeats: int) -> list[Row]:
    from benchmarks.data import workspace

    sides = {"ours": {}, "trl": {}, "trl_pre": {"precompute": True}}
    wd = {side: str(workspace(root / f"dpo-{side}", models)) for side in sides}
    s = alternate(
        {
            side: (f"benchmarks.dpo_vs_trl:{'ours' if side == 'ours' else 'trl'}", dict(workdir=wd[side], **kw))
            for side, kw in sides.items()
        },
        repeats,
    )
    name = f"1. local DPO vs TRL DPOTrainer ({PAIRS} pairs, batch {BATCH}, LoRA r={RANK}, max length {MAX_LENGTH})"
    peer = f"TRL {version('trl')} DPOTrainer"
    pre = f"{peer}, precompute_ref_log_probs=True"
    steps = f"{s['ours'].runs[-1]['steps']} steps each"
    what = (
        "ours: reference log-probs once, then one forward+backward per micro-batch; TRL at its defaults: "
        "reference forward (adapter disabled) + forward/backward at every step"
    )
    what_pre = "both compute the reference log-probs once before training, then forward/backward per step"
    t, m = "wall time", "peak memory (process RSS)"
    return [
        Row(name, t, s["ours"].median("seconds"), s["trl"].median("seconds"), peer, "s", "<= 0.8", f"{steps}; {what}"),
        Row(name, m, s["ours"].median("peak_rss_mb"), s["trl"].median("peak_rss_mb"), peer, "MB", "<= 1"),
        Row(name, t, s["ours"].median("seconds"), s["trl_pre"].median("seconds"), pre, "s", "<= 0.7", what_pre),
        Row(name, m, s["ours"].median("peak_rss_mb"), s["trl_pre"].median("peak_rss_mb"), pre, "MB", "<= 1"),
    ]
