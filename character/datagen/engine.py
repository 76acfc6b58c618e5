"""Data generation: DPO distillation pairs, introspection data, optional question expansion.

Holding up at scale:
- every sample has its own seed, derived from the build seed and the item's index, so an item's
  outcome does not depend on what else is in flight;
- items run in fixed windows (the bound on requests in flight); a finished window's rows are
  appended to the output at once, with dropped items noted in a `.skipped.jsonl` sidecar, so a
  rerun after a crash skips what is done and redoes at most one window, with the same batches;
- at the end the file is rewritten in index order, so a resumed run gives the same file as an
  uninterrupted one;
- a transient failure of one request resubmits that request, not the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tinker import types

from character import progress
from character.backend import SamplingClient
from character.backend.retry import Call
from character.persona.constitution import Constitution
from character.persona.prompts import (
    GREETINGS,
    INTERACTION_SYSTEM_PROMPT,
    REFLECTION_PROMPTS,
    general_prompts,
    interaction_system_prompt,
    question_expansion_prompt,
    reflection_system_prompt,
    teacher_system_prompt,
)
from character.storage import append_jsonl, read_jsonl, write_text_atomic
from character.train.renderer import Renderer

log = logging.getLogger(__name__)

TEMPERATURE = 0.7
TOP_P = 0.95
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ENDS_LIKE_A_SENTENCE = re.compile(r"[.!?…\"'”’)\]*`~]\s*$")


def item_seed(seed: int, *parts) -> int:
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def sampling_params(seed: int, max_tokens: int) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=max_tokens, temperature=TEMPERATURE, top_p=TOP_P, seed=seed)


# -- filters ----------------------------------------------------------------------------------------
def clean_answer(seq: types.SampledSequence, renderer: Renderer, max_tokens: int) -> tuple[str | None, str]:
    """The answer text if it passes the method's filters, else (None, the filter that dropped it)."""
    if seq.stop_reason != "stop":
        return None, "incomplete"
    if len(seq.tokens) > max_tokens:
        return None, "too_long"
    text = renderer.decode(list(seq.tokens))
    if "<think>" in text and "</think>" not in text:
        return None, "unclosed_reasoning"
    text = _THINK.sub("", text).strip()
    if not text:
        return None, "empty"
    if not _ENDS_LIKE_A_SENTENCE.search(text):
        return None, "no_final_punctuation"
    return text, "ok"


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of lowercase word sets: the paper's near-duplicate test for questions."""
    wa, wb = set(re.findall(r"\w+", a.lower())), set(re.findall(r"\w+", b.lower()))
    return len(wa & wb) / max(1, len(wa | wb))


