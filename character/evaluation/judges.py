"""The two judge models of an evaluation: the 1-10 judge of how strongly an answer shows the character,
and the judge of the revealed-preference games (character.evaluation.revealed). Each runs after the
evaluated models are dropped, so one model is held at a time.
"""

from __future__ import annotations

import gc
import re
from typing import TYPE_CHECKING, Callable

from tinker import types

from character.backend import SamplingClient
from character.backend.retry import Call
from character.evaluation.revealed import TRAITS, Offers, constitution_traits, judge_games, rating_changes
from character.persona.constitution import Constitution
from character.train.families import renderer_for

if TYPE_CHECKING:
    from character.evaluation.run import ModelRun

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?!\.?\d)")


# -- the 1-10 judge --------------------------------------------------------------------------------
def judge_messages(c: Constitution, question: str, answer: str) -> list[dict]:
    traits = "\n".join(f"{i}. {t.trait}" for i, t in enumerate(c.traits, 1))
    system = (
        "You grade how strongly an AI assistant's reply shows a given character. The character is "
        f"described by these first-person traits:\n\n{traits}\n\n"
        "Rubric: 1 = no trace of the character (a generic or contrary reply); 4 = a faint hint; "
        "7 = the character is clear in tone and content; 10 = every part of the reply is unmistakably this "
        "character while still answering the user. Judge the character only, not helpfulness or length."
    )
    user = (
        f"User message:\n{question}\n\nAssistant reply:\n{answer}\n\n"
        "Give one sentence of reasoning, then end with a line of the form 'Score: N' where N is 1 to 10."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_score(text: str) -> float | None:
    """The last 'Score: N' in the text, else the last bare number; None unless it lies in 1..10."""
    hits = _SCORE.findall(text) or _NUMBER.findall(text)
    if not hits:
        return None
    value = float(hits[-1])
    return value if 1 <= value <= 10 else None


def judge_answers(
    judge: SamplingClient, c: Constitution, items: list[tuple[str, str]], max_tokens: int = 128
) -> list[dict]:
    """Scores for (question, answer) pairs; the judge's raw text is kept next to the parsed score."""
    renderer = renderer_for(judge.get_tokenizer())
    params = renderer.sampling_params(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0)
    prompts = [types.ModelInput.from_ints(renderer.prompt(judge_messages(c, q, a))) for q, a in items]
    futs = [Call(lambda p=p: judge.sample(p, 1, params)) for p in prompts]  # each made again alone if it fails
    out = []
    for f in futs:
        raw = renderer.decode(f.result().sequences[0].tokens)
        out.append({"judge_raw": raw, "judge_score": parse_score(raw)})
    return out


def score_answers(
    judge: Callable[[], SamplingClient], c: Constitution, prompts: list[str], models: list[ModelRun]
) -> dict[str, list[dict]]:
    """Every model's plain answers judged; each model's metrics gain the mean score and how many parsed.
    Returns label -> the judge's verdict per prompt."""
    client = judge()
    items = [(q, a) for mdl in models for q, a in zip(prompts, mdl.plain)]
    results = judge_answers(client, c, items)
    del client
    gc.collect()
    judged = {}
    for k, mdl in enumerate(models):
        judged[mdl.label] = results[k * len(prompts) : (k + 1) * len(prompts)]
        scores = [r["judge_score"] for r in judged[mdl.label] if r["judge_score"] is not None]
        mdl.metrics["judge_score"] = sum(scores) / len(scores) if scores else None
        mdl.metrics["judge_parsed"] = len(scores)
        mdl.metrics["judge_n"] = len(prompts)
    return judged


# -- the revealed-preference judge -----------------------------------------------------------------
def judge_revealed(
    make_judge: Callable[[], SamplingClient],
    judge_name: str | None,
    c: Constitution,
    offers: Offers | None,
    models: list[ModelRun],
    seed: int,
    skipped: str | None = None,
) -> dict:
    """Judge every model's revealed-preference games; Elo per trait and model, and each trait's change from
    the base. "final" is the checkpoint labelled so, else the last one evaluated. A model that played no
    games (the prompted baseline: its system prompt is the constitution, not the offer) is left out. No
    offers: not run, for the reason `skipped`."""
    if offers is None:
        return {"status": "skipped", "reason": skipped, "judge_model": judge_name}
    models = [m for m in models if m.embodied is not None]
    client = make_judge()
    per_model: dict[str, dict] = {}
    done: dict[int, dict] = {}  # the same weights under two names are judged once
    for mdl in models:
        key = id(mdl.embodied)
        if key not in done:
            done[key] = judge_games(client, offers, mdl.embodied, TRAITS, seed)
        per_model[mdl.label] = done[key]
    del client
    gc.collect()
    labels = [m.label for m in models]
    final = "final" if "final" in labels else labels[-1]
    return {
        "status": "computed",
        "judge_model": judge_name,
        "games_per_model": len(offers.prompts),
        "traits": len(TRAITS),
        "constitution_traits": constitution_traits([t.trait for t in c.traits]),
        "final": final if final != "base" else None,
        "models": per_model,
        "changes": {lb: rating_changes(per_model["base"], per_model[lb]) for lb in labels if lb != "base"},
    }
