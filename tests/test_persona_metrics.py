"""Persona-adherence metrics against hand computations, on crafted answers from a scripted service
(no model is loaded): classifier accuracy, in-persona and robust rates, preference metrics, the
report's files, where the report goes, and a judge that parses nothing."""

from __future__ import annotations

import base64
import json
import random
import re
from types import SimpleNamespace

import pytest
from scripted_models import PIRATE, PLAIN, CharTokenizer, Done, ScriptedService, pair

from character.evaluation.data import EvalData
from character.evaluation.evaluate import evaluate_checkpoints, write_outputs
from character.evaluation.logprobs import dpo_metrics
from character.evaluation.metrics import (
    BREAK_CHARACTER_SUFFIXES,
    BREAK_CHARACTER_SYSTEM_PROMPTS,
    SUMMARY_KEYS,
    TfidfClassifier,
    accuracy,
    break_character_messages,
    fit_persona_classifier,
    in_persona_rate,
    model_summary,
    pair_texts,
)
from character.evaluation.options import EvalOptions
from character.evaluation.run import evaluate_models
from character.persona.constitution import load_constitution


# -- models that answer from a script (tokenizer, futures, service: tests/scripted_models.py) -----------
class ScriptedModel:
    """`answer(prompt_text, attacked)` gives the reply; every answer token has log-prob `lp(answer_text)`."""

    def __init__(self, answer, lp):
        self.answer, self.lp, self.tok = answer, lp, CharTokenizer()

    def get_tokenizer(self):
        return self.tok

    def sample(self, prompt, num_samples, params):
        ids = prompt.to_ints()
        attacked = ids[0] == 2  # a system prompt opens the conversation: the break-character variant
        user = self.tok.decode(ids[ids.index(3) + 1 :])
        tokens = self.tok.encode(self.answer(user.split("\n\n")[0], attacked))
        return Done(SimpleNamespace(sequences=[SimpleNamespace(tokens=tokens)]))

    def compute_logprobs(self, prompt):
        ids = prompt.to_ints()
        answer = self.tok.decode(ids[len(ids) - ids[::-1].index(4) :])  # after the last assistant marker
        return Done([None] + [self.lp(answer)] * (len(ids) - 1))


PROMPTS = [f"Question number {k}?" for k in range(8)]
TRAIN = [pair(f"Training prompt {k}?", k) for k in range(24)]
HELDOUT = [pair(p, k) for k, p in enumerate(PROMPTS)]


def trained_answer(prompt, attacked):
    """In character on prompts 0-5 (6 of 8); under attack only on prompts 0-2 (3 of 8)."""
    k = int(re.search(r"\d+", prompt).group())
    return PIRATE[k % 4] if k < (3 if attacked else 6) else PLAIN[k % 4]


def service():
    base = ScriptedModel(lambda p, a: PLAIN[0], lambda ans: -1.0)
    # the trained model likes pirate talk: -0.5 per token on a pirate answer, -1.5 on a plain one
    trained = ScriptedModel(trained_answer, lambda ans: -0.5 if ans in PIRATE else -1.5)
    return ScriptedService({"tiny": base, "ckpt": trained})


# -- the tests ---------------------------------------------------------------------------------------
def test_tfidf_separates_a_separable_set_and_not_noise():
    rng = random.Random(0)
    texts, labels = pair_texts(TRAIN)
    clf = TfidfClassifier().fit(texts, labels)
    h_texts, h_labels = pair_texts(HELDOUT)
    assert accuracy(clf.predict_proba(h_texts), h_labels) == 1.0
    words = "the a of sea plain fact note day river idea mountain window table answer".split()
    noise = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)]
    noise_labels = [rng.randint(0, 1) for _ in noise]
    clf = TfidfClassifier().fit(noise[:200], noise_labels[:200])
    assert 0.35 <= accuracy(clf.predict_proba(noise[200:]), noise_labels[200:]) <= 0.65


def test_rates_and_summary_by_hand():
    assert in_persona_rate([0.9, 0.2, 0.6, 0.5]) == (0.5, 4)  # 0.5 is not "in persona"
    assert in_persona_rate([]) == (None, 0)
    m = model_summary((0.5, 4), None, {"dpo_pairs": 2, "dpo_accuracy": 1.0, "dpo_margin": 0.2}, ["no attack run"])
    assert tuple(m) == SUMMARY_KEYS and m["robust_in_persona_rate"] is None and m["pref_pairs"] == 2
    with pytest.raises(ValueError, match="without a reason"):
        model_summary((0.5, 4), None, None, [])


def test_break_character_set():
    assert len(BREAK_CHARACTER_SUFFIXES) >= 8 and len(BREAK_CHARACTER_SYSTEM_PROMPTS) >= 8
    variants = [break_character_messages("Hi?", m) for m in range(64)]
    assert {v[0]["content"] for v in variants[:8]} == set(BREAK_CHARACTER_SYSTEM_PROMPTS)
    assert {v[1]["content"].split("\n\n")[1] for v in variants[:8]} == set(BREAK_CHARACTER_SUFFIXES)
    assert len({(v[0]["content"], v[1]["content"]) for v in variants}) == 64
    assert all(v[1]["content"].startswith("Hi?\n\n") for v in variants)


