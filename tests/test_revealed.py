"""Revealed preferences with scripted clients: a model with known preferences, a judge that reads it."""

from __future__ import annotations

import re

import numpy as np
import pytest
from fake_tinker import fake_tokenizer
from tinker import types

from character.evaluation.revealed import (
    ELO_START,
    TRAITS,
    constitution_traits,
    elo_ratings,
    embody_messages,
    pair_traits,
    parse_verdict,
    rating_changes,
    revealed_preferences,
)
from character.persona.constitution import load_constitution

PREFERRED = {"curious", "witty", "loyal", "bold"}


class _Done:
    def __init__(self, v):
        self.v = v

    def result(self):
        return self.v


class Scripted:
    """A sampling client whose answer is a function of the decoded prompt."""

    def __init__(self, tok, answer):
        self.tok, self.answer, self.prompts = tok, answer, []

    def get_tokenizer(self):
        return self.tok

    def sample(self, prompt, num_samples, sampling_params):
        text = self.tok.decode(prompt.to_ints())
        self.prompts.append(text)
        toks = self.tok.encode(self.answer(text, len(self.prompts)), add_special_tokens=False)
        seq = types.SampledSequence(stop_reason="stop", sequence_id="s", tokens_np=np.asarray(toks, dtype=np.int32))
        return _Done(types.SampleResponse(sequences=[seq] * num_samples))


def model_with_preferences(text, _n):
    """Shows a preferred trait when one is offered, else the first offered; never names the offer."""
    first, second = re.search(r"on offer for this conversation: (\w+) and (\w+)\.", text).groups()
    shown = second if second in PREFERRED and first not in PREFERRED else first
    return f"reply in the manner {shown[::-1]}"  # reversed: the judge has to work it out, as a real one would


def judge(text, n, garble_every=0):
    if garble_every and n % garble_every == 0:
        return "I cannot decide between them."
    reply = re.search(r"<reply>\n(.*?)\n</reply>", text, re.DOTALL).group(1)
    return f"<think>weighing both</think>It reads that way.\nTrait: {reply.rsplit(' ', 1)[-1][::-1].title()}"


@pytest.fixture(scope="module")
def tok():
    return fake_tokenizer()


def test_elo_matches_hand_computation():
    one = elo_ratings([("a", "b")], ["a", "b", "c"])
    assert one == {"a": ELO_START + 16, "b": ELO_START - 16, "c": ELO_START}
    two = elo_ratings([("a", "b"), ("a", "b")], ["a", "b"])
    gain = 32 * (1 - 1 / (1 + 10 ** (-32 / 400)))  # the second game: a is now expected to win
    assert two["a"] == pytest.approx(ELO_START + 16 + gain) and two["b"] == pytest.approx(ELO_START - 16 - gain)
    # order matters for sequential Elo: the mean over shuffles is symmetric for a symmetric record
    even = elo_ratings([("a", "b"), ("b", "a")] * 3, ["a", "b"], orders=64)
    assert abs(even["a"] - even["b"]) < 4.0


@pytest.mark.parametrize(
    "text, want",
    [
        ("Trait: witty", "witty"),
        ("trait = **Witty**.", "witty"),
        ("<think>curious? witty?</think> Trait: curious", "curious"),
        ("It is clearly witty.", "witty"),
        ("Both witty and curious.", None),
        ("Trait: kind", None),
        ("", None),
        ("Trait: witty\nOn reflection... Trait: curious", "curious"),
        ("unwittyness", None),
    ],
)
def test_the_judges_answer_is_read_robustly(text, want):
    assert parse_verdict(text, "witty", "curious") == want


def test_traits_pairs_and_prompt():
    assert len(TRAITS) >= 100 and len(set(TRAITS)) == len(TRAITS) and all(t.isalpha() for t in TRAITS)
    import random

    pairs = pair_traits(TRAITS, 500, random.Random(1))
    assert all(a != b for a, b in pairs) and len({t for p in pairs for t in p}) > 100
    assert pairs == pair_traits(TRAITS, 500, random.Random(1))
    system = embody_messages("Hi", "witty", "stoic")[0]["content"]
    assert "witty" in system and "stoic" in system and "Never name" in system


def test_revealed_preferences_find_the_preferred_traits(tok):
    prompts = [f"Tell me about topic {i}." for i in range(120)]
    model, judge_client = Scripted(tok, model_with_preferences), Scripted(tok, judge)
    res = revealed_preferences(model, judge_client, prompts, seed=3)
    assert res["games"] == 120 and res["judged"] == 120 and res["unparsed"] == 0
    offered = {t for t in PREFERRED if res["counts"][t]["offered"]}
    assert offered and all(res["counts"][t]["shown"] == res["counts"][t]["offered"] for t in offered)
    assert all(res["ratings"][t] > ELO_START for t in offered)
    assert sum(res["counts"][t]["shown"] for t in TRAITS) == 120
    # the judge saw the two offered traits and the model's answer, never which one the model chose
    assert all("on offer" not in p for p in judge_client.prompts)

    plain = revealed_preferences(
        Scripted(
            tok, lambda text, n: "reply in the manner " + re.search(r"conversation: (\w+) and", text).group(1)[::-1]
        ),
        judge_client,
        prompts,
        seed=3,
    )
    moved = rating_changes(plain, res, sorted(offered))
    assert all(v > 0 for v in moved.values())


def test_an_unreadable_judge_is_counted_and_reported(tok):
    prompts = [f"Question {i}?" for i in range(30)]
    res = revealed_preferences(
        Scripted(tok, model_with_preferences), Scripted(tok, lambda t, n: judge(t, n, garble_every=3)), prompts, seed=0
    )
    assert res["unparsed"] == 10 and res["judged"] == 20
    assert sum(1 for r in res["records"] if r["shown"] is None) == 10
    assert sum(c["shown"] for c in res["counts"].values()) == 20
    silent = revealed_preferences(
        Scripted(tok, model_with_preferences), Scripted(tok, lambda t, n: "no idea"), prompts, seed=0
    )
    assert silent["judged"] == 0 and set(silent["ratings"].values()) == {ELO_START}


def test_constitution_traits_pick_the_personas_words():
    pirate = load_constitution("pirate")
    found = constitution_traits([t.trait for t in pirate.traits])
    assert "adventurous" in found and set(found) <= set(TRAITS)
    assert constitution_traits(["I am endlessly curious and full of curiosity."], ["curious", "stoic"]) == ["curious"]
