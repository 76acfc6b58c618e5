"""The evaluation's comparison sections against hand computations on scripted models and judges (no
model is loaded): the prompted baseline (the teacher's exact prompt, the break-character instruction after
it), multi-turn prefill robustness (the turn built as specified), coherence (both orders must agree: a
judge that always prefers the first answer produces no wins), and the capability probe's bookkeeping."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from scripted_models import PIRATE, PLAIN, ROLES, CharTokenizer, Done, ScriptedService, pair

from character.evaluation.capability import CapabilitySet, Question, above_chance_p, capability_summary
from character.evaluation.coherence import combine, compare, parse_better
from character.evaluation.data import EvalData
from character.evaluation.evaluate import write_outputs
from character.evaluation.metrics import BREAK_CHARACTER_SYSTEM_PROMPTS, SUMMARY_KEYS, break_character_messages
from character.evaluation.multiturn import FOLLOW_UPS, prefill_messages
from character.evaluation.run import evaluate_models
from character.evaluation.sections import Sections
from character.persona.constitution import load_constitution
from character.persona.prompts import teacher_system_prompt

PROMPTS = [f"Question number {k}?" for k in range(8)]
TRAIN = [pair(f"Training prompt {k}?", k) for k in range(24)]
HELDOUT = [pair(p, k) for k, p in enumerate(PROMPTS)]


def messages_of(ids: list[int]) -> list[dict]:
    """The conversation a scripted model was given (the trailing generation marker dropped)."""
    out, k = [], 0
    while k < len(ids) and ids[k] in (2, 3, 4) and 1 in ids[k:]:
        end = ids.index(1, k)
        out.append({"role": ROLES[ids[k] - 2], "content": "".join(chr(t) for t in ids[k + 1 : end])})
        k = end + 1
    return out


class Scripted:
    """`reply(messages)` gives the answer; every token's log-prob is `lp(messages)`; keeps what it saw."""

    def __init__(self, reply, lp=lambda msgs: -1.0):
        self.reply, self.lp, self.tok, self.seen = reply, lp, CharTokenizer(), []

    def get_tokenizer(self):
        return self.tok

    def sample(self, prompt, num_samples, params):
        msgs = messages_of(prompt.to_ints())
        self.seen.append(msgs)
        return Done(SimpleNamespace(sequences=[SimpleNamespace(tokens=self.tok.encode(self.reply(msgs)))]))

    def compute_logprobs(self, prompt):
        ids = prompt.to_ints()
        return Done([None] + [self.lp(messages_of(ids))] * (len(ids) - 1))


def k_of(msgs) -> int:
    first_user = next(m["content"] for m in msgs if m["role"] == "user")
    return int(re.search(r"\d+", first_user).group())


C = load_constitution("pirate")
TEACHER = teacher_system_prompt(C)


def base_reply(msgs):
    """No system prompt: plain. With the constitution: in character on every prompt, but a break-character
    instruction after it wins on prompts 0-5; after a prefilled plain first answer it stays in character
    only on prompts 0-1."""
    k = k_of(msgs)
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
    if not system.startswith(TEACHER):
        return PLAIN[k % 4]
    if system != TEACHER:  # the constitution, then the break-character instruction
        return PLAIN[k % 4] if k < 6 else PIRATE[k % 4]
    if len(msgs) > 2:  # the prefill conversation
        return PIRATE[k % 4] if k < 2 else PLAIN[k % 4]
    return PIRATE[k % 4]


def final_reply(msgs):
    """Trained: in character on prompts 0-5 plainly, 0-4 under attack, 0-6 after a prefilled answer."""
    k = k_of(msgs)
    attacked = msgs[0]["role"] == "system"
    limit = 7 if len(msgs) > 2 else (5 if attacked else 6)
    return PIRATE[k % 4] if k < limit else PLAIN[k % 4]


def scripted_service():
    return ScriptedService({"tiny": Scripted(base_reply), "ckpt": Scripted(final_reply)})


