"""The tokens a build will use, per stage and model, before it runs (`character plan`).

Prompts are known in advance: the estimate renders the very prompts each stage will send (the
constitution's questions and the shipped pool in the build's order, the reflection prompts, the
self-interaction views) in each model's chat template, so prefill is counted, not guessed. What the
models will answer is not known: each sampled answer is taken to be `answer_tokens` long, and a
share `keep` of the generated rows to survive the filters. Both come from the newest build in the
workspace that counted them for the same stage and model (`Calibration.from_workspace`), else from
DEFAULT_ANSWERS (measured for `tiny`; for served chat models a typical non-thinking answer),
capped at --max-new-tokens. Training tokens follow from those rows, the held-out split and the epochs.

Evaluation is not estimated here (its tokens are counted on Tinker, and shown, after the build).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from character.config import PipelineConfig
from character.cost.meter import KINDS

# (answer tokens per sample, share of rows kept) when no build in the workspace measured them.
# tiny: measured on the smoke and demo builds (its answers are 25-40 tokens, all but a few kept).
# Served chat models in non-thinking mode: a few paragraphs; reflections run longer.
DEFAULT_ANSWERS = {
    "tiny": {"questions": (30, 1.0), "dpo_data": (31, 0.97), "introspection": (36, 1.0)},
    "*": {"questions": (40, 0.9), "dpo_data": (300, 0.9), "introspection": (400, 0.9)},
}
QUESTION_MAX_TOKENS = 128  # character.datagen.questions.expand_questions' answer limit
DATA_STAGES = ("questions", "dpo_data", "introspection")


@dataclass
class Calibration:
    """Measured answer lengths {(stage, model): tokens per sample} and kept shares {stage: share}."""

    answers: dict[tuple[str, str], float] = field(default_factory=dict)
    keep: dict[str, float] = field(default_factory=dict)
    rates: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> seconds per token, by kind
    source: str | None = None  # the build the figures came from

    @classmethod
    def from_workspace(cls, workdir: str | Path, backend: str, max_new_tokens: int | None = None) -> "Calibration":
        """The newest build records (by finish time) that counted tokens, on the same backend and with the same
        answer limit (answers are cut at it)."""
        from character.build.paths import build_records

        recs = []
        for path in build_records(workdir):
            try:
                rec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            cfg = rec.get("config") or {}
            if cfg.get("backend", "local") == backend and max_new_tokens in (None, cfg.get("max_new_tokens")):
                recs.append(rec)
        recs.sort(key=lambda r: max((s.get("finished_at", "") for s in r.get("stages", {}).values()), default=""))
        cal = cls()
        for rec in recs:  # newer records overwrite older figures
            cal._absorb(rec)
        return cal

    def _absorb(self, rec: dict) -> None:
        stages, cfg = rec.get("stages") or {}, rec.get("config") or {}
        for stage, st in stages.items():
            n = sum(t.get(k, 0) for t in (st.get("tokens") or {}).values() for k in KINDS)
            if n and st.get("seconds"):
                self.rates[stage] = {k: st["seconds"] / n for k in KINDS}
        for stage in DATA_STAGES:
            st = stages.get(stage) or {}
            for model, t in (st.get("tokens") or {}).items():
                if t.get("samples"):
                    self.answers[(stage, model)] = t["sample"] / t["samples"]
                    self.source = f"{rec.get('persona')}/{rec.get('build_id')}"
            asked = _asked(stage, st, cfg)
            if asked and st.get("rows") is not None and st.get("tokens"):
                self.keep[stage] = min(1.0, st["rows"] / asked)

    def answer(self, stage: str, model: str, cap: int) -> float:
        default = DEFAULT_ANSWERS["tiny" if model == "tiny" else "*"][stage][0]
        return min(float(cap), self.answers.get((stage, model), default))

    def kept(self, stage: str, model: str) -> float:
        return self.keep.get(stage, DEFAULT_ANSWERS["tiny" if model == "tiny" else "*"][stage][1])


def _asked(stage: str, st: dict, cfg: dict) -> int | None:
    """How many rows a stage asked for (before its filters), from its record and the build's config."""
    if stage == "dpo_data" and st.get("prompts"):
        return st["prompts"] * (cfg.get("samples_per_prompt") or 1)
    if stage == "introspection" and "reflections" in st:
        try:
            c = PipelineConfig(**cfg).counts
        except Exception:  # noqa: BLE001 - an old record's config may not validate today
            return None
        return c.reflections + c.interactions
    return None


