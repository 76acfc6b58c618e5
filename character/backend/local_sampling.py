"""The local backend's sampling client: requests queue up and run as padded batches when the first
result is asked for, so a caller can submit many before waiting, as on Tinker."""

from __future__ import annotations

import uuid

import numpy as np
import torch
from tinker import types

from character.backend.generation import SampleRequest, sample_batch, token_logprobs
from character.backend.local_memory import head_bytes, inference_bytes_per_token, memory_budget_bytes, micro_batches


class LocalSamplingClient:
    """Requests queue up and run as batches when the first result is asked for."""

    def __init__(self, model, tokenizer, batch_size: int, base_seed: int = 0, memory_budget_gb: float | None = None):
        """memory_budget_gb: what scoring (`compute_logprobs`) may use at once (None: as in training)."""
        self.model = model.eval()
        self.memory_budget_gb = memory_budget_gb
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
        for mb in self._scoring_batches([tokens for tokens, _ in lps]):
            seqs = [lps[i][0] for i in mb]
            with torch.inference_mode():
                out = token_logprobs(self.model, seqs, self.tokenizer.pad_token_id, head_bytes=self._head_bytes(seqs))
            for i, lp in zip(mb, out):
                lps[i][1]["logprobs"] = [None] + lp.float().cpu().tolist()

    def _scoring_batches(self, seqs: list[list[int]]) -> list[list[int]]:
        """Queued scoring requests as padded micro-batches within the memory budget, longest first (similar
        lengths together). Batched kernels differ from one-at-a-time ones in the last bits only (1e-6)."""
        if not seqs:
            return []
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        per_token = inference_bytes_per_token(self.model.config, len(seqs[order[0]]), self._device())
        groups = micro_batches([len(seqs[i]) for i in order], None, self._budget() / per_token)
        return [[order[k] for k in g] for g in groups]

    def _head_bytes(self, seqs: list[list[int]]) -> float:
        width = max(len(s) for s in seqs)
        activations = inference_bytes_per_token(self.model.config, width, self._device()) * len(seqs) * width
        return head_bytes(self._budget(), activations)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _budget(self) -> float:
        return memory_budget_bytes(self._device(), self.memory_budget_gb)

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
