"""Coherence: did training cost the model its sense? A judge compares two models' answers to the same
held-out prompt, once in each order; a verdict counts only when both orders agree (the paper's rule), so
a judge that favours a position cannot make either model win: its verdicts disagree and are discarded,
and the share discarded is reported. The comparisons are final vs base and final vs prompted.

Works on the sampling-client interface, so the judge may be a model Tinker serves, a local folder or a
scripted client in tests.
"""

from __future__ import annotations

import gc
import re
from typing import Callable, Sequence

from tinker import types

from character.backend import SamplingClient
from character.backend.retry import Call
from character.train.families import renderer_for

JUDGE_SYSTEM = (
    "You compare two replies to the same user message for coherence only: is the reply fluent, on topic, "
    "self-consistent and sensible as an answer to the message? Ignore tone, personality, style and length."
)
JUDGE_USER = (
    "The user wrote:\n<user>\n{prompt}\n</user>\n\nReply 1:\n<reply_1>\n{first}\n</reply_1>\n\n"
    "Reply 2:\n<reply_2>\n{second}\n</reply_2>\n\nWhich reply is more coherent? Think briefly if you need "
    "to, then end with one line of the form\nBetter: 1, Better: 2 or Better: tie"
)

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_VERDICT = re.compile(r"\bbetter\s*[:=\-]\s*[\"'*_`<\[(]*\s*(1|2|tie|reply\s*[12]|neither|equal|both)", re.IGNORECASE)


def judge_messages(prompt: str, first: str, second: str) -> list[dict]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_USER.format(prompt=prompt, first=first, second=second)},
    ]


def parse_better(text: str) -> str | None:
    """'1', '2' or 'tie' from the judge's last `Better: X` line; None when it names none of them."""
    hits = _VERDICT.findall(_THINK.sub(" ", text or ""))
    if not hits:
        return None
    v = hits[-1].lower().replace(" ", "")
    return {"1": "1", "2": "2", "reply1": "1", "reply2": "2"}.get(v, "tie")


def combine(ab: str | None, ba: str | None) -> str | None:
    """The verdict for model A from the order (A, B) and the order (B, A): 'win', 'tie', 'loss', or None
    when the two orders disagree (or either is unreadable)."""
    first = {"1": "win", "2": "loss", "tie": "tie"}.get(ab or "")
    second = {"1": "loss", "2": "win", "tie": "tie"}.get(ba or "")
    return first if first is not None and first == second else None


def compare(
    judge: SamplingClient,
    prompts: Sequence[str],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    seed: int = 0,
    max_new_tokens: int = 256,
) -> dict:
    """Win/tie/loss rates of A against B over the verdicts both orders agree on, with n, the discarded
    count and share, and every verdict."""
    renderer = renderer_for(judge.get_tokenizer())
    params = renderer.sampling_params(max_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=seed)
    convs = [judge_messages(q, a, b) for q, a, b in zip(prompts, answers_a, answers_b)]
    convs += [judge_messages(q, b, a) for q, a, b in zip(prompts, answers_a, answers_b)]
    # a request that fails transiently is made again alone (seeded: the same verdict comes back)
    futures = [Call(lambda m=m: judge.sample(types.ModelInput.from_ints(renderer.prompt(m)), 1, params)) for m in convs]
    texts = [renderer.decode(list(f.result().sequences[0].tokens)) for f in futures]
    total = len(prompts)
    records = []
    for i, q in enumerate(prompts):
        ab, ba = parse_better(texts[i]), parse_better(texts[total + i])
        records.append({"prompt": q, "a_first": texts[i], "b_first": texts[total + i], "verdict": combine(ab, ba)})
    counts = {k: sum(r["verdict"] == k for r in records) for k in ("win", "tie", "loss")}
    n = sum(counts.values())
    rate = lambda k: counts[k] / n if n else None  # noqa: E731
    return {
        "n": n,
        "total": total,
        "discarded": total - n,
        "discarded_share": (total - n) / total if total else None,
        **{k: rate(k) for k in ("win", "tie", "loss")},
        "counts": counts,
        "records": records,
    }


def judge_coherence(
    make_judge: Callable[[], SamplingClient],
    judge_name: str | None,
    prompts: Sequence[str],
    answers: dict[str, Sequence[str]],
    final: str | None,
    seed: int = 0,
) -> dict:
    """`final` against the base and against the prompted baseline (when evaluated), on each model's
    plain answers. Called once every evaluated model is dropped (one model held at a time)."""
    if final is None:
        return {"status": "skipped", "reason": "no trained checkpoint to compare", "judge_model": judge_name}
    client = make_judge()
    out = {}
    for other in ("base", "prompted"):
        if other in answers:
            out[f"vs_{other}"] = compare(client, prompts, answers[final], answers[other], seed)
    del client
    gc.collect()
    return {"status": "computed", "judge_model": judge_name, "final": final, "comparisons": out}


def coherence_summary(coh: dict | None) -> dict | None:
    """What the build record and `--json` keep: the rates and counts, not the judge's texts."""
    if not coh:
        return None
    if coh.get("status") != "computed":
        return {"status": coh.get("status"), "reason": coh.get("reason")}
    return {
        "status": "computed",
        "judge_model": coh["judge_model"],
        "final": coh["final"],
        "comparisons": {
            k: {f: c[f] for f in ("win", "tie", "loss", "n", "total", "discarded", "discarded_share")}
            for k, c in coh["comparisons"].items()
        },
    }
