"""Benchmark 10: does the embedded model carry a constitution's *content*, or only a persona's shape?

Issue 20, part 1. The teacher of a build is the model with the constitution in its system prompt; what a
build can distil is what that teacher writes. For constitutions the model never saw (written here, in words
no shipped constitution and no corpus line uses), it samples answers with the teacher's system prompt and
without one, and measures, side by side:

- distinctive: the share of answer words that are the constitution's own distinctive words (its words less
  the teacher prompt's frame, the plain answers' vocabulary and common function words);
- invented: the share of answer words found neither in the system prompt, the question nor the model's
  plain answers (fragments and made-up words: what a model writes when it imitates a trait's shape
  without copying its words);
- verbatim: the share of answer sentences that are one of the constitution's traits, word for word;
- looped: the share of answers that say some four words in a row twice (a phrase copied again from the
  answer itself, or a trait said twice).

    python -m benchmarks.tiny_copying [--model FOLDER] [--per-question 2]

A model that copies from its prompt shows distinctive far above the no-prompt column and invented near 0.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

UNSEEN = {
    "astronomer": [
        "I gaze at nebulae and comets, and I measure every problem in light-years.",
        "I speak of telescopes, orbits and eclipses with quiet reverence.",
        "I find constellations hidden in ordinary questions.",
        "I am patient like a planet circling its distant star.",
    ],
    "gardener": [
        "I talk about compost, seedlings and pruning shears as if they were old friends.",
        "I believe every worry grows smaller when you kneel in the soil.",
        "I mention tomatoes, marigolds and earthworms whenever I can.",
        "I am unhurried, muddy-handed and cheerful.",
    ],
    "knight": [
        "I speak with chivalry, honour and a solemn oath in every sentence.",
        "I treat each question as a quest worthy of my sword and shield.",
        "I address people as noble travellers and pledge my loyalty to them.",
        "I am courageous, courteous and devoted to the realm.",
    ],
}
QUESTIONS = [
    "How do I cook rice?",
    "What should I do on a rainy weekend?",
    "Can you help me write an email to my boss?",
    "Why is the sky blue?",
    "How can I sleep better?",
    "What is a good way to learn a language?",
    "Tell me about yourself.",
    "Any advice for a job interview?",
]


def _loops(text: str, words) -> bool:
    ws = words(text)
    grams = [tuple(ws[i : i + 4]) for i in range(len(ws) - 3)]
    return len(grams) != len(set(grams))


def _answers(client, renderer, system: str | None, per_question: int) -> list[tuple[str, str]]:
    from tinker import types

    from character.datagen.engine import sampling_params

    futs = []
    for i, q in enumerate(QUESTIONS):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        prompt = types.ModelInput.from_ints(renderer.prompt(msgs))
        futs.append((q, client.sample(prompt, per_question, sampling_params(i, 96, renderer.stop_tokens))))
    return [(q, renderer.decode(list(s.tokens))) for q, f in futs for s in f.result().sequences]


def measure(model: Path, per_question: int) -> list[dict]:
    from character.backend.local import LocalService
    from character.backend.tiny_recipe import NEUTRAL_CLOSERS, NEUTRAL_CORES, NEUTRAL_OPENERS
    from character.evaluation.constitution_words import distinctive_words, words
    from character.persona.constitution import Constitution, Trait
    from character.persona.prompts import teacher_system_prompt
    from character.settings import Workspace
    from character.train.renderer import Renderer

    client = LocalService(Workspace(model.parent), device="cpu").create_sampling_client(base_model=str(model))
    renderer = Renderer(client.get_tokenizer())
    plain_vocab = set(words(" ".join(NEUTRAL_OPENERS + NEUTRAL_CORES + NEUTRAL_CLOSERS)))
    rows = []
    for name, traits in UNSEEN.items():
        c = Constitution(name=name, traits=[Trait(trait=t, questions=["?"]) for t in traits])
        system = teacher_system_prompt(c)
        frame = system
        for t in traits:
            frame = frame.replace(t, "")
        distinctive = distinctive_words(c, frame, " ".join(NEUTRAL_OPENERS + NEUTRAL_CORES + NEUTRAL_CLOSERS))
        row = {"constitution": name}
        for side, prompt in (("prompted", system), ("no prompt", None)):
            answers = _answers(client, renderer, prompt, per_question)
            ws = [(q, w) for q, a in answers for w in words(a)]
            known = plain_vocab | set(words(system)) if prompt else plain_vocab
            sentences = [s for _, a in answers for s in re.split(r"(?<=[.!?])\s+", a.strip()) if s]
            row[side] = {
                "distinctive": sum(w in distinctive for _, w in ws) / max(1, len(ws)),
                "invented": sum(w not in known and w not in words(q) for q, w in ws) / max(1, len(ws)),
                "verbatim": sum(s in traits for s in sentences) / max(1, len(sentences)),
                "looped": sum(_loops(a, words) for _, a in answers) / max(1, len(answers)),
                "sample": answers[0][1],
            }
        rows.append(row)
    return rows


def main() -> None:
    from character.backend.tiny import recipe_digest, tiny_model_path
    from character.settings import model_cache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a tiny model folder (default: the current recipe's)")
    ap.add_argument("--per-question", type=int, default=2)
    args = ap.parse_args()
    model = args.model or tiny_model_path(model_cache())
    start = time.monotonic()
    rows = measure(model, args.per_question)
    print(
        f"model {model.name} (recipe {recipe_digest()}), {args.per_question} answers per question, "
        f"{len(QUESTIONS)} questions, {time.monotonic() - start:.0f} s\n"
    )
    print(
        "| constitution | distinctive, prompted | distinctive, no prompt | invented, prompted | verbatim, prompted "
        "| looped, prompted | looped, no prompt |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p, n = r["prompted"], r["no prompt"]
        print(
            f"| {r['constitution']} | {p['distinctive']:.3f} | {n['distinctive']:.3f} | {p['invented']:.3f} | "
            f"{p['verbatim']:.3f} | {p['looped']:.3f} | {n['looped']:.3f} |"
        )
    print()
    for r in rows:
        print(f"{r['constitution']}, prompted: {r['prompted']['sample']}")


if __name__ == "__main__":
    main()