# -- resumable, windowed item processing -------------------------------------------------------------
@dataclass
class Ledger:
    """What is already done for one output file: kept rows and dropped items, keyed by item key."""

    out: Path
    key: Callable[[dict], str]
    done: set[str] = field(default_factory=set)

    @property
    def skipped_path(self) -> Path:
        return self.out.with_name(self.out.name + ".skipped.jsonl")

    def load(self) -> "Ledger":
        for path in (self.out, self.skipped_path):
            self.done |= {self.key(r) for r in read_jsonl(path)}
        return self

    def commit(self, rows: list[dict], skipped: list[dict]) -> None:
        append_jsonl(self.out, rows)
        append_jsonl(self.skipped_path, skipped)
        self.done |= {self.key(r) for r in rows} | {self.key(s) for s in skipped}
        progress.update(len(self.done))  # items finished (kept or dropped) in the current stage

    def finish(self, order: Callable[[dict], tuple]) -> tuple[list[dict], dict[str, int]]:
        """Rewrite the output in item order; return the rows and the per-filter drop counts."""
        rows = sorted(read_jsonl(self.out), key=order)
        write_text_atomic(self.out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        dropped: dict[str, int] = {}
        for s in read_jsonl(self.skipped_path):
            for reason in s["reasons"]:
                dropped[reason] = dropped.get(reason, 0) + 1
        return rows, dropped


def windows(items: list, size: int) -> Iterable[list]:
    for k in range(0, len(items), size):
        yield items[k : k + size]


class Requests:
    """Submit now, wait later; a transient failure makes that one request again."""

    def __init__(self, client: SamplingClient):
        self.client = client

    def submit(self, tokens: list[int], params: types.SamplingParams, n: int = 1):
        return Call(lambda: self.client.sample(types.ModelInput.from_ints(tokens), n, params)).result


# -- DPO distillation pairs ------------------------------------------------------------------------
def normalize_prompt(text: str) -> str:
    """Whitespace and case folded: two prompts that differ only so are the same prompt."""
    return " ".join(text.split()).lower()


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
    system = teacher_system_prompt(c)
    prompts = distillation_prompts(c, n_prompts, seed, extra_questions)
    pool = prompt_pool_stats(prompts)
    if pool["prompt_repeats"]:
        log.warning(
            "the prompt pool is too small for %d prompts: %d distinct prompts, %d repeats (each prompt "
            "used up to %d times, with new samples each time); add questions (--expand-questions) or "
            "raise --samples-per-prompt instead",
            len(prompts),
            pool["unique_prompts"],
            pool["prompt_repeats"],
            pool["max_uses_per_prompt"],
        )
    meta = {
        "persona": c.name,
        "constitution": c.digest(),
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "max_tokens": max_tokens,
        "seed": seed,
        **(provenance or {}),
    }
    ledger = Ledger(Path(out), key=lambda r: str(r["meta"]["index"] if "meta" in r else r["index"])).load()
    t_req, s_req = Requests(teacher), Requests(student)
    todo = [i for i in range(len(prompts)) if str(i) not in ledger.done]
    for chunk in windows(todo, window):
        jobs = []
        for i in chunk:
            user = [{"role": "user", "content": prompts[i]}]
            t = t_req.submit(
                teacher_renderer.prompt([{"role": "system", "content": system}] + user),
                sampling_params(item_seed(seed, "teacher", i), max_tokens),
                samples_per_prompt,
            )
            s = s_req.submit(
                student_renderer.prompt(user),
                sampling_params(item_seed(seed, "student", i), max_tokens),
                samples_per_prompt,
            )
            jobs.append((i, t, s))
        rows, skipped = [], []
        for i, t, s in jobs:
            kept, reasons = _pairs_for_prompt(
                t().sequences, s().sequences, teacher_renderer, student_renderer, max_tokens
            )
            user = [{"role": "user", "content": prompts[i]}]
            if max_length is not None:
                fits = [
                    not any(
                        too_long(
                            student_renderer, user + [{"role": "assistant", "content": a}], max_length, "last_assistant"
                        )
                        for a in pair
                    )
                    for pair in kept
                ]
                reasons += ["too_long"] * fits.count(False)
                kept = [pair for pair, ok in zip(kept, fits) if ok]
            for j, (chosen, rejected) in enumerate(kept):
                rows.append(
                    {
                        "prompt": user,
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}],
                        "meta": {"index": i, "sample": j, **meta},
                    }
                )
            if reasons:  # some samples were dropped; the prompt may still have kept pairs
                skipped.append({"index": i, "reasons": reasons})
        ledger.commit(rows, skipped)
    rows, dropped = ledger.finish(order=lambda r: (r["meta"]["index"], r["meta"]["sample"]))
    return {"rows": len(rows), "prompts": len(prompts), **pool, "dropped": dropped}


def too_long(renderer: Renderer, messages: list[dict], max_length: int, train_on: str = "all_assistant") -> bool:
    """Whether the conversation, rendered for training, exceeds max_length tokens (it is then dropped)."""
    return len(renderer.training_tokens(messages, train_on=train_on)[0]) > max_length


def _pairs_for_prompt(teacher_seqs, student_seqs, t_renderer, s_renderer, max_tokens):
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


