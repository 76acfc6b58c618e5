"""Capability retention: a multiple-choice probe scored by log-probabilities, so it runs through any
sampling client (Tinker or local) with no generation and no answer parsing.

Each question is asked as a user message; each choice is scored as the assistant's reply: the summed
log-probability of its tokens (end-of-turn included), as lighteval's `loglikelihood_acc` scores a
continuation. The model's answer is the best-scoring choice; accuracy is the share answered right. The
length-normalized variant (mean log-prob per scored token) is kept beside it.

A set is JSONL (or a JSON list), one question per row, in the shape lighteval and Inspect use for such
sets: `question` (or `input`, `query`), `choices` (a list, or ARC's `{"text": [...], "label": [...]}`),
and the answer as an index (`answer`, `gold_index`) or a letter/label (`answer`, `target`, `answerKey`).
An exported MMLU or ARC split loads as it is. The shipped default (capability_set.jsonl) is our own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from character.errors import UserError

SHIPPED = "capability_set.jsonl"
AT_CHANCE_P = 0.05  # the base is "at chance" unless it beats chance at this significance (one-sided)


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


@dataclass
class CapabilitySet:
    name: str
    source: str
    questions: list[Question]

    @property
    def chance(self) -> float:
        """The expected accuracy of guessing uniformly among each question's choices."""
        return sum(1 / len(q.choices) for q in self.questions) / len(self.questions) if self.questions else 0.0


def _answer_index(row: dict, labels: list[str], n: int, where: str) -> int:
    for key in ("answer", "gold_index", "target", "answerKey", "label"):
        if key not in row:
            continue
        v = row[key]
        if isinstance(v, list) and len(v) == 1:  # lighteval stores gold_index as a list
            v = v[0]
        if isinstance(v, bool):
            break
        if isinstance(v, int):
            idx = v
        elif isinstance(v, str) and v.strip() in labels:
            idx = labels.index(v.strip())
        elif isinstance(v, str) and v.strip().isdigit():
            idx = int(v.strip())
        else:
            raise UserError(f"{where}, field '{key}': {v!r} is neither a choice index nor one of {labels}")
        if not 0 <= idx < n:
            raise UserError(f"{where}, field '{key}': index {idx} is outside the {n} choices")
        return idx
    raise UserError(f"{where}: no answer field ('answer', 'gold_index', 'target' or 'answerKey')")


def parse_question(row, where: str) -> Question:
    """One row of a set, in any of the accepted shapes (module docstring)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: not a JSON object")
    text = next((row[k] for k in ("question", "input", "query") if isinstance(row.get(k), str)), None)
    if not text or not text.strip():
        raise UserError(f"{where}: no question text (field 'question', 'input' or 'query')")
    choices, labels = row.get("choices"), None
    if isinstance(choices, dict):  # ARC: {"text": [...], "label": ["A", ...]}
        choices, labels = choices.get("text"), choices.get("label")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise UserError(f"{where}, field 'choices': expected at least two non-empty strings")
    labels = [str(x) for x in labels] if isinstance(labels, list) and len(labels) == len(choices) else None
    labels = labels or [chr(ord("A") + i) for i in range(len(choices))]
    return Question(text.strip(), tuple(c.strip() for c in choices), _answer_index(row, labels, len(choices), where))


def load_capability_set(
    path: str | Path | None = None, limit: int | None = None, option: str = "--capability-set"
) -> CapabilitySet:
    """The set in `path`, else the shipped one; at most `limit` questions (the first ones). `option` names
    where the path came from in errors (a flag or a variable)."""
    if path is None:
        text, name, source = resources.files("character.evaluation").joinpath(SHIPPED).read_text(), "shipped", SHIPPED
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{option} {path}: file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{option} {path}: not UTF-8 text") from None
        name, source = p.stem, str(p)
    if text.lstrip().startswith("["):
        try:
            rows = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise UserError(f"{option} {source}: not valid JSON ({e.msg})") from None
        where = "item"
    else:
        rows, where = [], "line"
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{option} {source}: line {i} is not valid JSON ({e.msg})") from None
    questions = [parse_question(r, f"{option} {source}: {where} {i}") for i, r in rows]
    if not questions:
        raise UserError(f"{option} {source}: no questions")
    return CapabilitySet(name, source, questions[:limit] if limit else questions)


def question_messages(q: Question, choice: int, system: str | None = None) -> list[dict]:
    """The conversation whose last turn is scored: the question asked, one choice as the reply."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": q.question}, {"role": "assistant", "content": q.choices[choice]}]


def render_choices(renderer, cap: CapabilitySet, system: str | None = None) -> tuple[list, list]:
    """(tokens, weights) of every question x choice, in order; weight 1 on the reply's tokens only."""
    seqs, weights = [], []
    for q in cap.questions:
        for k in range(len(q.choices)):
            t, w = renderer.training_tokens(question_messages(q, k, system), train_on="last_assistant")
            seqs.append(t)
            weights.append(w)
    return seqs, weights


def score_choices(cap: CapabilitySet, sums: list[tuple[float, float]]) -> dict:
    """Accuracy from the (summed log-prob, scored tokens) of every question x choice, in render order.
    Ties go to the first best choice (as argmax does)."""
    picks, picks_norm, k = [], [], 0
    for q in cap.questions:
        s = sums[k : k + len(q.choices)]
        k += len(q.choices)
        picks.append(max(range(len(s)), key=lambda j: s[j][0]))
        picks_norm.append(max(range(len(s)), key=lambda j: s[j][0] / max(s[j][1], 1.0)))
    n = len(cap.questions)
    right = [p == q.answer for p, q in zip(picks, cap.questions)]
    return {
        "capability_accuracy": sum(right) / n,
        "capability_accuracy_norm": sum(p == q.answer for p, q in zip(picks_norm, cap.questions)) / n,
        "capability_n": n,
        "capability_correct": sum(right),
        "capability_picks": picks,
    }


def above_chance_p(correct: int, cap: CapabilitySet) -> float:
    """One-sided p-value of getting at least `correct` right by guessing (each question at its own odds:
    the exact Poisson-binomial tail, by dynamic programming)."""
    dist = [1.0]
    for q in cap.questions:
        p = 1 / len(q.choices)
        dist = [
            (dist[j] if j < len(dist) else 0.0) * (1 - p) + (dist[j - 1] * p if j else 0.0)
            for j in range(len(dist) + 1)
        ]
    return min(1.0, math.fsum(dist[correct:]))


def capability_summary(cap: CapabilitySet, per_model: dict[str, dict]) -> dict:
    """The section users read: each model's accuracy with n and its change from the base, the chance
    level, and whether the base is at chance on this set (then the changes are noise)."""
    base = per_model.get("base")
    p = above_chance_p(base["capability_correct"], cap) if base else None
    models = {
        lb: {
            "accuracy": m["capability_accuracy"],
            "accuracy_norm": m["capability_accuracy_norm"],
            "n": m["capability_n"],
            "change": None if base is None or lb == "base" else m["capability_accuracy"] - base["capability_accuracy"],
        }
        for lb, m in per_model.items()
    }
    return {
        "status": "computed",
        "set": cap.name,
        "source": cap.source,
        "n": len(cap.questions),
        "chance": cap.chance,
        "base_above_chance_p": p,
        "base_at_chance": None if p is None else p >= AT_CHANCE_P,
        "models": models,
    }
