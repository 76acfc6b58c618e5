"""The reference set of persona specificity: teacher answers written with the other shipped constitutions
in the teacher's system prompt (`teacher_system_prompt`), by the same teacher model and the same sampling
settings as the build's own teacher answers, on the same prompts (so no class can be told by its topic).

Each answer is cached in the workspace (`Workspace.reference_answers`), one file per teacher model,
constitution content and sampling settings, one row per prompt: a second build, or a second evaluation,
samples only the prompts it has not seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from character.backend.retry import Call
from character.datagen.engine import TEMPERATURE, TOP_P, item_seed, sampling_params
from character.persona.constitution import Constitution, load_constitution, shipped_personas
from character.persona.prompts import teacher_system_prompt
from character.storage import append_jsonl, read_jsonl
from character.train.families import renderer_for

# Teacher answers per persona (its own and each reference persona's) the specificity classifier learns from.
REFERENCE_PER_PERSONA = 8


@dataclass(frozen=True)
class ReferenceSampling:
    """What the cached answers depend on besides the constitution."""

    teacher_model: str
    max_new_tokens: int
    seed: int

    def key(self, c: Constitution) -> str:
        teacher = self.teacher_model
        if teacher == "tiny":  # the embedded model changes with its recipe, its name does not
            from character.backend.tiny import recipe_digest

            teacher = f"tiny-{recipe_digest()}"
        spec = {
            "teacher": teacher,
            "constitution": c.digest(),
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def other_constitutions(persona: str) -> list[Constitution]:
    """Every shipped constitution but the build's own persona's."""
    return [load_constitution(name) for name in shipped_personas() if name != persona]


def _cached(path: Path) -> dict[str, str]:
    return {r["prompt"]: r["answer"] for r in read_jsonl(path) if isinstance(r, dict)} if path.is_file() else {}


def reference_answers(
    client, others: list[Constitution], prompts: list[str], sampling: ReferenceSampling, cache: Path
) -> tuple[dict[str, list[str]], int]:
    """persona name -> its teacher answers to `prompts` (in order); and how many were sampled now (the rest
    came from the cache). `client` is the teacher's sampling client, made only when something is missing."""
    paths = {c.name: Path(cache) / f"{c.name}-{sampling.key(c)}.jsonl" for c in others}
    have = {c.name: _cached(paths[c.name]) for c in others}
    missing = {c.name: [q for q in dict.fromkeys(prompts) if q not in have[c.name]] for c in others}
    if any(missing.values()):
        teacher = client()
        renderer = renderer_for(teacher.get_tokenizer(), sampling.teacher_model)
        calls = {c.name: _submit(teacher, renderer, c, missing[c.name], sampling) for c in others}  # all, then wait
        for name, qs in missing.items():
            new = [
                {"prompt": q, "answer": renderer.decode(list(f.result().sequences[0].tokens))}
                for q, f in zip(qs, calls[name])
            ]
            if new:
                append_jsonl(paths[name], new)
                have[name] |= {r["prompt"]: r["answer"] for r in new}
    return {c.name: [have[c.name][q] for q in prompts] for c in others}, sum(map(len, missing.values()))


def _submit(teacher, renderer, c: Constitution, prompts: list[str], sampling: ReferenceSampling) -> list[Call]:
    from tinker import types

    system = teacher_system_prompt(c)
    return [
        Call(  # seeded by the prompt's text: the same answer whichever build asks for it
            lambda q=q: teacher.sample(
                types.ModelInput.from_ints(
                    renderer.prompt([{"role": "system", "content": system}, {"role": "user", "content": q}])
                ),
                1,
                sampling_params(
                    item_seed(sampling.seed, "reference", q), sampling.max_new_tokens, renderer.stop_tokens
                ),
            )
        )
        for q in prompts
    ]
