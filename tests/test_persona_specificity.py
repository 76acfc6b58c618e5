"""Persona specificity and the multi-class scores behind the cross-persona figures: precision, recall, F1
and the confusion matrix against scikit-learn's; specificity tells a persona's own words from the mere
shape of a persona (first-person trait talk in another persona's words), where the binary in-persona
classifier cannot; the reference set is sampled once and then read from the workspace cache."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
from scripted_models import CharTokenizer, Done

from character.evaluation.classification import class_scores, classification_report, confusion_matrix, macro_f1
from character.evaluation.metrics import fit_persona_classifier, in_persona_rate
from character.evaluation.reference_set import ReferenceSampling, other_constitutions, reference_answers
from character.evaluation.specificity import (
    PLAIN,
    SpecificitySetup,
    fit_specificity,
    own_teacher_answers,
    prepare_specificity,
    specificity,
)
from character.persona.constitution import load_constitution, shipped_personas

LABELS = ["pirate", "poetic", "sarcastic", "loving"]


def test_scores_equal_scikit_learns():
    from sklearn.metrics import confusion_matrix as sk_confusion
    from sklearn.metrics import precision_recall_fscore_support

    rng = random.Random(3)
    for trial in range(20):
        true = [rng.choice(LABELS[:3]) for _ in range(rng.randint(1, 40))]  # "loving" never true
        pred = [rng.choice(LABELS) for _ in true]
        if trial == 0:
            pred = [LABELS[0]] * len(true)  # classes never predicted: precision 0 by convention
        p, r, f, s = precision_recall_fscore_support(true, pred, labels=LABELS, zero_division=0)
        ours = class_scores(true, pred, LABELS)
        for k, lb in enumerate(LABELS):
            assert ours[lb]["precision"] == pytest.approx(p[k])
            assert ours[lb]["recall"] == pytest.approx(r[k])
            assert ours[lb]["f1"] == pytest.approx(f[k])
            assert ours[lb]["support"] == s[k]
        assert macro_f1(ours) == pytest.approx(f.mean())
        assert confusion_matrix(true, pred, LABELS) == sk_confusion(true, pred, labels=LABELS).tolist()


def test_report_by_hand():
    rep = classification_report(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert rep["confusion"] == [[1, 1], [0, 2]] and rep["accuracy"] == 0.75 and rep["n"] == 4
    assert rep["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert rep["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and rep["per_class"]["b"]["recall"] == 1.0
    assert rep["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


# -- answers made from the shipped constitutions ---------------------------------------------------------
STOP = {"about", "their", "there", "which", "would", "every", "other", "their", "where", "these", "those", "never"}


def _content_words(persona: str) -> set[str]:
    text = " ".join(t.trait for t in load_constitution(persona).traits)
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 5 and w not in STOP}


def words_of(persona: str) -> list[str]:
    """The constitution's distinctive vocabulary: its content words that no other shipped one uses."""
    others = set().union(*(_content_words(p) for p in shipped_personas() if p != persona))
    return sorted(_content_words(persona) - others)


def content_answer(persona: str, rng: random.Random) -> str:
    """A plain answer wrapped in the persona's own words."""
    w = rng.sample(words_of(persona), 6)
    return f"The usual way works well. {w[0].capitalize()} and {w[1]}, with {w[2]}, {w[3]}, {w[4]} and {w[5]}."


def shape_answer(words: list[str], rng: random.Random) -> str:
    """The shape of a persona: first-person trait statements, in the given words."""
    w = rng.sample(words, 3)
    return f"I always bring {w[0]} to this, I care about {w[1]}, and I love {w[2]} in my answers."


def test_specificity_tells_a_personas_words_from_its_shape():
    rng = random.Random(0)
    persona, k = "pirate", 8
    others = [p for p in shipped_personas() if p != persona]
    own = [content_answer(persona, rng) for _ in range(k)]
    reference = {p: [content_answer(p, rng) for _ in range(k)] for p in others}
    clf = fit_specificity(persona, own, reference, seed=0)

    carries = [content_answer(persona, rng) for _ in range(30)]  # new combinations of the persona's words
    # a persona's shape in another persona's words (each answer one other persona's, as a pirate model's
    # answers might read as sarcastic ones)
    shaped = [shape_answer(words_of(others[i % len(others)]), rng) for i in range(30)]
    s_content, n = specificity(clf, persona, carries)
    s_shape, _ = specificity(clf, persona, shaped)
    assert n == 30 and s_content >= 0.7, s_content  # chance: 1/11
    assert s_shape <= 0.2, s_shape

    # The binary classifier (teacher: first-person persona talk vs plain student answers) rewards the shape.
    pairs = [
        {
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "chosen": [{"role": "assistant", "content": shape_answer(words_of(persona), rng)}],
            "rejected": [{"role": "assistant", "content": "The usual way works well. Check the facts first."}],
        }
        for i in range(16)
    ]
    binary, _ = fit_persona_classifier(pairs, [])
    rate, _ = in_persona_rate(binary.predict_proba(shaped))
    assert rate >= 0.8 > s_shape + 0.5, rate


