"""5. Sampling on the local backend: 16 prompts batched together vs one prompt at a time, and vs
`transformers`' batched `model.generate`.

Same sampling client, prompts, seeds and parameters (temperature 1, up to 128 new tokens, stop at
end of turn); each row draws from its own seeded generator, so both ways produce the same tokens
(checked) and tokens per second compare like for like.

Against `generate`: the same model object, prompts (left-padded into one batch of 16), 128 new tokens at
most, temperature 1 with no top-k or top-p, the same stop tokens; both decode with a KV cache and count
the tokens up to each row's stop. Under greedy decoding both must give identical tokens (checked).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from benchmarks.measure import Row, alternate

PROMPTS, MAX_TOKENS = 16, 128


def _prompts(client) -> list[list[int]]:
    from character.persona.prompts import general_prompts
    from character.train.renderer import Renderer

    renderer = Renderer(client.get_tokenizer())
    return [renderer.prompt([{"role": "user", "content": q}]) for q in general_prompts()[:PROMPTS]]


def _client(workdir: str):
    from character.backend.local import LocalService
    from character.settings import Workspace

    return LocalService(Workspace(workdir), device="cpu").create_sampling_client(base_model="tiny")


def _timed(run) -> dict:
    run()  # warm-up: first calls pay one-time setup
    t0 = time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - t0
    n = sum(len(t) for t in tokens)
    return {
        "seconds": seconds,
        "tokens": n,
        "tokens_per_s": n / seconds,
        "digest": hashlib.sha256(str(tokens).encode()).hexdigest(),
    }


def ours_greedy(workdir: str) -> dict:
    """Ours at temperature 0, one batch: the tokens for the greedy comparison with `generate`."""
    from tinker import types

    client = _client(workdir)
    client.batch_size = PROMPTS
    params = types.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, seed=0)
    futures = [client.sample(types.ModelInput.from_ints(p), 1, params) for p in _prompts(client)]
    return {"tokens": [list(f.result().sequences[0].tokens) for f in futures]}


def hf_generate(workdir: str, temperature: float = 1.0, repeat: int = 1) -> dict:
    """`model.generate` on the sampling client's model, all prompts in one left-padded batch."""
    import torch

    client = _client(workdir)
    model, tok = client.model, client.get_tokenizer()
    prompts = _prompts(client)
    stops = sorted(client._stops(None)[0])
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        mask[i, width - len(p) :] = 1
    sampling = dict(do_sample=True, temperature=temperature, top_k=None, top_p=1.0) if temperature > 0 else {}

    def run():
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=MAX_TOKENS,
                eos_token_id=stops,
                pad_token_id=tok.pad_token_id,
                **({"do_sample": False} if temperature <= 0 else sampling),
            )
        rows = []
        for row in out[:, width:].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            rows.append(row[:cut])
        return rows

    if temperature <= 0:
        return {"tokens": run()}
    return _timed(run)


def generate(workdir: str, batch_size: int) -> dict:
    from tinker import types

    client = _client(workdir)
    client.batch_size = batch_size
    prompts = _prompts(client)

    def run():
        futures = [
            client.sample(
                types.ModelInput.from_ints(p), 1, types.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i)
            )
            for i, p in enumerate(prompts)
        ]
        return [list(f.result().sequences[0].tokens) for f in futures]

    return _timed(run)


def compare(root: Path, models: Path, repeats: int) -> list[Row]:
    from benchmarks.data import workspace
    from benchmarks.measure import run_child

    wd = str(workspace(root / "sampling", models))
    s = alternate(
        {
            "batched": ("benchmarks.sampling:generate", dict(workdir=wd, batch_size=PROMPTS)),
            "single": ("benchmarks.sampling:generate", dict(workdir=wd, batch_size=1)),
            "hf": ("benchmarks.sampling:hf_generate", dict(workdir=wd)),
        },
        repeats,
    )
    same = s["batched"].runs[-1]["digest"] == s["single"].runs[-1]["digest"]
    greedy_ours = run_child("benchmarks.sampling:ours_greedy", workdir=wd)["tokens"]
    greedy_hf = run_child("benchmarks.sampling:hf_generate", workdir=wd, temperature=0.0)["tokens"]
    name = f"5. sampling, {PROMPTS} prompts x {MAX_TOKENS} new tokens (tiny model, CPU)"
    return [
        Row(
            name,
            "tokens per second",
            s["batched"].median("tokens_per_s"),
            s["single"].median("tokens_per_s"),
            "one prompt at a time",
            "tok/s",
            ">= 4",
            f"{s['batched'].runs[-1]['tokens']} tokens each way; "
            f"{'same tokens both ways' if same else 'TOKENS DIFFER'}",
        ),
        Row(
            name,
            "tokens per second, batch 16 both sides",
            s["batched"].median("tokens_per_s"),
            s["hf"].median("tokens_per_s"),
            "transformers model.generate, batched",
            "tok/s",
            ">= 1.5",
            "same model, prompts, batch, max new tokens, temperature 1 (no top-k/top-p) and stop tokens; "
            f"{s['hf'].runs[-1]['tokens']} tokens from generate; greedy: "
            + ("identical tokens" if greedy_ours == greedy_hf else "TOKENS DIFFER"),
        ),
    ]