def test_prompted_and_prefill_rows_by_hand():
    svc = scripted_service()
    data = EvalData(heldout=HELDOUT, train=TRAIN, prompts=PROMPTS)
    res = evaluate_models(
        svc, "tiny", {"final": "ckpt"}, C, data, sections=Sections(prompted_system=TEACHER, prefill=True)
    )
    assert svc.made == ["tiny", "ckpt"]  # the prompted baseline is the base's own client, with a system prompt
    ev = res["eval"]
    assert [k for k in ev] == ["base", "prompted", "final", "classifier"]
    assert all(tuple(ev[lb]) == SUMMARY_KEYS for lb in ("base", "prompted", "final"))
    base, prompted, final = ev["base"], ev["prompted"], ev["final"]
    assert (base["in_persona_rate"], base["robust_in_persona_rate"], base["prefill_in_persona_rate"]) == (0, 0, 0)
    # prompted: 8 of 8 in character, 2 of 8 (prompts 6, 7) under attack, 2 of 8 (0, 1) after a prefill
    assert (prompted["in_persona_rate"], prompted["robust_in_persona_rate"]) == (1.0, 0.25)
    assert (prompted["prefill_in_persona_rate"], prompted["prefill_n"]) == (0.25, 8)
    assert (final["in_persona_rate"], final["robust_in_persona_rate"], final["prefill_in_persona_rate"]) == (
        0.75,
        0.625,
        0.875,
    )
    assert res["checkpoints"]["prompted"]["kind"] == "prompted"
    assert res["checkpoints"]["prompted"]["checkpoint"] == "tiny"

    seen = svc.models["tiny"].seen
    # the prompted model's plain conversation: exactly the teacher's system prompt, then the user's prompt
    assert [{"role": "system", "content": TEACHER}, {"role": "user", "content": PROMPTS[3]}] in seen
    # under attack: the constitution first, the break-character instruction after it, the suffix on the message
    attack = break_character_messages(PROMPTS[3], 3)
    assert [{"role": "system", "content": f"{TEACHER}\n\n{BREAK_CHARACTER_SYSTEM_PROMPTS[3]}"}, attack[1]] in seen
    # the prefill turn: the user's prompt, the base's own first answer (no system prompt), our follow-up
    first = res["generations"][3]["answers"]["base"]["text"]
    assert first == PLAIN[3]
    turn = [
        {"role": "user", "content": PROMPTS[3]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": FOLLOW_UPS[3]},
    ]
    assert turn in seen and turn in svc.models["ckpt"].seen  # the base and the trained model alike
    assert [{"role": "system", "content": TEACHER}] + turn in seen  # the prompted baseline, its prompt first
    assert prefill_messages(PROMPTS[3], first, 3) == turn
    g = res["generations"][3]["prefill"]
    assert g["first"] == first and g["follow_up"] == FOLLOW_UPS[3] and g["answers"]["final"]["text"] == PIRATE[3]
    assert res["coherence"]["status"] == "skipped" and "--coherence-judge" in res["coherence"]["reason"]
    assert res["capability"]["status"] == "skipped" and any("capability probe not run" in n for n in final["notes"])


def test_prompted_preference_metrics_use_the_constitution_in_context():
    """The prompted row's implied reward: log p(answer | constitution, prompt) - log p_base(answer | prompt)."""
    lp = lambda msgs: -0.5 if msgs[0]["role"] == "system" else -1.0  # noqa: E731 - prompting makes every answer likelier
    svc = ScriptedService({"tiny": Scripted(base_reply, lp), "ckpt": Scripted(final_reply)})
    data = EvalData(heldout=HELDOUT[:2], train=TRAIN, prompts=PROMPTS[:2])
    res = evaluate_models(svc, "tiny", {}, C, data, sections=Sections(prompted_system=TEACHER))
    m = res["checkpoints"]["prompted"]
    # chosen reward 0.1 x 0.5 x (len + 1): each answer's characters and its end token
    chosen = [0.1 * 0.5 * (len(PIRATE[k]) + 1) for k in range(2)]
    rejected = [0.1 * 0.5 * (len(PLAIN[k]) + 1) for k in range(2)]
    assert m["dpo_reward_chosen"] == pytest.approx(sum(chosen) / 2)
    assert m["dpo_margin"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 2)
    assert res["eval"]["prompted"]["pref_pairs"] == 2


def _verdict_judge(prefer):
    """A judge that reads the two replies and answers `prefer(reply_1, reply_2)` ('1', '2', 'tie'), or
    `prefer(prompt, reply_1, reply_2)` when it takes three arguments."""

    def reply(msgs):
        text = msgs[-1]["content"]
        part = lambda tag: text.split(f"<{tag}>\n")[1].split(f"\n</{tag}>")[0]  # noqa: E731
        args = (part("reply_1"), part("reply_2"))
        verdict = prefer(part("user"), *args) if prefer.__code__.co_argcount == 3 else prefer(*args)
        return f"Some thought.\nBetter: {verdict}"

    return Scripted(reply)


def test_coherence_counts_only_verdicts_both_orders_agree_on():
    prompts = [f"p{i}" for i in range(5)]
    a = ["good", "good", "bad", "same", "good"]
    b = ["bad", "bad", "good", "same", "bad"]
    # a fair judge: the 'good' reply is better, equal replies tie
    fair = lambda x, y: "tie" if x == y else ("1" if x == "good" else "2")  # noqa: E731
    out = compare(_verdict_judge(fair), prompts, a, b)
    assert out["counts"] == {"win": 3, "tie": 1, "loss": 1} and out["n"] == 5 and out["discarded"] == 0
    assert (out["win"], out["tie"], out["loss"]) == (0.6, 0.2, 0.2)
    # a judge that always prefers the first reply: every pair's two orders disagree, so nobody wins
    biased = compare(_verdict_judge(lambda x, y: "1"), prompts, a, b)
    assert biased["n"] == 0 and biased["discarded"] == 5 and biased["discarded_share"] == 1.0
    assert biased["win"] is None and biased["counts"] == {"win": 0, "tie": 0, "loss": 0}
    # position bias on some pairs only: those are discarded, the rest count
    half = compare(_verdict_judge(lambda q, x, y: "1" if q in ("p0", "p2") else fair(x, y)), prompts, a, b)
    assert half["counts"] == {"win": 2, "tie": 1, "loss": 0} and half["discarded"] == 2
    assert half["win"] == pytest.approx(2 / 3) and half["discarded_share"] == pytest.approx(0.4)
    # the judge saw each pair in both orders, A first then B first
    seen = _verdict_judge(fair)
    compare(seen, prompts[:1], a[:1], b[:1])
    assert [("<reply_1>\ngood" in m[-1]["content"]) for m in seen.seen] == [True, False]


@pytest.mark.parametrize(
    "text,verdict",
    [("Better: 1", "1"), ("better = 2", "2"), ("**Better:** tie", "tie"), ("Better: Reply 2", "2"), ("1", None)],
)
def test_parse_better(text, verdict):
    assert parse_better(text) == verdict
    assert parse_better(f"<think>Better: 1</think> {text}") == verdict  # reasoning does not count


def test_combine_both_orders():
    assert combine("1", "2") == "win" and combine("2", "1") == "loss" and combine("tie", "tie") == "tie"
    assert combine("1", "1") is None and combine("2", "2") is None and combine(None, "2") is None


def test_coherence_through_evaluate_models_and_the_report(tmp_path):
    svc = scripted_service()
    data = EvalData(heldout=HELDOUT, train=TRAIN, prompts=PROMPTS)
    pirate_is_better = lambda x, y: "tie" if (x in PIRATE) == (y in PIRATE) else ("1" if x in PIRATE else "2")  # noqa: E731
    judge = _verdict_judge(pirate_is_better)
    sections = Sections(
        prompted_system=TEACHER, prefill=True, coherence_judge=lambda: judge, coherence_judge_name="scripted"
    )
    res = write_outputs(evaluate_models(svc, "tiny", {"final": "ckpt"}, C, data, sections=sections), tmp_path)
    coh = res["coherence"]["comparisons"]
    # final: pirate on 0-5; base: never; prompted: always (plain answers)
    assert coh["vs_base"]["counts"] == {"win": 6, "tie": 2, "loss": 0}
    assert coh["vs_prompted"]["counts"] == {"win": 0, "tie": 6, "loss": 2}
    assert res["coherence"]["final"] == "final" and len(judge.seen) == 32  # 8 prompts x 2 orders x 2 comparisons
    md = Path(res["report"]["markdown"]).read_text()
    section = md.split("## Coherence")[1].split("\n## ")[0]
    assert "| final vs base | 0.750 | 0.250 | 0.000 | 8 | 0 of 8 (0.000) |" in section
    assert "| final vs prompted | 0.000 | 0.750 | 0.250 | 8 | 0 of 8 (0.000) |" in section
    assert "![coherence: win / tie / loss of the final model](data:image/png;base64," in section
    png = Path(res["report"]["dir"]) / "coherence.png"
    assert str(png) in res["report"]["plots"] and png.read_bytes()[:4] == b"\x89PNG"
    trained = md.split("## Trained vs prompted")[1].split("\n## ")[0]
    # prompted 1.000 -> 0.250 under attack, final 0.750 -> 0.625: measured, and said which falls further
    assert (
        "| prompted | 1.000 (n=8) | 0.250 (-0.750) |" in trained
        and "| final | 0.750 (n=8) | 0.625 (-0.125) |" in trained
    )
    assert "the prompted baseline falls further than final" in trained
    assert "## Multi-turn robustness (prefill)" in md and "## Capability retention" in md


def _cap(answers: list[int], k: int = 4) -> CapabilitySet:
    return CapabilitySet("t", "t", [Question(f"q{i}", tuple("abcd"[:k]), a) for i, a in enumerate(answers)])


def test_above_chance_p_by_hand():
    cap = _cap([0, 0, 0])
    # P(X >= 2) for 3 questions at 1/4: 3 x (1/4)^2 x 3/4 + (1/4)^3 = 10/64
    assert above_chance_p(2, cap) == pytest.approx(10 / 64)
    assert above_chance_p(0, cap) == pytest.approx(1.0)
    mixed = CapabilitySet("m", "m", [Question("a", ("x", "y"), 0), Question("b", tuple("wxyz"), 0)])
    assert mixed.chance == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert above_chance_p(2, mixed) == pytest.approx(1 / 8) and above_chance_p(1, mixed) == pytest.approx(1 - 3 / 8)


def test_capability_summary_flags_a_base_at_chance():
    cap = _cap([0] * 20)
    model = lambda right: {  # noqa: E731
        "capability_accuracy": right / 20,
        "capability_accuracy_norm": right / 20,
        "capability_n": 20,
        "capability_correct": right,
    }
    at_chance = capability_summary(cap, {"base": model(5), "final": model(6)})
    assert at_chance["base_at_chance"] is True and at_chance["chance"] == 0.25
    assert (
        at_chance["models"]["final"]["change"] == pytest.approx(0.05) and at_chance["models"]["base"]["change"] is None
    )
    able = capability_summary(cap, {"base": model(15), "final": model(14)})
    assert able["base_at_chance"] is False and able["base_above_chance_p"] < 1e-4


def test_nightly_headline_carries_the_new_rows(tmp_path):
    from character.build.stages import PipelineConfig
    from character.evaluation.metrics import model_summary
    from flows.nightly import _headline

    def night(day, final_prefill, prompted_rate, win):
        summary = {
            "prompted": model_summary((prompted_rate, 8), (0.25, 8), None, ["-"]),
            "final": model_summary((0.75, 8), (0.5, 8), None, ["-"], prefill=(final_prefill, 8), capability=(0.3, 40)),
        }
        coherence = {"status": "computed", "final": "final", "comparisons": {"vs_prompted": {"win": win, "n": 8}}}
        b = tmp_path / "builds" / "pirate" / f"nightly-2026-11-{day}"
        b.mkdir(parents=True)
        rec = {"stages": {"eval": {"summary": summary, "coherence": coherence}}}
        (b / "record.json").write_text(json.dumps(rec))

    night("24", 0.5, 0.9, 0.25)
    night("25", 0.75, 1.0, 0.5)
    cfg = PipelineConfig(persona="pirate", workdir=str(tmp_path), build_id="nightly-2026-11-25")
    row = _headline(cfg, str(tmp_path), cfg.build_id)
    assert row["prefill_in_persona_rate"] == 0.75 and row["prefill_in_persona_rate_change"] == pytest.approx(0.25)
    assert row["prompted_in_persona_rate"] == 1.0 and row["prompted_in_persona_rate_change"] == pytest.approx(0.1)
    assert row["prompted_robust_in_persona_rate"] == 0.25 and row["capability_accuracy"] == 0.3
    assert row["coherence_win_vs_prompted"] == 0.5 and row["coherence_win_vs_prompted_change"] == pytest.approx(0.25)
    assert row["coherence_win_vs_base"] is None


def test_a_bad_coherence_judge_or_capability_set_fails_before_a_build_starts(tmp_path, monkeypatch):
    from character.build import checks
    from character.build.record import read_record
    from character.build.stages import PipelineConfig
    from character.errors import UserError

    cfg = PipelineConfig(persona="pirate", workdir=str(tmp_path / "ws"), build_id="sections")
    monkeypatch.setenv("CHARACTER_COHERENCE_JUDGE", "no-such-model")
    with pytest.raises(UserError, match="CHARACTER_COHERENCE_JUDGE no-such-model: not 'tiny'"):
        checks.validate(cfg)
    monkeypatch.setenv("CHARACTER_COHERENCE_JUDGE", "Qwen/Qwen3-30B-A3B-Instruct-2507")  # on Tinker: needs the key
    with pytest.raises(UserError, match="TINKER_API_KEY"):
        checks.validate(cfg)
    monkeypatch.delenv("CHARACTER_COHERENCE_JUDGE")
    bad = tmp_path / "set.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"]}) + "\n")
    monkeypatch.setenv("CHARACTER_CAPABILITY_SET", str(bad))
    with pytest.raises(UserError, match=r"CHARACTER_CAPABILITY_SET .*set.jsonl: line 1: no answer field"):
        checks.validate(cfg)
    assert not read_record(cfg)
    checks.validate(cfg.model_copy(update={"evaluate": False}))  # no evaluation: neither is needed