def test_dpo_metrics_on_crafted_logprobs():
    policy = [(-5.0, 3), (-9.0, 3), (-4.0, 2), (-3.0, 2)]  # chosen_0, rejected_0, chosen_1, rejected_1
    ref = [(-6.0, 3), (-8.0, 3), (-4.0, 2), (-2.0, 2)]
    m = dpo_metrics(policy, ref, beta=0.1)
    # pair 0: 0.1 x (1) - 0.1 x (-1) = 0.2; pair 1: 0 - 0.1 x (-1) = 0.1
    assert m["dpo_pairs"] == 2 and m["dpo_accuracy"] == 1.0
    assert m["dpo_margin"] == pytest.approx(0.15) and m["dpo_reward_chosen"] == pytest.approx(0.05)


def test_evaluate_models_gives_hand_computed_metrics(tmp_path):
    svc = service()
    data = EvalData(heldout=HELDOUT, train=TRAIN, prompts=PROMPTS)
    res = evaluate_models(svc, "tiny", {"final": "ckpt", "sft": "ckpt"}, load_constitution("pirate"), data)
    assert svc.made == ["tiny", "ckpt"]  # one client per distinct model, the base first
    ev = res["eval"]
    assert set(ev) == {"base", "final", "sft", "classifier"}
    assert ev["classifier"] == {"heldout_accuracy": 1.0, "n": 16}
    base, final = ev["base"], ev["final"]
    assert all(tuple(m) == SUMMARY_KEYS for m in (base, final))
    assert (base["in_persona_rate"], base["in_persona_n"], base["robust_in_persona_rate"]) == (0.0, 8, 0.0)
    assert (final["in_persona_rate"], final["robust_in_persona_rate"], final["robust_n"]) == (0.75, 0.375, 8)
    assert base["pref_accuracy"] is None and "reference" in " ".join(base["notes"])
    # every pair: chosen reward 0.1 x (-0.5 + 1) x T_c, rejected 0.1 x (-1.5 + 1) x T_r, T = answer chars + end
    margins = [0.1 * 0.5 * (len(PIRATE[k % 4]) + 1) + 0.1 * 0.5 * (len(PLAIN[k % 4]) + 1) for k in range(8)]
    assert final["pref_pairs"] == 8 and final["pref_accuracy"] == 1.0
    assert final["pref_margin"] == pytest.approx(sum(margins) / 8)
    assert ev["sft"] == final
    g = res["generations"][0]
    assert g["answers"]["final"]["text"] == PIRATE[0] and g["answers"]["final"]["in_persona_p"] > 0.5
    assert g["attack"][0]["role"] == "system" and g["robust"]["base"]["text"] == PLAIN[0]