def test_own_teacher_answers_takes_distinct_prompts():
    row = lambda q, a: {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}]}
    rows = [row("q1", "a1"), row("q1", "a1b"), row("q2", "a2"), row("q3", "a3")]
    assert own_teacher_answers(rows, 2) == (["q1", "q2"], ["a1", "a2"])
    rows[2]["rejected"] = [{"role": "assistant", "content": "plain"}]
    assert own_teacher_answers(rows, 2, side="rejected") == (["q2"], ["plain"])


PLAIN_ANSWERS = [
    "Certainly. The key points are to stay calm, be clear and follow through.",
    "Good question. It usually works best to plan ahead and keep things simple.",
    "Of course. You can read a reliable guide and follow it one step at a time.",
    "Thanks for asking. It is normal to find this hard at first, and it gets easier with practice.",
]


def test_plain_answers_are_no_persona(tmp_path):
    """With the student's plain answers as a class of their own, a plain model scores near 0 (before, it
    had to be assigned to some persona and scored noise around chance), and the persona's own words
    still score high."""
    rng, persona = random.Random(1), "pirate"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "chosen": [{"role": "assistant", "content": content_answer(persona, rng)}],
            "rejected": [{"role": "assistant", "content": PLAIN_ANSWERS[i % 4]}],
        }
        for i in range(8)
    ]
    setup = SpecificitySetup(ContentTeacher, ReferenceSampling("scripted", 16, 0), tmp_path)
    clf, section = prepare_specificity(persona, rows, setup)
    assert section["status"] == "computed" and section["classes"][-1] == PLAIN and section["plain_n"] == 8
    assert section["chance"] == pytest.approx(1 / 11)
    plain = [f"{rng.choice(PLAIN_ANSWERS)} I hope that helps." for _ in range(30)]
    assert specificity(clf, persona, plain)[0] <= 0.05
    assert specificity(clf, PLAIN, plain)[0] >= 0.95  # called plain, not spread over the personas
    assert specificity(clf, persona, [content_answer(persona, rng) for _ in range(30)])[0] >= 0.7


class ContentTeacher:
    """A teacher whose answers carry the persona named in the system prompt's constitution: it writes
    content_answer for the shipped persona whose first trait the prompt holds."""

    def __init__(self):
        self.tok, self.rng = CharTokenizer(), random.Random(2)
        self.first = {load_constitution(p).traits[0].trait[:40]: p for p in shipped_personas()}

    def get_tokenizer(self):
        return self.tok

    def sample(self, prompt, num_samples, params):
        text = "".join(chr(t) for t in prompt.to_ints() if t >= 32)
        persona = next(p for head, p in self.first.items() if head in text)
        answer = content_answer(persona, self.rng)
        return Done(SimpleNamespace(sequences=[SimpleNamespace(tokens=self.tok.encode(answer))]))


class Teacher:
    """Answers with the first word of the constitution's first trait, counting its calls."""

    def __init__(self):
        self.tok, self.calls = CharTokenizer(), 0

    def get_tokenizer(self):
        return self.tok

    def sample(self, prompt, num_samples, params):
        self.calls += 1
        text = "".join(chr(t) for t in prompt.to_ints() if t >= 32)
        word = re.search(r"1\. I (\w+)", text).group(1)
        return Done(SimpleNamespace(sequences=[SimpleNamespace(tokens=self.tok.encode(f"{word} answer"))]))


def test_reference_answers_are_cached(tmp_path):
    teacher, made = Teacher(), []
    make = lambda: made.append(1) or teacher  # noqa: E731
    others = other_constitutions("pirate")[:3]
    sampling = ReferenceSampling("scripted", 16, 0)
    got, sampled = reference_answers(make, others, ["q1", "q2"], sampling, tmp_path)
    assert sampled == 6 and teacher.calls == 6 and set(got) == {c.name for c in others}
    assert all(len(v) == 2 and v[0].endswith("answer") for v in got.values())
    again, sampled = reference_answers(make, others, ["q2", "q1"], sampling, tmp_path)
    assert sampled == 0 and teacher.calls == 6 and len(made) == 1  # the teacher is not even made
    assert again[others[0].name] == got[others[0].name][::-1]
    _, sampled = reference_answers(make, others, ["q1", "q3"], sampling, tmp_path)
    assert sampled == 3  # only the new prompt
    _, sampled = reference_answers(make, others, ["q1"], ReferenceSampling("other-teacher", 16, 0), tmp_path)
    assert sampled == 3  # another teacher: its own answers
