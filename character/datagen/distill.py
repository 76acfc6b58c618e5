"""DPO distillation pairs: chosen = the teacher with the constitution, rejected = the student without."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from character.backend import SamplingClient
from character.datagen.engine import (
    Ledger,
    Requests,
    clean_answer,
    item_seed,
    normalize_prompt,
    process_in_windows,
    sample_meta,
    sampling_params,
    too_long,
)
from character.persona.constitution import Constitution
from character.persona.prompts import general_prompts, teacher_system_prompt
from character.train.renderer import Renderer

log = logging.getLogger(__name__)


def distillation_prompts(c: Constitution, n: int, seed: int, extra_questions: list[str] = ()) -> list[str]:
    """The constitution's (and expanded) questions first, then the general pool, each distinct prompt once;
    if n is larger than the pool, the pool repeats (each repeat draws new samples: see prompt_pool_stats)."""
    rng = random.Random(seed)
    own, pool = list(c.questions) + list(extra_questions), list(general_prompts())
    rng.shuffle(own)
    rng.shuffle(pool)
    merged, seen = [], set()
    for q in own + pool:
        if normalize_prompt(q) not in seen:
            seen.add(normalize_prompt(q))
            merged.append(q)
    return [merged[i % len(merged)] for i in range(n)]


def prompt_pool_stats(prompts: list[str]) -> dict:
    """How many distinct prompts a prompt list holds and how often they repeat."""
    counts: dict[str, int] = {}
    for p in prompts:
        counts[normalize_prompt(p)] = counts.get(normalize_prompt(p), 0) + 1
    return {
        "unique_prompts": len(counts),
        "prompt_repeats": len(prompts) - len(counts),
        "max_uses_per_prompt": max(counts.values(), default=0),
    }


def generate_dpo_pairs(
    c: Constitution,
    teacher: SamplingClient,
    student: SamplingClient,
    teacher_renderer: Renderer,
    student_renderer: Renderer,
    n_prompts: int,
    seed: int,
    out: Path,
    max_tokens: int = 1024,
    samples_per_prompt: int = 1,
    window: int = 64,
    extra_questions: list[str] = (),
    provenance: dict | None = None,
    max_length: int | None = None,
) -> dict:
    """Chosen = the teacher with the constitution in its system prompt; rejected = the student without.

    Each prompt gets `samples_per_prompt` samples from each side; sample j of the teacher is paired
    with sample j of the student. Rows are TRL's conversational preference format plus `meta`.
    A pair whose chosen or rejected conversation, rendered in the student's chat template, is longer
    than `max_length` tokens is dropped (filter `too_long`): training never cuts an answer short.
    """
    prompts = distillation_prompts(c, n_prompts, seed, extra_questions)
    pool = prompt_pool_stats(prompts)
    if pool["prompt_repeats"]:
        _warn_of_repeats(len(prompts), pool)
    job = _Distillation(
        prompts,
        teacher_system_prompt(c),
        Requests(teacher),
        Requests(student),
        teacher_renderer,
        student_renderer,
        seed,
        max_tokens,
        samples_per_prompt,
        max_length,
        sample_meta(c, max_tokens, seed, provenance),
    )
    ledger = Ledger(Path(out), key=lambda r: str(r["meta"]["index"] if "meta" in r else r["index"])).load()
    todo = [i for i in range(len(prompts)) if str(i) not in ledger.done]
    process_in_windows(ledger, todo, window, job.window)
    rows, dropped = ledger.finish(order=lambda r: (r["meta"]["index"], r["meta"]["sample"]))
    return {"rows": len(rows), "prompts": len(prompts), **pool, "dropped": dropped}


def _warn_of_repeats(n: int, pool: dict) -> None:
    log.warning(
        "the prompt pool is too small for %d prompts: %d distinct prompts, %d repeats (each prompt "
        "used up to %d times, with new samples each time); add questions (--expand-questions) or "
        "raise --samples-per-prompt instead",
        n,
        pool["unique_prompts"],
        pool["prompt_repeats"],
        pool["max_uses_per_prompt"],
    )


@dataclass
class _Distillation:
    """How one build asks both models each prompt, and turns their answers into preference rows."""

    prompts: list[str]
    system: str  # the teacher's, with the constitution
    teacher: Requests
    student: Requests
    teacher_renderer: Renderer
    student_renderer: Renderer
    seed: int
    max_tokens: int
    samples_per_prompt: int
    max_length: int | None
    meta: dict

    def window(self, chunk: list[int]) -> tuple[list[dict], list[dict]]:
        """Every prompt of the window submitted to both models before any answer is awaited."""
        jobs = [(i, *self._submit(i)) for i in chunk]
        rows, skipped = [], []
        for i, t, s in jobs:
            kept, reasons = _pairs_for_prompt(
                t().sequences, s().sequences, self.teacher_renderer, self.student_renderer, self.max_tokens
            )
            if self.max_length is not None:
                kept, n_long = self._fitting(self._user(i), kept)
                reasons += ["too_long"] * n_long
            rows += [self._row(i, j, chosen, rejected) for j, (chosen, rejected) in enumerate(kept)]
            if reasons:  # some samples were dropped; the prompt may still have kept pairs
                skipped.append({"index": i, "reasons": reasons})
        return rows, skipped

    def _user(self, i: int) -> list[dict]:
        return [{"role": "user", "content": self.prompts[i]}]

    def _submit(self, i: int):
        t = self.teacher.submit(
            self.teacher_renderer.prompt([{"role": "system", "content": self.system}] + self._user(i)),
            sampling_params(item_seed(self.seed, "teacher", i), self.max_tokens, self.teacher_renderer.stop_tokens),
            self.samples_per_prompt,
        )
        s = self.student.submit(
            self.student_renderer.prompt(self._user(i)),
            sampling_params(item_seed(self.seed, "student", i), self.max_tokens, self.student_renderer.stop_tokens),
            self.samples_per_prompt,
        )
        return t, s

    def _fitting(self, user: list[dict], kept: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
        """The pairs whose answers both fit max_length in the student's template, and how many did not."""
        fits = [
            not any(
                too_long(
                    self.student_renderer,
                    user + [{"role": "assistant", "content": a}],
                    self.max_length,
                    "last_assistant",
                )
                for a in pair
            )
            for pair in kept
        ]
        return [pair for pair, ok in zip(kept, fits) if ok], fits.count(False)

    def _row(self, i: int, j: int, chosen: str, rejected: str) -> dict:
        return {
            "prompt": self._user(i),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "meta": {"index": i, "sample": j, **self.meta},
        }


def _pairs_for_prompt(teacher_seqs, student_seqs, t_renderer, s_renderer, max_tokens):
    """Sample j of the teacher paired with sample j of the student, unless a filter drops either, they are
    identical, or the pair was already kept; returns the kept pairs and the reasons for the others."""
    kept, reasons, seen = [], [], set()
    for t_seq, s_seq in zip(teacher_seqs, student_seqs):
        chosen, why_c = clean_answer(t_seq, t_renderer, max_tokens)
        rejected, why_r = clean_answer(s_seq, s_renderer, max_tokens)
        if chosen is None or rejected is None:
            reasons += [f"chosen_{why_c}"] if chosen is None else []
            reasons += [f"rejected_{why_r}"] if rejected is None else []
            continue
        if chosen == rejected:
            reasons.append("identical")
            continue
        if (chosen, rejected) in seen:
            reasons.append("duplicate")
            continue
        seen.add((chosen, rejected))
        kept.append((chosen, rejected))
    return kept, reasons
