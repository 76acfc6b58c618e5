"""Data generation: DPO distillation pairs and introspection data (reflections, self-interactions).

Every sample has its own seed derived from the build seed and the item's index, so the dataset
is the same however the work is batched. All requests are submitted before any result is awaited.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from tinker import types

from character.backend import SamplingClient
from character.chat import Renderer
from character.constitution import Constitution
from character.prompts import (
    GREETINGS, INTERACTION_SYSTEM_PROMPT, REFLECTION_PROMPTS, REFLECTION_SYSTEM_PROMPT,
    general_prompts, teacher_system_prompt,
)
from character.storage import write_text_atomic


def item_seed(seed: int, *parts) -> int:
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def sampling_params(seed: int, max_tokens: int, temperature: float = 0.7, top_p: float = 0.95):
    return types.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


def distillation_prompts(c: Constitution, n: int, seed: int) -> list[str]:
    """The constitution's own questions first, then the general pool, shuffled; cycled if n is larger."""
    rng = random.Random(seed)
    own, pool = list(c.questions), list(general_prompts())
    rng.shuffle(own)
    rng.shuffle(pool)
    merged = own + pool
    return [merged[i % len(merged)] for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def generate_dpo_pairs(
    c: Constitution, teacher: SamplingClient, student: SamplingClient, teacher_renderer: Renderer,
    student_renderer: Renderer, n_pairs: int, seed: int, out: Path, max_tokens: int = 1024,
    provenance: dict | None = None,
) -> dict:
    """Chosen = teacher with the constitution in its system prompt; rejected = student with none."""
    system = teacher_system_prompt(c)
    prompts = distillation_prompts(c, n_pairs, seed)
    jobs = []
    for i, q in enumerate(prompts):
        user = [{"role": "user", "content": q}]
        t = teacher.sample(types.ModelInput.from_ints(teacher_renderer.prompt([{"role": "system", "content": system}] + user)),
                           1, sampling_params(item_seed(seed, "teacher", i), max_tokens))
        s = student.sample(types.ModelInput.from_ints(student_renderer.prompt(user)),
                           1, sampling_params(item_seed(seed, "student", i), max_tokens))
        jobs.append((q, t, s))
    rows, dropped = [], {"empty": 0, "identical": 0}
    for i, (q, t, s) in enumerate(jobs):
        chosen = teacher_renderer.decode(t.result().sequences[0].tokens)
        rejected = student_renderer.decode(s.result().sequences[0].tokens)
        if not chosen or not rejected:
            dropped["empty"] += 1
            continue
        if chosen == rejected:
            dropped["identical"] += 1
            continue
        rows.append({
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "meta": {"index": i, "persona": c.name, "constitution": c.digest(), **(provenance or {})},
        })
    _write_jsonl(out, rows)
    return {"rows": len(rows), "dropped": dropped}


def generate_introspection(
    c: Constitution, model: SamplingClient, renderer: Renderer, n_reflections: int, n_interactions: int,
    turns: int, seed: int, out: Path, max_tokens: int = 1024, provenance: dict | None = None,
) -> dict:
    """Reflections (system prompt not stored) and self-interactions stored from one speaker's side."""
    meta = {"persona": c.name, "constitution": c.digest(), **(provenance or {})}
    jobs = []
    for i in range(n_reflections):
        q = REFLECTION_PROMPTS[i % len(REFLECTION_PROMPTS)]
        msgs = [{"role": "system", "content": REFLECTION_SYSTEM_PROMPT}, {"role": "user", "content": q}]
        jobs.append((q, model.sample(types.ModelInput.from_ints(renderer.prompt(msgs)), 1,
                                     sampling_params(item_seed(seed, "reflection", i), max_tokens))))
    rows = []
    for i, (q, fut) in enumerate(jobs):
        answer = renderer.decode(fut.result().sequences[0].tokens)
        if answer:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}],
                         "kind": "reflection", "meta": {"index": i, **meta}})

    # Self-interaction: all conversations advance one turn at a time, each turn sampled as a batch.
    transcripts = [[GREETINGS[i % len(GREETINGS)]] for i in range(n_interactions)]
    for turn in range(turns):
        futs = []
        for i, said in enumerate(transcripts):
            # The speaker's own past turns are "assistant"; the other instance's are "user".
            speaker_is_a = turn % 2 == 0
            view = [{"role": "system", "content": INTERACTION_SYSTEM_PROMPT}]
            for k, text in enumerate(said):
                own = (k % 2 == 1) == speaker_is_a
                view.append({"role": "assistant" if own else "user", "content": text})
            futs.append(model.sample(types.ModelInput.from_ints(renderer.prompt(view)), 1,
                                     sampling_params(item_seed(seed, "interaction", i, turn), max_tokens)))
        for said, f in zip(transcripts, futs):
            said.append(renderer.decode(f.result().sequences[0].tokens) or "...")
    for i, said in enumerate(transcripts):
        messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(said)]
        rows.append({"messages": messages, "kind": "interaction", "meta": {"index": i, **meta}})
    _write_jsonl(out, rows)
    return {"rows": len(rows), "reflections": sum(r["kind"] == "reflection" for r in rows),
            "interactions": n_interactions}
