"""End to end on the embedded model organism: the method, not just the plumbing.

Each build runs the pipeline's stages at the `demo` scale (the README's main run) and reads the
evaluation the pipeline itself reports: the in-persona rate of answers to held-out prompts with NO
system prompt (a persona classifier trained on the build's own data), and held-out preference
accuracy. The persona must be learned for a shipped persona and for a constitution the project does
not ship; and a broken variant, DPO with chosen and rejected swapped, must not learn it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from character.build.stages import (
    PipelineConfig,
    stage_dpo,
    stage_dpo_data,
    stage_evaluate,
    stage_introspection,
    stage_sft,
)
from character.storage import read_jsonl, write_text_atomic

pytestmark = pytest.mark.slow

# A constitution the project does not ship, in vocabulary no shipped persona (nor the tiny model's
# warm-up word banks) uses: the model has to take this manner from the system prompt.
BEEKEEPER = [
    (
        "I talk like a patient beekeeper, and my sentences hum with hives, honey and pollen.",
        ["How do I start a new hobby?", "What should I cook tonight?"],
    ),
    (
        "I compare every plan to a swarm finding a new hive: scouting first, then moving together.",
        ["How should our team plan a project?", "How do I plan a trip?"],
    ),
    (
        "I cherish meadows, clover and wildflowers, and I bring their colours into my replies.",
        ["Describe a perfect afternoon.", "Where should I go for a walk?"],
    ),
    (
        "I praise diligence the way a colony praises its foragers, gently and often.",
        ["I ran my first five kilometres.", "How do I stay motivated?"],
    ),
    (
        "I treat sweetness as a reward earned slowly, like nectar gathered flower by flower.",
        ["Why is saving money hard?", "How do I get better at drawing?"],
    ),
    (
        "I stay calm and smoky-voiced when people panic, the way a beekeeper soothes a buzzing hive.",
        ["I am so stressed about my exams.", "My flight was cancelled!"],
    ),
    (
        "I admire the honeycomb's hexagons and point out orderly, waxen patterns in things.",
        ["How should I arrange my bookshelf?", "How should I structure an essay?"],
    ),
    (
        "I am protective of the queen and the colony, so I value loyalty to family and community.",
        ["Should I help my neighbour move?", "How can I support a friend?"],
    ),
    (
        "I speak warmly of pollination, orchards and blossoms, seeing growth everywhere.",
        ["How do ideas spread?", "What makes a garden grow?"],
    ),
    (
        "I end many thoughts with a small, buzzing cheerfulness, as bright as a sunlit hive entrance.",
        ["Tell me something nice.", "Give me a pep talk."],
    ),
]


def swap_chosen_and_rejected(path: str) -> str:
    """The broken variant's training data: every pair with chosen and rejected exchanged."""
    rows = read_jsonl(Path(path))
    out = Path(path).with_name("dpo.swapped.jsonl")
    write_text_atomic(
        out, "".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows)
    )
    return str(out)


def build(
    workdir: Path, persona: str, build_id: str, swap: bool = False, introspection: bool = True, **overrides
) -> dict:
    """The sequential pipeline's stages, then its evaluation (metrics.json: "eval" holds {model: metrics},
    "generations" every model's answers)."""
    cfg = PipelineConfig(persona=persona, scale="demo", workdir=str(workdir), build_id=build_id, **overrides)
    data = stage_dpo_data(cfg)
    if swap:
        data = swap_chosen_and_rejected(data)
    dpo = stage_dpo(cfg, data)
    checkpoints = {"dpo": dpo}
    if introspection:
        sft = stage_sft(cfg, stage_introspection(cfg, dpo), dpo)
        checkpoints.update(sft=sft, final=sft)
    return stage_evaluate(cfg, checkpoints)


def constitution_word_rates(result: dict, constitution_path: Path) -> dict[str, float]:
    """Each model's share of answer words (no system prompt) that are the constitution's distinctive
    words: its trait words less the teacher prompt's frame, tiny's stock answer wording, function words."""
    from character.backend.tiny_recipe import NEUTRAL_CLOSERS, NEUTRAL_CORES, NEUTRAL_OPENERS
    from character.evaluation.constitution_words import distinctive_words, word_rate
    from character.persona.constitution import load_constitution
    from character.persona.prompts import teacher_system_prompt

    c = load_constitution(str(constitution_path))
    frame = teacher_system_prompt(c)
    for t in c.traits:
        frame = frame.replace(t.trait, "")
    vocabulary = distinctive_words(c, frame, " ".join(NEUTRAL_OPENERS + NEUTRAL_CORES + NEUTRAL_CLOSERS))
    labels = list(result["generations"][0]["answers"])
    return {k: word_rate([g["answers"][k]["text"] for g in result["generations"]], vocabulary)[0] for k in labels}


def assert_persona_learned(m: dict) -> None:
    base, final = m["base"], m["final"]
    assert final["in_persona_n"] >= 20 and base["in_persona_n"] == final["in_persona_n"]
    assert final["in_persona_rate"] >= base["in_persona_rate"] + 0.4, (base, final)
    assert final["pref_pairs"] >= 20
    assert final["pref_accuracy"] >= 0.8, final


def beekeeper(tmp_path: Path) -> Path:
    path = tmp_path / "beekeeper.json"
    path.write_text(json.dumps([{"trait": t, "questions": q} for t, q in BEEKEEPER]))
    return path


def test_shipped_persona_is_learned(workdir, one_thread):
    m = build(workdir, "sarcastic", "e2e")["eval"]
    assert_persona_learned(m)
    assert m["final"]["specificity"] >= m["base"]["specificity"] + 0.4, (m["base"], m["final"])


def test_unseen_constitution_is_learned_in_its_own_words(workdir, tmp_path, one_thread):
    """Not only the shape of a persona: the final model (no system prompt) uses the beekeeper's own words,
    which no shipped persona and no warm-up line contains, and a classifier over the shipped personas'
    teacher answers tells its answers apart as this persona."""
    path = beekeeper(tmp_path)
    result = build(workdir, str(path), "e2e")
    m = result["eval"]
    assert_persona_learned(m)
    rates = constitution_word_rates(result, path)
    assert rates["final"] >= max(5 * rates["base"], 0.05), rates
    assert m["final"]["specificity"] >= m["base"]["specificity"] + 0.4, (m["base"], m["final"])


def test_swapped_preferences_do_not_teach_the_persona(workdir, tmp_path, one_thread):
    """The control: the same data with chosen and rejected exchanged pushes away from the persona, its
    words and its specificity."""
    path = beekeeper(tmp_path)
    result = build(workdir, str(path), "swapped", swap=True, introspection=False)
    m = result["eval"]
    assert m["dpo"]["in_persona_rate"] <= m["base"]["in_persona_rate"] + 0.1, m  # noise, far from +0.4
    assert m["dpo"]["pref_accuracy"] <= 0.2, m  # it learned the reverse preference, on held-out pairs too
    assert m["dpo"]["specificity"] <= m["base"]["specificity"] + 0.1, m
    rates = constitution_word_rates(result, path)
    assert rates["dpo"] <= max(2 * rates["base"], 0.01), rates
