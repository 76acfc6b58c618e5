"""Question expansion (optional): more user messages per trait, asked of the teacher, near-duplicates dropped."""

from __future__ import annotations

import json
import re
from pathlib import Path

from character.backend import SamplingClient
from character.datagen.engine import Requests, clean_answer, item_seed, sampling_params
from character.persona.constitution import Constitution
from character.persona.prompts import question_expansion_prompt
from character.storage import read_jsonl, write_text_atomic
from character.train.renderer import Renderer


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of lowercase word sets: the paper's near-duplicate test for questions."""
    wa, wb = set(re.findall(r"\w+", a.lower())), set(re.findall(r"\w+", b.lower()))
    return len(wa & wb) / max(1, len(wa | wb))


def expand_questions(
    c: Constitution,
    teacher: SamplingClient,
    renderer: Renderer,
    per_trait: int,
    seed: int,
    out: Path,
    max_overlap: float = 0.6,
    max_tokens: int = 128,
) -> dict:
    """Ask the teacher for more user messages per trait; drop near-duplicates by word overlap."""
    req = Requests(teacher)
    jobs = []
    for t_idx, trait in enumerate(c.traits):
        prompt = renderer.prompt([{"role": "user", "content": question_expansion_prompt(trait.trait, trait.questions)}])
        for j in range(per_trait):
            jobs.append(
                (
                    t_idx,
                    req.submit(
                        prompt, sampling_params(item_seed(seed, "expand", t_idx, j), max_tokens, renderer.stop_tokens)
                    ),
                )
            )
    accepted: dict[int, list[str]] = {i: [] for i in range(len(c.traits))}
    dropped = {"filtered": 0, "near_duplicate": 0}
    for t_idx, fut in jobs:
        text, _ = clean_answer(fut().sequences[0], renderer, max_tokens)
        text = text.strip().strip('"').strip() if text else None
        if not text:
            dropped["filtered"] += 1
            continue
        known = c.traits[t_idx].questions + accepted[t_idx]
        if any(word_overlap(text, k) >= max_overlap for k in known):
            dropped["near_duplicate"] += 1
            continue
        accepted[t_idx].append(text)
    rows = [{"trait": c.traits[i].trait, "trait_index": i, "questions": qs} for i, qs in accepted.items()]
    write_text_atomic(Path(out), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return {"questions": sum(len(q) for q in accepted.values()), "dropped": dropped}


def load_expanded_questions(path: Path | None) -> list[str]:
    if path is None or not Path(path).is_file():
        return []
    return [q for r in read_jsonl(Path(path)) for q in r["questions"]]