@dataclass
class StageEstimate:
    stage: str
    tokens: dict[str, dict[str, int]]  # model -> {prefill, sample, train}
    note: str = ""


class _Tally:
    def __init__(self):
        self.tokens: dict[str, dict[str, float]] = {}

    def add(self, model: str, **kw: float) -> None:
        row = self.tokens.setdefault(model, {k: 0.0 for k in KINDS})
        for k, v in kw.items():
            row[k] += v

    def rounded(self) -> dict[str, dict[str, int]]:
        return {m: {k: int(round(v)) for k, v in row.items()} for m, row in sorted(self.tokens.items())}


def held_out(groups: int, fraction: float) -> int:
    """Groups the held-out split takes (character.datagen.heldout.split_heldout's rule)."""
    if groups <= 1:
        return 0
    return min(groups - 1, max(1 if fraction > 0 else 0, round(fraction * groups)))


def estimate(cfg: PipelineConfig, renderer_for: Callable[[str], object], cal: Calibration) -> list[StageEstimate]:
    """Per stage of the build in its mode, the tokens each model will prefill, sample and train on."""
    out = []
    if cfg.counts.expand_questions:
        out.append(_questions(cfg, renderer_for, cal))
    data, pairs = _dpo_data(cfg, renderer_for, cal)
    out += [data, pairs]
    intro, rows = _introspection(cfg, renderer_for, cal)
    out += [intro, _sft(cfg, rows)]
    return out


def _questions(cfg: PipelineConfig, renderer_for, cal: Calibration) -> StageEstimate:
    from character.persona.prompts import question_expansion_prompt

    c, teacher = cfg.constitution(), cfg.teacher_model or cfg.base_model
    r, t = renderer_for(teacher), _Tally()
    length = cal.answer("questions", teacher, min(QUESTION_MAX_TOKENS, cfg.max_new_tokens))
    for trait in c.traits:
        n = len(r.prompt([{"role": "user", "content": question_expansion_prompt(trait.trait, trait.questions)}]))
        t.add(teacher, prefill=n * cfg.counts.expand_questions, sample=length * cfg.counts.expand_questions)
    return StageEstimate("questions", t.rounded())