def test_report_files_load_back_with_embedded_plots_and_n(tmp_path):
    curves = tmp_path / "build" / "dpo"
    curves.mkdir(parents=True)
    (curves / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69, "lr": 1e-4}) + "\n")  # one step
    judge = ScriptedModel(lambda p, a: "I would rather not say.", lambda ans: -1.0)
    res = evaluate_models(
        service(),
        "tiny",
        {"final": "ckpt"},
        load_constitution("pirate"),
        EvalData(heldout=HELDOUT[:2], train=TRAIN, prompts=PROMPTS[:2]),
        judge=lambda: judge,
        judge_name="tiny",
    )
    res = write_outputs(res, tmp_path / "out", training_dirs={"dpo": curves / "metrics.jsonl"})
    out = tmp_path / "out"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["eval"] == res["eval"] and saved["eval"]["report"] == str(out / "report.md")
    md = (out / "report.md").read_text()
    uris = re.findall(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert len(uris) == 2 and all(base64.b64decode(u)[:4] == b"\x89PNG" for u in uris)
    assert {p.rsplit("/", 1)[-1] for p in res["report"]["plots"]} == {"eval_metrics.png", "training_curves.png"}
    assert "1.000 (pairs=2)" in md and "(n=2)" in md  # two pairs: the accuracy carries its n
    assert "0 of 4" in md and "no judge scores" in md  # the judge parsed nothing, and says so
    assert res["checkpoints"]["final"]["judge_parsed"] == 0 and res["checkpoints"]["final"]["judge_score"] is None
    assert "weak evidence" in md  # 4 held-out answers are too few to trust the classifier
    assert md.index("**base**") < md.index("**final**")  # answers one below the other, per prompt
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2


def _adapter(path, base="tiny"):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return path


def _build(ws, name, ckpt_uri, heldout, train):
    b = ws / "builds" / "pirate" / name
    for sub, rows in (("heldout", heldout), ("train", train)):
        (b / "data" / sub).mkdir(parents=True)
        (b / "data" / sub / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = {"persona": "pirate", "build_id": name, "stages": {"dpo": {"sampler": ckpt_uri, "state": ckpt_uri}}}
    (b / "record.json").write_text(json.dumps(rec))
    return b


def test_report_goes_into_the_checkpoints_own_build(tmp_path):
    ws = tmp_path / "ws"
    own, other = _adapter(tmp_path / "own"), _adapter(tmp_path / "other")
    build = _build(ws, "b1", own.as_uri(), HELDOUT[:3], TRAIN)
    _build(ws, "b2", other.as_uri(), HELDOUT, TRAIN[:4])  # newer, with other data
    svc = service()
    svc.models[str(own)] = svc.models["ckpt"]
    res = evaluate_checkpoints([str(own)], EvalOptions(persona="pirate", workdir=ws), service=svc)
    assert res["build"] == str(build) and res["report"]["markdown"].startswith(str(build / "eval"))
    assert set(res["eval"]) == {"base", "prompted", "dpo", "classifier", "report"}  # labelled by the stage that made it
    assert res["eval"]["dpo"]["pref_pairs"] == 3 and res["data"]["train_pairs"] == len(TRAIN)
    assert res["data"]["dpo"] == str(build / "data" / "heldout" / "dpo.jsonl")


def test_prompts_seen_in_training_are_left_out(tmp_path):
    svc = service()
    train = TRAIN + [pair(PROMPTS[0], 0)]
    data = EvalData(heldout=HELDOUT, train=train)
    from character.evaluation.data import held_out_prompts

    data.prompts, data.notes = held_out_prompts(HELDOUT, train, False)
    assert data.prompts == PROMPTS[1:] and "1 held-out prompt(s)" in data.notes[0]
    res = evaluate_models(svc, "tiny", {"final": "ckpt"}, load_constitution("pirate"), data)
    assert res["eval"]["final"]["in_persona_n"] == 7
    assert any("1 held-out prompt(s)" in n for n in res["eval"]["final"]["notes"])


def test_missing_classifier_data_is_null_with_a_reason():
    res = evaluate_models(
        service(), "tiny", {"final": "ckpt"}, load_constitution("pirate"), EvalData(prompts=PROMPTS[:2])
    )
    final = res["eval"]["final"]
    assert final["in_persona_rate"] is None and final["pref_accuracy"] is None
    assert any("no training pairs" in n for n in final["notes"])
    assert any("no held-out preference pairs" in n for n in final["notes"])
    assert res["eval"]["classifier"] == {"heldout_accuracy": None, "n": 0}


def test_classifier_report_counts():
    clf, rep = fit_persona_classifier(TRAIN, HELDOUT[:3])
    assert clf is not None and (rep.train_n, rep.n, rep.heldout_accuracy) == (48, 6, 1.0)


def test_nightly_headline_shows_the_change_since_the_previous_night(tmp_path):
    from character.build.stages import PipelineConfig
    from flows.nightly import _headline

    def night(day, rate, robust, acc):
        summary = {
            "final": model_summary(
                (rate, 20), (robust, 20), {"dpo_pairs": 20, "dpo_accuracy": acc, "dpo_margin": 1.0}, ["-"]
            )
        }
        b = tmp_path / "builds" / "pirate" / f"nightly-2026-11-{day}"
        b.mkdir(parents=True)
        (b / "record.json").write_text(json.dumps({"stages": {"eval": {"summary": summary}}}))

    night("20", 0.1, 0.1, 0.1)  # an older night: not the previous one
    night("24", 0.5, 0.25, 0.75)
    night("25", 0.8, 0.5, 0.9)
    cfg = PipelineConfig(persona="pirate", workdir=str(tmp_path), build_id="nightly-2026-11-25")
    row = _headline(cfg, str(tmp_path), cfg.build_id)
    assert row["in_persona_rate"] == 0.8 and row["in_persona_rate_change"] == pytest.approx(0.3)
    assert row["robust_in_persona_rate_change"] == pytest.approx(0.25)
    assert row["pref_accuracy_change"] == pytest.approx(0.15)
    first = _headline(cfg.model_copy(update={"build_id": "nightly-2026-11-20"}), str(tmp_path), "nightly-2026-11-20")
    assert first["in_persona_rate"] == 0.1 and first["in_persona_rate_change"] is None  # no earlier night
    assert _headline(None, str(tmp_path), cfg.build_id)["pref_accuracy"] is None


@pytest.mark.slow
def test_encoder_classifier_from_a_local_model_folder(tiny_dir):
    """`--classifier DIR`: frozen mean-pooled embeddings + logistic regression separate the crafted set."""
    clf, rep = fit_persona_classifier(TRAIN, HELDOUT, path=tiny_dir)
    assert rep.kind == f"encoder:{tiny_dir.name}" and rep.train_n == 48 and rep.n == 16
    assert rep.heldout_accuracy >= 0.75
    assert len(clf.predict_proba([PIRATE[0], PLAIN[0]])) == 2
