"""Persona specificity: does a model carry *this* persona, or only the shape of some persona?

The binary in-persona rate (character.evaluation.metrics) is fitted on one build's teacher answers against
its student answers, so any first-person trait talk reads as "in persona". Here one multi-class classifier
learns this build's teacher answers (label: this persona) against the same teacher's answers, on the same
prompts, written with each other shipped constitution (character.evaluation.reference_set), and against
the student's own answers to those prompts without a constitution (the pairs' rejected side, class
PLAIN). A model's specificity is the share of its answers (no system prompt) classified as this persona:
it rises only when the persona's own content appears. Without the plain class an answer with no persona
content would still have to be assigned to some persona, and a plain model's specificity would be noise
around 1 / (number of personas); with it a plain model scores near 0, and so does one trained on the
wrong signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from character.evaluation.classification import share_of
from character.evaluation.metrics import PersonaClassifier, make_classifier
from character.evaluation.reference_set import (
    REFERENCE_PER_PERSONA,
    ReferenceSampling,
    other_constitutions,
    reference_answers,
)

PLAIN = "(no persona)"  # the class of answers written without a constitution


@dataclass
class SpecificitySetup:
    """How to get the reference set: the teacher's sampling client (made only when an answer is not
    cached), its sampling settings, the cache folder, answers per persona."""

    teacher: Callable[[], object]
    sampling: ReferenceSampling
    cache: Path
    per_persona: int = REFERENCE_PER_PERSONA
    classifier_path: str | Path | None = None


def own_teacher_answers(train_rows: list[dict], n: int, side: str = "chosen") -> tuple[list[str], list[str]]:
    """(prompts, answers) of the first `n` training pairs with distinct user prompts: the chosen answer of
    a pair is the teacher's, written with the constitution; the rejected one the student's, without."""
    prompts, answers = [], []
    for r in train_rows:
        q = next((m["content"] for m in reversed(r["prompt"]) if m["role"] == "user"), "")
        if q and q not in prompts and r.get(side):
            prompts.append(q)
            answers.append(r[side][-1]["content"])
        if len(prompts) == n:
            break
    return prompts, answers


def fit_specificity(
    persona: str, own: Sequence[str], reference: dict[str, list[str]], path=None, seed: int = 0
) -> PersonaClassifier:
    """One classifier over this persona's teacher answers and each reference persona's."""
    texts, labels = list(own), [persona] * len(own)
    for name, answers in reference.items():
        texts += answers
        labels += [name] * len(answers)
    return make_classifier(path, seed).fit(texts, labels)


def specificity(clf: PersonaClassifier | None, persona: str, answers: Sequence[str]) -> tuple[float | None, int]:
    """(share of `answers` classified as `persona`, n)."""
    return share_of(clf.predict(list(answers)), persona) if clf is not None else (None, 0)


def prepare_specificity(persona: str, train_rows: list[dict], setup: SpecificitySetup | None, seed: int = 0) -> tuple:
    """(classifier or None, the result's `specificity` section): the reference set sampled or read from the
    cache, and the classifier fitted on it; no setup: not asked for."""
    if setup is None:
        return None, {"status": "skipped", "reason": "not asked for"}
    prompts, own = own_teacher_answers(train_rows, setup.per_persona)
    plain = own_teacher_answers(train_rows, setup.per_persona, side="rejected")[1]
    others = other_constitutions(persona)
    section = {
        "teacher_model": setup.sampling.teacher_model,
        "per_persona": setup.per_persona,
        "classes": [persona] + [c.name for c in others] + ([PLAIN] if plain else []),
        "own_n": len(own),
        "plain_n": len(plain),
    }
    if not own or not others:
        why = "no training pairs to take the teacher's answers from" if not own else "no other shipped persona"
        return None, section | {"status": "skipped", "reason": why}
    reference, sampled = reference_answers(setup.teacher, others, prompts, setup.sampling, setup.cache)
    if plain:
        reference[PLAIN] = plain
    clf = fit_specificity(persona, own, reference, setup.classifier_path, seed)
    chance = 1 / (len(others) + 1)  # among personas; a plain model's answers go to PLAIN
    return clf, section | {"status": "computed", "sampled_now": sampled, "chance": chance}