def _dpo_data(cfg: PipelineConfig, renderer_for, cal: Calibration) -> tuple[StageEstimate, StageEstimate]:
    """Long because it walks the prompts once for both the sampling stage and the DPO training on its pairs."""
    from character.datagen.distill import distillation_prompts
    from character.persona.prompts import teacher_system_prompt

    c, n = cfg.constitution(), cfg.counts
    teacher, student = cfg.teacher_model or cfg.base_model, cfg.base_model
    rt, rs = renderer_for(teacher), renderer_for(student)
    n_prompts = -(-n.dpo_pairs // n.samples_per_prompt)
    prompts = distillation_prompts(c, n_prompts, cfg.seed)  # expanded questions are not known yet: pool order
    system = {"role": "system", "content": teacher_system_prompt(c)}
    lt = cal.answer("dpo_data", teacher, cfg.max_new_tokens)
    ls = cal.answer("dpo_data", student, cfg.max_new_tokens)
    data, seq_lens, cache = _Tally(), [], {}
    for q in prompts:
        if q not in cache:
            user = [{"role": "user", "content": q}]
            answered = user + [{"role": "assistant", "content": ""}]
            empty = len(rs.training_tokens(answered, train_on="last_assistant")[0])
            cache[q] = (len(rt.prompt([system] + user)), len(rs.prompt(user)), empty)
        pt, ps, empty = cache[q]
        data.add(teacher, prefill=pt, sample=lt * n.samples_per_prompt)
        data.add(student, prefill=ps, sample=ls * n.samples_per_prompt)
        seq_lens.append((empty + lt - 1, empty + ls - 1))  # "" already renders the end-of-turn token
    kept = n_prompts * n.samples_per_prompt * cal.kept("dpo_data", student)
    groups = len({" ".join(q.split()).lower() for q in prompts})
    train_pairs = kept * (1 - held_out(groups, cfg.heldout_fraction) / max(1, groups))
    per_pair = sum(a + b for a, b in seq_lens) / max(1, len(seq_lens))  # both sequences, whole
    inputs = per_pair - 2  # a datum's input is its tokens but the last
    dpo = _Tally()
    dpo.add(student, prefill=train_pairs * per_pair)  # reference log-probs, once
    dpo.add(student, prefill=cfg.dpo.epochs * train_pairs * inputs, train=cfg.dpo.epochs * train_pairs * inputs)
    return StageEstimate("dpo_data", data.rounded()), StageEstimate("dpo", dpo.rounded(), "custom loss: 2 passes")


def _introspection(cfg: PipelineConfig, renderer_for, cal: Calibration) -> tuple[StageEstimate, tuple[float, float]]:
    """The sampling of reflections and self-interactions; also the mean SFT row length and the row count."""
    from character.persona.prompts import (
        GREETINGS,
        INTERACTION_SYSTEM_PROMPT,
        REFLECTION_PROMPTS,
        interaction_system_prompt,
        reflection_system_prompt,
    )

    c, n, model = cfg.constitution(), cfg.counts, cfg.base_model  # the DPO checkpoint, priced as its base
    r, t = renderer_for(model), _Tally()
    length = cal.answer("introspection", model, cfg.max_new_tokens)
    reflect, talk = reflection_system_prompt(c), interaction_system_prompt(c)
    row_tokens = []
    for i in range(n.reflections):
        q = REFLECTION_PROMPTS[i % len(REFLECTION_PROMPTS)]
        t.add(model, prefill=len(r.prompt([{"role": "system", "content": reflect}, {"role": "user", "content": q}])))
        if i < len(REFLECTION_PROMPTS):
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": ""}]
            row_tokens.append(("r", len(r.training_tokens(msgs)[0]) + length - 1))
    t.add(model, sample=length * n.reflections)
    for i in range(min(n.interactions, len(GREETINGS))):  # the views depend on the greeting only
        said, share = [GREETINGS[i % len(GREETINGS)]], _share(n.interactions, i, len(GREETINGS))
        for turn in range(n.turns):
            own = lambda k: (k % 2 == 1) == (turn % 2 == 0)  # noqa: E731 - one's own past turns are "assistant"
            view = [{"role": "system", "content": talk}]
            view += [{"role": "assistant" if own(k) else "user", "content": s} for k, s in enumerate(said)]
            t.add(model, prefill=share * (len(r.prompt(view)) + turn * (length - 1)), sample=share * length)
            said = said + [""]
        msgs = [{"role": "system", "content": INTERACTION_SYSTEM_PROMPT}]
        msgs += [{"role": "user" if k % 2 == 0 else "assistant", "content": s} for k, s in enumerate(said)]
        row_tokens.append(("i", len(r.training_tokens(msgs)[0]) + n.turns * (length - 1)))
    rows = (n.reflections + n.interactions) * cal.kept("introspection", model)
    mean = _mix(row_tokens, n.reflections, n.interactions)
    return StageEstimate("introspection", t.rounded()), (rows, mean)


def _share(total: int, i: int, period: int) -> int:
    """How many of `total` items use greeting i of `period` (items cycle through them)."""
    return total // period + (1 if i < total % period else 0)


def _mix(row_tokens: list[tuple[str, float]], n_r: int, n_i: int) -> float:
    mean = lambda kind: sum(v for k, v in row_tokens if k == kind) / max(1, sum(k == kind for k, _ in row_tokens))  # noqa: E731
    return (n_r * mean("r") + n_i * mean("i")) / max(1, n_r + n_i)


def _sft(cfg: PipelineConfig, rows_and_mean: tuple[float, float]) -> StageEstimate:
    rows, mean = rows_and_mean
    groups = int(round(rows))
    train_rows = rows - held_out(groups, cfg.heldout_fraction)
    t = _Tally()
    t.add(cfg.base_model, train=cfg.sft.epochs * train_rows * (mean - 1))
    return StageEstimate("sft", t.rounded())


def total_tokens(stages: list[StageEstimate]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in stages:
        for model, row in s.tokens.items():
            acc = out.setdefault(model, {k: 0 for k in KINDS})
            for k in KINDS:
                acc[k] += row.get(k, 0)
    return out


def approx_renderer_note() -> str:
    return "no tokenizer here for this model: ~4 characters per token"


class ApproxRenderer:
    """Token counts without the model's tokenizer (a Tinker model whose tokenizer is not cached here):
    about 4 characters per token, plus a few tokens of chat template per message."""

    PER_MESSAGE = 5

    def _n(self, messages) -> int:
        return sum(math.ceil(len(m["content"]) / 4) + self.PER_MESSAGE for m in messages)

    def prompt(self, messages) -> list[int]:
        return [0] * (self._n(messages) + 3)

    def training_tokens(self, messages, train_on: str = "all_assistant") -> tuple[list[int], list[float]]:
        n = self._n(messages)
        return [0] * n, [0.0] * n
