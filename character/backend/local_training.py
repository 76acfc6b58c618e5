"""The local backend's training client: LoRA on a local model, trained in micro-batches, saved as
Tinker-shaped checkpoints.

At real model scale a batch does not fit in memory at once (batch 32 x 1024 tokens x a 128k
vocabulary is tens of GB of logits alone), so training runs in micro-batches whose gradients
accumulate into exactly the full batch's gradient:
- `cross_entropy` is a sum over sequences: each micro-batch's part is backpropagated on its own;
- a custom loss (DPO) may couple any sequences of the batch (chosen with rejected, means over pairs,
  a KL normalised by the batch's token count). One that says it decomposes (a `group` of sequences
  scored together and a `part(data, indices, logprobs)` giving those sequences' share of the batch's
  loss, normalisers fixed up front: `character.train.losses.DPOLoss`) runs in one pass: each
  micro-batch, holding whole groups, is scored with gradients and backpropagates its share. Any other
  runs in two passes, as on Tinker: a forward without gradients gives every sequence's log-probs, the
  loss and its gradient with respect to those log-probs are computed on the whole batch, and then each
  micro-batch is run again with gradients and backpropagates sum(logprobs x that gradient). Either way
  the accumulated gradient is the full batch's (the chain rule); when the batch fits in one
  micro-batch, one pass does it all.
The micro-batch size is given (`micro_batch_size`) or chosen from a memory budget. On CUDA the
forward runs under bf16 autocast; activation checkpointing is an option.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tinker import types

from character.backend import CustomLossFn, Done
from character.backend.generation import token_logprobs
from character.backend.local_memory import (
    activation_bytes_per_token,
    decoder_bytes_per_token,
    grouped_micro_batches,
    head_bytes,
    memory_budget_bytes,
    micro_batches,
)
from character.backend.local_model import autocast_for, load_tokenizer
from character.storage import atomic_dir, file_uri

if TYPE_CHECKING:
    from character.backend.local import LocalService
    from character.backend.local_sampling import LocalSamplingClient

STATE_FILE = "character_state.json"


class LocalTrainingClient:
    def __init__(self, service: "LocalService", model_dir: Path, peft_model, meta: dict):
        self.service = service
        self.model_dir = model_dir
        self.model = peft_model
        self.meta = meta  # base_model, rank, alpha, targets, run
        self.run_dir = service.ws.checkpoints / meta["run"]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0)
        self.steps = meta.get("steps", 0)
        self.tokenizer = load_tokenizer(str(model_dir))
        self.device = next(self.model.parameters()).device
        if service.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad (the base is frozen under LoRA).
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- training ---------------------------------------------------------------------------
    @staticmethod
    def _sequences(data: list[types.Datum]) -> list[list[int]]:
        seqs = []
        for d in data:
            inp = d.model_input.to_ints()
            tgt = d.loss_fn_inputs["target_tokens"].tolist()
            if len(tgt) != len(inp) or inp[1:] != tgt[:-1]:
                raise ValueError("local backend expects target_tokens to be model_input shifted by one")
            seqs.append(inp + tgt[-1:])
        return seqs

    def _budget_bytes(self) -> float:
        return memory_budget_bytes(self.device, self.service.memory_budget_gb)

    def _micro_batches(self, seqs: list[list[int]], group: int = 1) -> list[list[int]] | None:
        """Micro-batches in order; with `group` > 1, whole groups each (None if a group alone does not fit)."""
        svc = self.service
        lengths = [len(s) for s in seqs]
        budget = 0.0
        if svc.micro_batch_size is None:
            per_token = activation_bytes_per_token(self.model.config, svc.gradient_checkpointing, self.device)
            budget = self._budget_bytes() / per_token
        if group > 1:
            return grouped_micro_batches(lengths, svc.micro_batch_size, budget, group)
        return micro_batches(lengths, svc.micro_batch_size, budget)

    def _logprobs(self, seqs: list[list[int]], grad: bool) -> list[torch.Tensor]:
        decoder = decoder_bytes_per_token(self.model.config, self.service.gradient_checkpointing, self.device)
        activations = decoder * len(seqs) * max(len(s) for s in seqs)
        head = head_bytes(self._budget_bytes(), activations)
        self.model.train()
        with autocast_for(self.device):
            return token_logprobs(self.model, seqs, self.tokenizer.pad_token_id, grad=grad, head_bytes=head)

    def _weights(self, d: types.Datum, like: torch.Tensor) -> torch.Tensor:
        return d.loss_fn_inputs["weights"].to_torch().to(like.device, like.dtype)

    def _output(self, logprobs: list[torch.Tensor], metrics: dict) -> types.ForwardBackwardOutput:
        outs = [{"logprobs": types.TensorData.from_numpy(lp.detach().float().cpu().numpy())} for lp in logprobs]
        return types.ForwardBackwardOutput(loss_fn_output_type="TorchLossReturn", loss_fn_outputs=outs, metrics=metrics)

    def forward_backward(self, data: list[types.Datum], loss_fn: str = "cross_entropy"):
        if loss_fn != "cross_entropy":
            raise ValueError(f"local backend supports the built-in loss 'cross_entropy', not {loss_fn!r}")
        seqs = self._sequences(data)
        logprobs: list[torch.Tensor | None] = [None] * len(data)
        total = 0.0
        for mb in self._micro_batches(seqs):  # a sum over sequences: each micro-batch's part on its own
            lps = self._logprobs([seqs[i] for i in mb], grad=True)
            loss = sum(-(lp * self._weights(data[i], lp)).sum() for i, lp in zip(mb, lps))
            loss.backward()
            total += float(loss.detach())
            for i, lp in zip(mb, lps):
                logprobs[i] = lp.detach()
        return Done(self._output(logprobs, {"loss:sum": total}))

    def forward_backward_custom(self, data: list[types.Datum], loss_fn: CustomLossFn):
        seqs = self._sequences(data)
        part = getattr(loss_fn, "part", None)
        groups = self._micro_batches(seqs, getattr(loss_fn, "group", 1)) if part is not None else None
        if groups is not None:
            return Done(self._one_pass(data, seqs, loss_fn, groups))
        mbs = self._micro_batches(seqs)
        if len(mbs) == 1:  # the whole batch fits: one forward with gradients
            logprobs = self._logprobs(seqs, grad=True)
            loss, metrics = loss_fn(data, logprobs)
            loss.backward()
            return Done(self._output(logprobs, {**metrics, "loss": float(loss.detach())}))
        # Pass 1: log-probs without gradients, micro-batch by micro-batch; the loss on the whole batch
        # and its gradient with respect to each log-prob.
        values: list[torch.Tensor | None] = [None] * len(data)
        for mb in mbs:
            for i, lp in zip(mb, self._logprobs([seqs[i] for i in mb], grad=False)):
                values[i] = lp.float().requires_grad_(True)
        loss, metrics = loss_fn(data, values)
        loss.backward()
        # Pass 2: each micro-batch again with gradients; sum(logprobs x dloss/dlogprobs) carries the
        # whole batch's loss gradient into the weights (the chain rule, one micro-batch at a time).
        for mb in mbs:
            lps = self._logprobs([seqs[i] for i in mb], grad=True)
            terms = [(lp.float() * values[i].grad).sum() for i, lp in zip(mb, lps) if values[i].grad is not None]
            if terms:
                sum(terms).backward()
        return Done(self._output([v.detach() for v in values], {**metrics, "loss": float(loss.detach())}))

    def _one_pass(self, data, seqs, loss_fn, groups: list[list[int]]) -> types.ForwardBackwardOutput:
        """A decomposable loss: each micro-batch (whole groups) forward and backward once, its share of the
        loss; the loss and metrics reported are the whole batch's, from the log-probs so computed."""
        logprobs: list[torch.Tensor | None] = [None] * len(data)
        for mb in groups:
            lps = [lp.float() for lp in self._logprobs([seqs[i] for i in mb], grad=True)]
            loss_fn.part(data, mb, lps).backward()
            for i, lp in zip(mb, lps):
                logprobs[i] = lp.detach()
        with torch.no_grad():
            loss, metrics = loss_fn(data, logprobs)
        return self._output(logprobs, {**metrics, "loss": float(loss)})

    def optim_step(self, adam_params: types.AdamParams):
        for g in self.optimizer.param_groups:
            g.update(
                lr=adam_params.learning_rate,
                betas=(adam_params.beta1, adam_params.beta2),
                eps=adam_params.eps,
                weight_decay=adam_params.weight_decay,
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, adam_params.grad_clip_norm if adam_params.grad_clip_norm > 0 else float("inf")
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return Done({"grad_norm": float(grad_norm), "steps": self.steps})

    # -- checkpoints --------------------------------------------------------------------------
    def _write_adapter(self, folder: Path) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)
        cfg_path = folder / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(self.model_dir)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (folder / STATE_FILE).write_text(json.dumps({**self.meta, "steps": self.steps}, indent=2, sort_keys=True))

    def save_state(self, name: str):
        final = self.run_dir / "weights" / name
        with atomic_dir(final) as tmp:
            self._write_adapter(tmp)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        return Done(types.SaveWeightsResponse(path=file_uri(final)))

    def save_weights_for_sampler(self, name: str):
        final = self.run_dir / "sampler_weights" / name
        with atomic_dir(final) as tmp:
            self._write_adapter(tmp)
        return Done(types.SaveWeightsForSamplerResponse(path=file_uri(final)))

    def save_weights_and_get_sampling_client(self, name: str) -> "LocalSamplingClient":
        path = self.save_weights_for_sampler(name).result().path
        return self.service.create_sampling_client(model_path=path)

    def get_tokenizer(self):
        return self.tokenizer
