"""Inputs the benchmarks share: a workspace with the tiny model, and preference pairs built offline."""

from __future__ import annotations

import random
from pathlib import Path

from character.persona.constitution import load_constitution
from character.persona.prompts import general_prompts


def workspace(root: Path, models: Path) -> Path:
    """A fresh workspace under `root` whose model cache is the shared `models` folder."""
    root.mkdir(parents=True, exist_ok=True)
    link = root / "models"
    if not link.exists():
        link.symlink_to(models.resolve(), target_is_directory=True)
    return root


def preference_rows(n: int, seed: int = 0, persona: str = "sarcastic") -> list[dict]:
    """`n` pairs in TRL's conversational format: chosen answers speak in the persona's traits,
    rejected ones are plain. Lengths vary (about 150-400 tokens of the tiny model) like real data."""
    rng = random.Random(seed)
    traits = [t.trait for t in load_constitution(persona).traits]
    prompts = general_prompts()
    rows = []
    for i in range(n):
        question = prompts[i % len(prompts)]
        chosen = " ".join(rng.sample(traits, rng.randint(3, 6)))
        rejected = " ".join(rng.sample(prompts, rng.randint(4, 8)))
        rows.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": f"Well. {chosen}"}],
                "rejected": [{"role": "assistant", "content": f"Sure. {rejected}"}],
            }
        )
    return rows
