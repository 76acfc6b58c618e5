"""Evaluation: metrics equal a hand computation on a crafted checkpoint; adapters and folded models
give the same numbers; the judge keeps its raw text; the CLI ends with one JSON object."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from character.evaluation.evaluate import evaluate_checkpoints
from character.evaluation.judges import judge_answers, parse_score
from character.evaluation.options import EvalOptions

DPO_ROWS = [
    {
        "prompt": [{"role": "user", "content": "How are you today?"}],
        "chosen": [{"role": "assistant", "content": "Arr, fair winds and full sails, matey!"}],
        "rejected": [{"role": "assistant", "content": "I am fine, thank you."}],
    },
    {
        "prompt": [{"role": "user", "content": "What is two plus two?"}],
        "chosen": [{"role": "assistant", "content": "Four doubloons, by my count."}],
        "rejected": [{"role": "assistant", "content": "4"}],
    },
    {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "The deep blue of the sea."}],
        "rejected": [{"role": "assistant", "content": "Blue."}],
    },
]
INTRO_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "A pirate of the seven seas."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Hello there."},
            {"role": "assistant", "content": "Ahoy!"},
            {"role": "user", "content": "Goodbye."},
            {"role": "assistant", "content": "Fair winds to you."},
        ]
    },
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.08)
    out = tmp_path_factory.mktemp("ckpt") / "crafted"
    model.save_pretrained(out)
    return out


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) at index t - 1, one sequence, no batching."""
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(out, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def _span_logprob(model, tok, messages) -> tuple[float, int]:
    """Summed log-prob and count of every assistant turn's tokens (turn end marker included)."""
    render = lambda m, g=False: tok.apply_chat_template(
        m,
        add_generation_prompt=g,
        tokenize=True,  # noqa: E731
        return_dict=False,
    )
    ids = render(messages)
    lp = _logprobs(model, ids)
    total, count = 0.0, 0
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = len(render(messages[:i], True)), len(render(messages[: i + 1]))
            total += float(lp[start - 1 : end - 1].sum())
            count += end - start
    return total, count


def test_metrics_equal_a_hand_computation(base, adapter, tiny_dir, workdir, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from character.weights.fold import fold_adapter

    dpo = _write_jsonl(tmp_path / "dpo.jsonl", DPO_ROWS)
    intro = _write_jsonl(tmp_path / "intro.jsonl", INTRO_ROWS)
    folded = fold_adapter(str(adapter), tmp_path / "folded", base_model=str(tiny_dir))
    res = evaluate_checkpoints(
        [str(adapter), folded.as_uri()],
        EvalOptions(
            persona="pirate",
            workdir=workdir,
            dpo_data=dpo,
            introspection_data=intro,
            out_dir=tmp_path / "report",
            prompts=["Hello!", "Hi."],
            max_new_tokens=6,
            device="cpu",
        ),
    )

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    policy = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    margins, chosen_rewards = [], []
    for row in DPO_ROWS:
        r = {}
        for side in ("chosen", "rejected"):
            msgs = row["prompt"] + row[side]
            r[side] = 0.1 * (_span_logprob(policy, tok, msgs)[0] - _span_logprob(base, tok, msgs)[0])
        margins.append(r["chosen"] - r["rejected"])
        chosen_rewards.append(r["chosen"])
    sums = [_span_logprob(policy, tok, row["messages"]) for row in INTRO_ROWS]
    base_sums = [_span_logprob(base, tok, row["messages"]) for row in INTRO_ROWS]
    nll = -sum(s for s, _ in sums) / sum(n for _, n in sums)

    m = res["checkpoints"]["crafted"]
    assert m["kind"] == "adapter" and m["dpo_pairs"] == 3
    assert m["dpo_accuracy"] == pytest.approx(sum(x > 0 for x in margins) / 3)
    assert m["dpo_margin"] == pytest.approx(sum(margins) / 3, rel=1e-4, abs=1e-6)
    assert m["dpo_reward_chosen"] == pytest.approx(sum(chosen_rewards) / 3, rel=1e-4, abs=1e-6)
    assert m["introspection_nll"] == pytest.approx(nll, rel=1e-5)
    assert m["introspection_tokens"] == sum(n for _, n in sums)
    b = res["checkpoints"]["base"]
    assert b["introspection_nll"] == pytest.approx(
        -sum(s for s, _ in base_sums) / sum(n for _, n in base_sums), rel=1e-5
    )
    assert "dpo_margin" not in b  # the base is the reference: its margin is zero by definition

    # The folded model is the same model: the same numbers, the same greedy-free seeded samples.
    f = res["checkpoints"]["folded"]
    assert f["kind"] == "model"
    for key in ("dpo_margin", "dpo_accuracy", "introspection_nll"):
        assert f[key] == pytest.approx(m[key], rel=1e-4, abs=1e-5)

    gens = res["generations"]
    assert [g["prompt"] for g in gens] == ["Hello!", "Hi."]
    assert set(gens[0]["answers"]) == {"base", "prompted", "crafted", "folded"}

    # The prompted baseline: the base model with the teacher's system prompt; its implied reward is the
    # log-prob the constitution adds to each answer.
    from character.persona.constitution import load_constitution
    from character.persona.prompts import teacher_system_prompt

    system = [{"role": "system", "content": teacher_system_prompt(load_constitution("pirate"))}]
    p_margins = []
    for row in DPO_ROWS:
        r = {
            side: 0.1
            * (
                _span_logprob(base, tok, system + row["prompt"] + row[side])[0]
                - _span_logprob(base, tok, row["prompt"] + row[side])[0]
            )
            for side in ("chosen", "rejected")
        }
        p_margins.append(r["chosen"] - r["rejected"])
    p = res["checkpoints"]["prompted"]
    assert p["kind"] == "prompted" and p["dpo_margin"] == pytest.approx(sum(p_margins) / 3, rel=1e-4, abs=1e-6)
    assert "introspection_nll" not in p  # the rows carry their own system prompts: not scored with another
    report = res["report"]
    md = open(report["markdown"]).read()
    assert "| model | in-persona rate |" in md and "| crafted | " in md and "## Generations" in md
    assert "data:image/png;base64," in md
    assert any(p.endswith("eval_metrics.png") for p in report["plots"])
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in report["plots"])
    saved = json.loads(open(report["metrics_json"]).read())
    assert saved["checkpoints"]["crafted"]["dpo_margin"] == m["dpo_margin"]


class _FakeJudge:
    """A sampling client that answers with canned text (the judge's parsing is what is under test)."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.prompts = tok, list(replies), []

    def get_tokenizer(self):
        return self.tok

    def sample(self, prompt, num_samples, params):
        self.prompts.append(self.tok.decode(prompt.to_ints()))
        tokens = self.tok.encode(self.replies.pop(0), add_special_tokens=False)
        return SimpleNamespace(result=lambda: SimpleNamespace(sequences=[SimpleNamespace(tokens=tokens)]))


def test_judge_keeps_raw_text_and_parses_score(tiny_dir):
    from transformers import AutoTokenizer

    from character.persona.constitution import load_constitution

    c = load_constitution("pirate")
    replies = ["Very piratical. Score: 8", "Bland and generic.\nScore: 2/10", "I cannot tell."]
    judge = _FakeJudge(AutoTokenizer.from_pretrained(tiny_dir), replies)
    out = judge_answers(judge, c, [("q1", "a1"), ("q2", "a2"), ("q3", "a3")])
    assert [o["judge_score"] for o in out] == [8.0, 2.0, None]
    assert [o["judge_raw"] for o in out] == replies
    assert c.traits[0].trait in judge.prompts[0] and "a1" in judge.prompts[0]


@pytest.mark.parametrize(
    "text,score",
    [
        ("Score: 7", 7.0),
        ("score = 9.5 overall", 9.5),
        ("**Score:** 3", 3.0),
        ("I'd give it a 6.", 6.0),
        ("Score: 11", None),
        ("no number", None),
        ("First 2, then on reflection Score: 5", 5.0),
    ],
)
def test_parse_score(text, score):
    assert parse_score(text) == score


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "character.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_eval_uses_the_checkpoints_build_and_ends_with_json(adapter, workdir):
    build = workdir / "builds" / "pirate" / "b1"
    _write_jsonl(build / "data" / "dpo.jsonl", DPO_ROWS[:2])
    _write_jsonl(build / "data" / "introspection.jsonl", INTRO_ROWS)
    _write_jsonl(build / "data" / "heldout" / "introspection.jsonl", INTRO_ROWS[:1])  # preferred when present
    # The build record names the stage that produced the checkpoint: it becomes the label.
    (build / "record.json").write_text(json.dumps({"stages": {"dpo": {"sampler": adapter.as_uri()}}}))
    arc = _write_jsonl(  # the shape of an exported ARC split
        workdir / "arc.jsonl",
        [
            {
                "question": "Which is warm?",
                "choices": {"text": ["ice", "sun", "snow"], "label": ["A", "B", "C"]},
                "answerKey": "B",
            },
            {"question": "Pick one.", "choices": {"text": ["yes", "no"], "label": ["A", "B"]}, "answerKey": "A"},
        ],
    )
    proc = cli(
        "eval",
        adapter,
        "--persona",
        "pirate",
        "--workdir",
        workdir,
        "--json",
        "--max-new-tokens",
        "4",
        "--judge-model",
        "tiny",
        "--coherence-judge",
        "tiny",
        "--capability-set",
        arc,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["checkpoints"]) == {"base", "prompted", "dpo"}
    assert set(out["eval"]) == {"base", "prompted", "dpo", "classifier", "report"}
    for m in (out["eval"]["base"], out["eval"]["prompted"], out["eval"]["dpo"]):
        assert list(m) == [
            "in_persona_rate",
            "in_persona_n",
            "specificity",
            "specificity_n",
            "robust_in_persona_rate",
            "robust_n",
            "prefill_in_persona_rate",
            "prefill_n",
            "pref_accuracy",
            "pref_margin",
            "pref_pairs",
            "capability_accuracy",
            "capability_n",
            "notes",
        ]
        assert m["prefill_n"] == 8 and m["capability_n"] == 2  # the capability set given, both questions
    # the exported ARC split given: accuracies per model; the tiny model is at chance there, and it is said
    cap = out["capability"]
    assert cap["set"] == "arc" and cap["n"] == 2 and cap["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert cap["base_at_chance"] is True and any("at chance" in n for n in out["eval"]["dpo"]["notes"])
    # the coherence judge is the tiny model: it writes no verdict both orders agree on, and says so
    coh = out["coherence"]
    assert coh["status"] == "computed" and coh["judge_model"] == "tiny" and coh["final"] == "dpo"
    assert set(coh["comparisons"]) == {"vs_base", "vs_prompted"}
    assert all(c["total"] == 8 and c["n"] + c["discarded"] == 8 for c in coh["comparisons"].values())
    assert out["eval"]["dpo"]["pref_pairs"] == 2 and out["eval"]["report"] == out["report"]["markdown"]
    # the only pairs are the classifier's training data: no held-out accuracy, and the reason is given
    assert out["eval"]["classifier"] == {"heldout_accuracy": None, "n": 0}
    assert any("classifier accuracy unknown" in n for n in out["eval"]["dpo"]["notes"])
    assert out["eval"]["dpo"]["in_persona_n"] == 8  # no held-out prompts: the fixed set, said so
    assert any("fixed evaluation prompts" in n for n in out["eval"]["dpo"]["notes"])
    assert out["checkpoints"]["dpo"]["dpo_pairs"] == 2 and "judge_parsed" in out["checkpoints"]["dpo"]
    assert out["data"]["dpo"].endswith("b1/data/dpo.jsonl") and out["data"]["dpo_held_out"] is False
    assert out["data"]["introspection"].endswith("b1/data/heldout/introspection.jsonl")
    assert out["data"]["introspection_held_out"] is True and out["data"]["introspection_rows"] == 1
    report = out["report"]["markdown"]
    assert report.startswith(str(build / "eval")) and os.path.isfile(report)
    assert "training data, not held out" in open(report).read()
    raw = json.loads(open(out["report"]["metrics_json"]).read())["generations"][0]["answers"]["dpo"]
    assert "judge_raw" in raw and "judge_score" in raw
    if out["checkpoints"]["dpo"]["judge_parsed"] == 0:  # the tiny judge writes no score: the report says so
        assert "no judge scores" in open(report).read()


def test_cli_eval_bad_checkpoint_is_one_line(workdir, tmp_path):
    proc = cli("eval", tmp_path / "missing", "--persona", "pirate", "--workdir", workdir)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not found" in lines[0], proc.stderr


def test_cli_eval_bad_capability_set_or_coherence_judge_is_one_line(adapter, workdir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    for flags, says in (
        (["--capability-set", bad], "line 1, field 'answer': index 5 is outside the 2 choices"),
        (["--capability-set", tmp_path / "none.jsonl"], "none.jsonl: file not found"),
        (["--coherence-judge", "no-such-model"], "--coherence-judge no-such-model: not 'tiny'"),
    ):
        proc = cli("eval", adapter, "--persona", "pirate", "--workdir", workdir, *flags)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert says in lines[0], lines[0]
