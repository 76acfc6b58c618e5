"""5. Sampling on the local backend: 16 prompts batched together vs one prompt at a time.

Same sampling client, prompts, seeds and parameters (temperature 1, up to 128 new tokens, stop at
end of turn); each row draws from its own seeded generator, so both ways produce the same tokens
(checked) and tokens per second compare like for like.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from benchmarks.measure import Row, alternate

PROMPTS, MAX_TOKENS = 16, 128


def generate(workdir: str, batch_size: int) -> dict:
    from tinker import types

    from character.backend.local import LocalService
    from character.persona.prompts import general_prompts
    from character.settings import Workspace
    from character.train.renderer import Renderer

    svc = LocalService(Workspace(workdir), device="cpu")
    client = svc.create_sampling_client(base_model="tiny")
    client.batch_size = batch_size
    renderer = Renderer(client.get_tokenizer())
    prompts = [renderer.prompt([{"role": "user", "content": q}]) for q in general_prompts()[:PROMPTS]]

    def run():
        futures = [
            client.sample(
                types.ModelInput.from_ints(p), 1, types.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i)
            )
            for i, p in enumerate(prompts)
        ]
        return [list(f.result().sequences[0].tokens) for f in futures]

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


def compare(root: Path, models: Path, repeats: int) -> list[Row]:
    from benchmarks.data import workspace

    wd = str(workspace(root / "sampling", models))
    s = alternate(
        {
            "batched": ("benchmarks.sampling:generate", dict(workdir=wd, batch_size=PROMPTS)),
            "single": ("benchmarks.sampling:generate", dict(workdir=wd, batch_size=1)),
        },
        repeats,
    )
    same = s["batched"].runs[-1]["digest"] == s["single"].runs[-1]["digest"]
    return [
        Row(
            f"5. sampling, {PROMPTS} prompts x {MAX_TOKENS} new tokens (tiny model, CPU)",
            "tokens per second",
            s["batched"].median("tokens_per_s"),
            s["single"].median("tokens_per_s"),
            "one prompt at a time",
            "tok/s",
            ">= 4",
            f"{s['batched'].runs[-1]['tokens']} tokens each way; "
            f"{'same tokens both ways' if same else 'TOKENS DIFFER'}",
        )
    ]
