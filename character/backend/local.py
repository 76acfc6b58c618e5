"""Local backend: torch + transformers + peft on CPU or CUDA, behind the Tinker-shaped interface.

Checkpoints are folders addressed by `file://` URIs, laid out like Tinker's:
`<workdir>/checkpoints/<run>/weights/<name>` (LoRA weights + optimizer: resumable) and
`<workdir>/checkpoints/<run>/sampler_weights/<name>` (a plain PEFT adapter folder).

At real model scale a batch does not fit in memory at once (batch 32 x 1024 tokens x a 128k
vocabulary is tens of GB of logits alone), so training runs in micro-batches whose gradients
accumulate into exactly the full batch's gradient:
- `cross_entropy` is a sum over sequences: each micro-batch's part is backpropagated on its own;
- a custom loss (DPO) may couple any sequences of the batch (chosen with rejected, means over pairs,
  a KL normalised by the batch's token count), so it runs in two passes, as on Tinker: a forward
  without gradients gives every sequence's log-probs, the loss and its gradient with respect to
  those log-probs are computed on the whole batch, and then each micro-batch is run again with
  gradients and backpropagates sum(logprobs x that gradient). By the chain rule the accumulated
  gradient is the full batch's. When the batch fits in one micro-batch, one pass does it all.
The micro-batch size is given (`micro_batch_size`) or chosen from a memory budget. On CUDA the
forward runs under bf16 autocast; activation checkpointing is an option.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tinker import types

from character.backend import CustomLossFn, Done
from character.backend.generation import SampleRequest, sample_batch, token_logprobs
from character.backend.tiny import tiny_model_path
from character.errors import UserError
from character.settings import Workspace
from character.storage import atomic_dir, file_uri, uri_to_path

STATE_FILE = "character_state.json"

# PEFT calls a transformers API that warns on every model wrap; it is not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
_ATTN_HINTS = ("attn", "attention")


def resolve_model(name: str, ws: Workspace) -> Path:
    """`tiny` is built and cached in the workspace; anything else must be a local HF model folder."""
    if name == "tiny":
        return tiny_model_path(ws.models)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"base model {name!r}: not 'tiny' and not a local Hugging Face model folder (no config.json)")
    return path.resolve()


def check_model_name(name: str) -> None:
    """The same check as resolve_model, without building anything (for early validation)."""
    if name != "tiny" and not (Path(name).expanduser() / "config.json").is_file():
        raise UserError(f"base model {name!r}: not 'tiny' and not a local Hugging Face model folder (no config.json)")


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


@lru_cache(maxsize=4)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_base(model_dir: Path, device: torch.device):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (LoRA weights stay float32); CPU runs in float32 as loaded."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _memory_budget_bytes(device: torch.device, budget_gb: float | None) -> float:
    """What activations may use: the given budget, else most of what is free on the device now."""
    if budget_gb is not None:
        return budget_gb * 2**30
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.7 * free
    avail = (
        next(
            (int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable")),
            8 * 2**30,
        )
        if os.path.exists("/proc/meminfo")
        else 8 * 2**30
    )
    return 0.5 * avail


def activation_bytes_per_token(config, checkpointing: bool, device: torch.device) -> float:
    """A rough upper estimate of the memory one trained token costs: the layers' saved activations
    (about 34 x hidden values per layer without checkpointing, 2 x hidden with it; bf16 on CUDA,
    float32 on CPU) plus the logits (float32 copies kept for the log-softmax and its backward)."""
    cfg = getattr(config, "text_config", config)
    hidden, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    width = 2 if device.type == "cuda" else 4
    per_layer = (2 if checkpointing else 34) * hidden * width
    return layers * per_layer + vocab * (width + 2 * 4)


def micro_batches(lengths: list[int], size: int | None, token_budget: float) -> list[list[int]]:
    """Indices grouped into micro-batches, in order: `size` sequences each if given, else as many as
    keep (sequences x longest) within token_budget (at least one sequence each)."""
    if size is not None:
        return [list(range(k, min(k + size, len(lengths)))) for k in range(0, len(lengths), size)]
    out: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if out and (len(out[-1]) + 1) * max(longest, n) <= token_budget:
            out[-1].append(i)
            longest = max(longest, n)
        else:
            out.append([i])
            longest = n
    return out


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
        self.tokenizer = _tokenizer(str(model_dir))
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

    def _micro_batches(self, seqs: list[list[int]]) -> list[list[int]]:
        svc = self.service
        if svc.micro_batch_size is not None:
            return micro_batches([len(s) for s in seqs], svc.micro_batch_size, 0)
        per_token = activation_bytes_per_token(self.model.config, svc.gradient_checkpointing, self.device)
        budget = _memory_budget_bytes(self.device, svc.memory_budget_gb) / per_token
        return micro_batches([len(s) for s in seqs], None, budget)

    def _logprobs(self, seqs: list[list[int]], grad: bool) -> list[torch.Tensor]:
        self.model.train()
        with _autocast(self.device):
            return token_logprobs(self.model, seqs, self.tokenizer.pad_token_id, grad=grad)

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


class LocalSamplingClient:
    """Requests queue up and run as batches when the first result is asked for."""

    def __init__(self, model, tokenizer, batch_size: int, base_seed: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._pending_samples: list[tuple[SampleRequest, dict]] = []
        self._pending_logprobs: list[tuple[list[int], dict]] = []
        self._counter = 0
        self._base_seed = base_seed

    def _stops(self, stop) -> tuple[frozenset[int], tuple[str, ...]]:
        if stop is None:
            eos = self.tokenizer.eos_token_id
            ids = set(eos if isinstance(eos, list) else [eos])
            gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
            ids |= set(gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else []))
            return frozenset(i for i in ids if i is not None), ()
        if isinstance(stop, str):
            return frozenset(), (stop,)
        stop = list(stop)
        if all(isinstance(s, int) for s in stop):
            return frozenset(stop), ()
        return frozenset(), tuple(str(s) for s in stop)

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams):
        p = sampling_params
        stop_tokens, stop_strings = self._stops(p.stop)
        base = p.seed if p.seed is not None else self._base_seed * 1_000_003 + self._counter
        self._counter += 1
        slot: dict = {}
        tokens = prompt.to_ints()
        for j in range(num_samples):
            req = SampleRequest(
                tokens=tokens,
                seed=(base * 7919 + j) % (2**63),
                max_tokens=p.max_tokens or 512,
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k,
                stop_tokens=stop_tokens,
                stop_strings=stop_strings,
            )
            self._pending_samples.append((req, slot))
        slot["n"] = num_samples
        return _Lazy(
            self._flush,
            slot,
            lambda s: types.SampleResponse(
                sequences=[
                    types.SampledSequence(
                        stop_reason=r.stop_reason,
                        sequence_id=uuid.uuid4().hex,
                        tokens_np=np.asarray(r.tokens, dtype=np.int32),
                        logprobs_np=np.asarray(r.logprobs, dtype=np.float32),
                    )
                    for r in s["results"]
                ]
            ),
        )

    def compute_logprobs(self, prompt: types.ModelInput):
        slot: dict = {}
        self._pending_logprobs.append((prompt.to_ints(), slot))
        return _Lazy(self._flush, slot, lambda s: s["logprobs"])

    def _flush(self) -> None:
        pending, self._pending_samples = self._pending_samples, []
        results = [None] * len(pending)
        # Similar lengths together waste less padding; results do not depend on the grouping.
        order = sorted(range(len(pending)), key=lambda i: len(pending[i][0].tokens))
        for k in range(0, len(order), self.batch_size):
            idx = order[k : k + self.batch_size]
            batch = sample_batch(self.model, [pending[i][0] for i in idx], self.tokenizer.pad_token_id, self._decode)
            for i, res in zip(idx, batch):
                results[i] = res
        for (_, slot), res in zip(pending, results):
            slot.setdefault("results", []).append(res)
        lps, self._pending_logprobs = self._pending_logprobs, []
        # One forward per sequence: a sequence's log-probs then depend on its tokens alone, not on which
        # requests happened to be queued with it (batched kernels differ in the last bits with the batch
        # shape), so a request made again after a transient failure gives the same floats. On CPU this
        # is also no slower than padded batches (measured: 1.9 s vs 2.1 s for 256 DPO sequences).
        for tokens, slot in lps:
            with torch.inference_mode():
                lp = token_logprobs(self.model, [tokens], self.tokenizer.pad_token_id)[0]
            slot["logprobs"] = [None] + lp.float().cpu().tolist()

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def get_tokenizer(self):
        return self.tokenizer


class _Lazy:
    def __init__(self, flush, slot: dict, build):
        self._flush, self._slot, self._build = flush, slot, build

    def result(self):
        if "results" not in self._slot and "logprobs" not in self._slot:
            self._flush()
        return self._build(self._slot)


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
        return _tokenizer(str(resolve_model(base_model, self.ws)))

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
        base = _load_base(model_dir, self.device)
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
        base = _load_base(model_dir, self.device)
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
            model = _load_base(model_dir, self.device)
        elif not (uri_to_path(model_path) / "adapter_config.json").is_file():
            # A full model folder (e.g. written by `character fold`): loaded like a base model.
            model_dir = uri_to_path(model_path)
            if not (model_dir / "config.json").is_file():
                raise UserError(
                    f"{model_path}: not an adapter checkpoint or a model folder (no adapter_config.json or config.json)"
                )
            model = _load_base(model_dir, self.device)
        else:
            from peft import PeftModel

            folder = uri_to_path(model_path)
            model_dir = Path(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"])
            model = PeftModel.from_pretrained(_load_base(model_dir, self.device), folder)
            # Folding the adapter in makes sampling as fast as the base model, except for a head tied to the
            # input embedding: merging into the shared matrix would change the embedding too.
            tied = getattr(model.base_model, "_get_tied_target_modules", lambda _: [])(model.base_model.model)
            if not tied:
                model = model.merge_and_unload()
        return LocalSamplingClient(
            model, _tokenizer(str(model_dir)), self.sample_batch_size, self.seed if seed is None else seed
        )