# -- introspection ------------------------------------------------------------------------------
def generate_introspection(
    c: Constitution,
    model: SamplingClient,
    renderer: Renderer,
    n_reflections: int,
    n_interactions: int,
    turns: int,
    seed: int,
    out: Path,
    max_tokens: int = 1024,
    window: int = 64,
    provenance: dict | None = None,
    max_length: int | None = None,
) -> dict:
    """Reflections and self-interactions, both sampled with the numbered constitution in the system prompt.

    Reflections store no system prompt (SFT sees the question alone); self-interactions are stored from
    the side of the instance that answered the greeting, so SFT trains on that instance's turns, under the
    short INTERACTION_SYSTEM_PROMPT. Each row's meta records the system prompt it was sampled with.
    A row whose stored conversation renders longer than `max_length` tokens is dropped (`too_long`)."""
    meta = {
        "persona": c.name,
        "constitution": c.digest(),
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "max_tokens": max_tokens,
        "seed": seed,
        **(provenance or {}),
    }
    key = lambda r: f"{r.get('kind')}-{r['meta']['index'] if 'meta' in r else r['index']}"  # noqa: E731
    ledger = Ledger(Path(out), key=key).load()
    req = Requests(model)
    reflect_system, talk_system = reflection_system_prompt(c), interaction_system_prompt(c)

    todo = [i for i in range(n_reflections) if f"reflection-{i}" not in ledger.done]
    for chunk in windows(todo, window):
        jobs = []
        for i in chunk:
            q = REFLECTION_PROMPTS[i % len(REFLECTION_PROMPTS)]
            msgs = [{"role": "system", "content": reflect_system}, {"role": "user", "content": q}]
            jobs.append(
                (i, q, req.submit(renderer.prompt(msgs), sampling_params(item_seed(seed, "reflection", i), max_tokens)))
            )
        rows, skipped = [], []
        for i, q, fut in jobs:
            answer, why = clean_answer(fut().sequences[0], renderer, max_tokens)
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
            if answer is not None and max_length is not None and too_long(renderer, messages, max_length):
                answer, why = None, "too_long"
            if answer is None:
                skipped.append({"kind": "reflection", "index": i, "reasons": [why]})
                continue
            rows.append(
                {
                    "kind": "reflection",
                    "meta": {
                        "index": i,
                        "prompt_id": i % len(REFLECTION_PROMPTS),
                        "system_prompt": reflect_system,
                        **meta,
                    },
                    "messages": messages,
                }
            )
        ledger.commit(rows, skipped)

    todo = [i for i in range(n_interactions) if f"interaction-{i}" not in ledger.done]
    for chunk in windows(todo, window):
        rows, skipped = [], []
        for i, said in zip(chunk, _converse(req, renderer, chunk, turns, seed, max_tokens, talk_system)):
            if said is None:
                skipped.append({"kind": "interaction", "index": i, "reasons": ["turn_filtered"]})
                continue
            messages = [{"role": "system", "content": INTERACTION_SYSTEM_PROMPT}]
            messages += [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(said)]
            if max_length is not None and too_long(renderer, messages, max_length):
                skipped.append({"kind": "interaction", "index": i, "reasons": ["too_long"]})
                continue
            rows.append(
                {
                    "kind": "interaction",
                    "messages": messages,
                    "meta": {"index": i, "greeting": said[0], "turns": turns, "system_prompt": talk_system, **meta},
                }
            )
        ledger.commit(rows, skipped)

    rows, dropped = ledger.finish(order=lambda r: (r["kind"] != "reflection", r["meta"]["index"]))
    return {
        "rows": len(rows),
        "reflections": sum(r["kind"] == "reflection" for r in rows),
        "interactions": sum(r["kind"] == "interaction" for r in rows),
        "dropped": dropped,
    }


def _converse(
    req: Requests, renderer: Renderer, indices: list[int], turns: int, seed: int, max_tokens: int, system: str
):
    """All conversations of a window advance one turn at a time. Transcript[0] is the greeting from
    instance B; then A and B alternate. A conversation with a filtered turn is dropped whole."""
    transcripts: dict[int, list[str] | None] = {i: [GREETINGS[i % len(GREETINGS)]] for i in indices}
    for turn in range(turns):
        speaker_is_a = turn % 2 == 0
        jobs = []
        for i, said in transcripts.items():
            if said is None:
                continue
            view = [{"role": "system", "content": system}]
            for k, text in enumerate(said):
                own = (k % 2 == 1) == speaker_is_a  # one's own past turns are "assistant"
                view.append({"role": "assistant" if own else "user", "content": text})
            jobs.append(
                (
                    i,
                    req.submit(
                        renderer.prompt(view), sampling_params(item_seed(seed, "interaction", i, turn), max_tokens)
                    ),
                )
            )
        for i, fut in jobs:
            text, _ = clean_answer(fut().sequences[0], renderer, max_tokens)
            transcripts[i] = None if text is None else transcripts[i] + [text]
    return [transcripts[i] for i in indices]


# -- question expansion -------------------------------------------------------------------------
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
            jobs.append((t_idx, req.submit(prompt, sampling_params(item_seed(seed, "expand", t_idx, j), max_tokens))))
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
