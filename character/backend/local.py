"""Local backend: torch + transformers + peft on CPU or CUDA, behind the Tinker-shaped interface.

Checkpoints are folders addressed by `file://` URIs, laid out like Tinker's:
`<workdir>/checkpoints/<run>/weights/<name>` (LoRA weights + optimizer: resumable) and
`<workdir>/checkpoints/<run>/sampler_weights/<name>` (a plain PEFT adapter folder).

This module holds the service; the training client (and how it splits a batch into micro-batches)
is in `local_training`, the sampling client in `local_sampling` (its decode steps for plain Llama models in
`local_decode`), model loading and LoRA targets in `local_model`, the memory estimate in `local_memory`.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch

from character.backend.local_memory import activation_bytes_per_token, micro_batches
from character.backend.local_model import (
    load_base_model,
    load_tokenizer,
    lora_target_modules,
    pick_device,
    resolve_model,
)
from character.backend.local_sampling import LocalSamplingClient
from character.backend.local_training import STATE_FILE, LocalTrainingClient
from character.errors import UserError
from character.settings import Workspace
from character.storage import uri_to_path

# The local backend's public names, wherever they are defined: callers import them from here.
__all__ = [
    "STATE_FILE",
    "LocalSamplingClient",
    "LocalService",
    "LocalTrainingClient",
    "activation_bytes_per_token",
    "lora_target_modules",
    "micro_batches",
    "pick_device",
    "resolve_model",
]


class LocalService:
    def __init__(
        self,
        ws: Workspace,
        device: str = "auto",
        sample_batch_size: int = 32,
        seed: int = 0,
        micro_batch_size: int | None = None,
        memory_budget_gb: float | None = None,
        gradient_checkpointing: bool = False,
    ):
        """micro_batch_size: sequences per forward/backward in training (None: as many as the memory
        budget allows); memory_budget_gb: what activations may use (None: 70% of free GPU memory, or
        half the available RAM on CPU); gradient_checkpointing: recompute activations in backward."""
        self.ws = ws
        self.device = pick_device(device)
        self.sample_batch_size = sample_batch_size
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.memory_budget_gb = memory_budget_gb
        self.gradient_checkpointing = gradient_checkpointing

    def get_tokenizer(self, base_model: str):
        return load_tokenizer(str(resolve_model(base_model, self.ws)))

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = False,
        alpha: int | None = None,
    ) -> LocalTrainingClient:
        from peft import LoraConfig, get_peft_model

        model_dir = resolve_model(base_model, self.ws)
        base = load_base_model(model_dir, self.device)
        targets = lora_target_modules(base, train_attn, train_mlp, train_unembed)
        alpha = alpha if alpha is not None else 2 * rank
        torch.manual_seed(self.seed if seed is None else seed)  # LoRA A init
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
        meta = {
            "base_model": str(model_dir),
            "rank": rank,
            "alpha": alpha,
            "targets": targets,
            "run": f"run-{uuid.uuid4().hex[:12]}",
            "steps": 0,
        }
        return LocalTrainingClient(self, model_dir, model, meta)

    def _from_state(self, uri: str, with_optimizer: bool) -> LocalTrainingClient:
        from peft import PeftModel

        folder = uri_to_path(uri)
        state_file = folder / STATE_FILE
        if not state_file.is_file():
            raise UserError(f"{uri}: not a training state saved by this tool (no {STATE_FILE})")
        meta = json.loads(state_file.read_text())
        model_dir = Path(meta["base_model"])
        base = load_base_model(model_dir, self.device)
        model = PeftModel.from_pretrained(base, folder, is_trainable=True)
        if not with_optimizer:
            # Fresh optimizer, new run: the state is only a starting point (sequential SFT).
            meta = {**meta, "run": f"run-{uuid.uuid4().hex[:12]}", "steps": 0, "parent": uri}
        client = LocalTrainingClient(self, model_dir, model, meta)
        if with_optimizer:
            opt_file = folder / "optimizer.pt"
            if not opt_file.is_file():
                raise UserError(f"{uri}: has no optimizer state (a sampler checkpoint cannot resume training)")
            client.optimizer.load_state_dict(torch.load(opt_file, map_location=self.device, weights_only=True))
        return client

    def create_training_client_from_state(self, path: str) -> LocalTrainingClient:
        return self._from_state(path, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(self, path: str) -> LocalTrainingClient:
        return self._from_state(path, with_optimizer=True)

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, seed: int | None = None
    ) -> LocalSamplingClient:
        if (model_path is None) == (base_model is None):
            raise ValueError("give exactly one of model_path and base_model")
        if base_model is not None:
            model_dir = resolve_model(base_model, self.ws)
            model = load_base_model(model_dir, self.device)
        elif not (uri_to_path(model_path) / "adapter_config.json").is_file():
            # A full model folder (e.g. written by `character fold`): loaded like a base model.
            model_dir = uri_to_path(model_path)
            if not (model_dir / "config.json").is_file():
                raise UserError(
                    f"{model_path}: not an adapter checkpoint or a model folder (no adapter_config.json or config.json)"
                )
            model = load_base_model(model_dir, self.device)
        else:
            from peft import PeftModel

            folder = uri_to_path(model_path)
            model_dir = Path(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"])
            model = PeftModel.from_pretrained(load_base_model(model_dir, self.device), folder)
            # Folding the adapter in makes sampling as fast as the base model, except for a head tied to the
            # input embedding: merging into the shared matrix would change the embedding too.
            tied = getattr(model.base_model, "_get_tied_target_modules", lambda _: [])(model.base_model.model)
            if not tied:
                model = model.merge_and_unload()
        return LocalSamplingClient(
            model,
            load_tokenizer(str(model_dir)),
            self.sample_batch_size,
            self.seed if seed is None else seed,
            memory_budget_gb=self.memory_budget_gb,
        )
