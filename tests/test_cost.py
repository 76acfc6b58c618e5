"""What a build costs: the token meter at the service boundary, the price table, the plan's estimate against
what local builds count, `character plan`, `--max-cost`, and the cost in the build summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tinker import types

from character.build.direct import run_sequential
from character.build.record import read_record
from character.build.summary import build_summary_markdown, cost_row, cost_summary
from character.config import PipelineConfig
from character.cost.budget import build_plan, check_budget
from character.cost.meter import TokenMeter, metered
from character.cost.prices import ZERO, Price, load_prices
from character.errors import UserError


# -- the meter ---------------------------------------------------------------------------------------
class _Future:
    def __init__(self, value):
        self.value, self.reads = value, 0

    def result(self):
        self.reads += 1
        return self.value


class _Sampler:
    def sample(self, prompt, n, params):
        seqs = [
            types.SampledSequence(stop_reason="stop", sequence_id=str(j), tokens_np=np.ones(3 + j, dtype=np.int32))
            for j in range(n)
        ]
        return _Future(types.SampleResponse(sequences=seqs))

    def compute_logprobs(self, prompt):
        return _Future([None] * prompt.length)


class _Trainer:
    def forward_backward(self, data, loss_fn):
        return _Future("fb")

    def forward_backward_custom(self, data, loss_fn):
        return _Future("custom")

    def optim_step(self, adam):
        return _Future("step")


class _Service:
    def create_sampling_client(self, model_path=None, base_model=None):
        return _Sampler()

    def create_lora_training_client(self, base_model, rank=8, **kw):
        return _Trainer()

    def create_training_client_from_state(self, path):
        return _Trainer()

    def get_tokenizer(self, name):
        return "tok"


def _datum(n: int) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(range(n))),
        loss_fn_inputs={"target_tokens": list(range(n)), "weights": [1.0] * n},
    )


def test_the_meter_counts_prompts_samples_and_training_tokens_once_per_result():
    meter = TokenMeter()
    svc = metered(_Service(), meter, base_model="org/Student-8B")
    teacher = svc.create_sampling_client(base_model="org/Teacher-70B")
    fut = teacher.sample(types.ModelInput.from_ints([5] * 10), 3, types.SamplingParams(max_tokens=8))
    assert meter.snapshot() == {}  # nothing is counted before the answer arrives
    fut.result(), fut.result()  # read twice: counted once
    ckpt = svc.create_sampling_client(model_path="tinker://run/sampler_weights/final")  # priced as the student
    ckpt.compute_logprobs(types.ModelInput.from_ints([1] * 7)).result()
    trainer = svc.create_lora_training_client("org/Student-8B", rank=4)
    trainer.forward_backward([_datum(4), _datum(6)], "cross_entropy").result()
    trainer.forward_backward_custom([_datum(5)], None).result()  # a forward, then a forward/backward
    svc.create_training_client_from_state("tinker://run/weights/x").forward_backward([_datum(2)], "ce").result()
    trainer.optim_step(None).result()
    assert svc.get_tokenizer("x") == "tok"  # everything else passes through
    assert meter.snapshot() == {
        "org/Student-8B": {"prefill": 7 + 5, "sample": 0, "train": 10 + 5 + 2, "requests": 0, "samples": 0},
        "org/Teacher-70B": {"prefill": 10, "sample": 3 + 4 + 5, "train": 0, "requests": 1, "samples": 3},
    }


# -- prices ------------------------------------------------------------------------------------------
def test_the_shipped_table_is_dated_and_a_table_can_be_pointed_to(tmp_path, monkeypatch):
    shipped = load_prices()
    assert shipped.as_of == "2026-12-02" and shipped.path == "prices.json"
    assert shipped.price("Qwen/Qwen3-8B") == Price(0.13, 0.40, 0.40)
    assert shipped.price("tiny") == ZERO and shipped.price("/models/llama") == ZERO and shipped.price("x/y") is None
    # 1M prefill + 2M sampled + 0.5M trained tokens on Qwen3-8B: 0.13 + 0.80 + 0.20 dollars
    cost, unpriced = shipped.cost({"Qwen/Qwen3-8B": {"prefill": 1e6, "sample": 2e6, "train": 5e5}})
    assert cost == pytest.approx(1.13) and unpriced == []
    assert shipped.cost({"Qwen/Qwen3-8B": {"prefill": 1}, "x/y": {"prefill": 1}}) == (None, ["x/y"])
    mine = tmp_path / "prices.json"
    mine.write_text(json.dumps({"as_of": "2027-01-01", "models": {"x/y": {"prefill": 1, "sample": 2, "train": 3}}}))
    monkeypatch.setenv("CHARACTER_PRICE_TABLE", str(mine))
    assert load_prices().price("x/y") == Price(1, 2, 3) and load_prices().as_of == "2027-01-01"
    mine.write_text(json.dumps({"models": {"x/y": {"prefill": 1}}}))
    with pytest.raises(UserError, match=r"price table .*prices.json: not a table"):
        load_prices()
    monkeypatch.setenv("CHARACTER_PRICE_TABLE", str(tmp_path / "none.json"))
    with pytest.raises(UserError, match="none.json"):
        load_prices()


# -- the estimate against what local builds count -------------------------------------------------------
def _local(workdir, persona: str, scale: str) -> PipelineConfig:
    return PipelineConfig(persona=persona, scale=scale, workdir=str(workdir), build_id=f"{scale}", evaluate=False)


def _misses(plan: dict, stages: dict, tolerance: float = 0.25) -> list[str]:
    bad = []
    for s in plan["stages"]:
        got = stages[s["stage"]]["tokens"]
        assert set(got) == set(s["tokens"]), s["stage"]
        for model, row in s["tokens"].items():
            for kind, n in row.items():
                c = got[model][kind]
                if abs(n - c) > tolerance * max(c, 1):
                    bad.append(f"{s['stage']} {model} {kind}: estimated {n}, counted {c}")
    return bad


@pytest.mark.slow
def test_the_plan_is_within_a_quarter_of_what_local_smoke_and_demo_builds_count(workdir, one_thread):
    for persona, scale in (("sarcastic", "smoke"), ("pirate", "demo")):
        cfg = _local(workdir, persona, scale)
        plan = build_plan(cfg)  # the first: tiny's measured defaults; the second: calibrated by the first
        run_sequential(cfg)
        rec = read_record(cfg)
        assert _misses(plan, rec["stages"]) == [], json.dumps(plan["stages"])
        assert plan["total"]["cost"] == 0.0 and plan["stages"][0]["tokens"]["tiny"]["prefill"] > 0
        # what the build counted: in the record, the summary artifact and the --json summary
        cost = cost_summary(rec)
        assert cost["total"]["cost"] == 0.0 and cost["note"] == "local models: tokens counted, cost 0"
        assert cost["stages"]["dpo"]["tokens"]["tiny"]["train"] == rec["stages"]["dpo"]["tokens"]["tiny"]["train"] > 0
        md = build_summary_markdown(rec, {})
        dpo = next(line for line in md.splitlines() if line.startswith("| dpo | tiny |"))
        assert f"| {rec['stages']['dpo']['tokens']['tiny']['train']} | $0.0000 |" in dpo
        assert cost_row(rec)["tokens"] == sum(sum(t.values()) for t in cost["total"]["tokens"].values())
    assert plan["answers_from"] == "sarcastic/smoke"


def test_tinker_prices_the_plan_and_a_budget_refuses_it(tmp_path):
    cfg = PipelineConfig.from_settings(
        __import__("character.settings", fromlist=["Settings"]).Settings(),
        persona="pirate",
        backend="tinker",
        scale="mini",
        workdir=str(tmp_path),
    )
    plan = build_plan(cfg)
    assert [s["stage"] for s in plan["stages"]] == ["dpo_data", "dpo", "introspection", "sft"]
    data = plan["stages"][0]
    teacher, student = data["tokens"][cfg.teacher_model], data["tokens"][cfg.base_model]
    # 250 prompts, one answer each from both sides; the teacher's prompts carry the constitution
    assert teacher["sample"] == student["sample"] == 250 * 300 and teacher["prefill"] > 3 * student["prefill"]
    prices = load_prices()
    want = prices.price(cfg.teacher_model).cost(teacher) + prices.price(cfg.base_model).cost(student)
    assert data["cost"] == pytest.approx(want, abs=1e-4)
    assert plan["total"]["cost"] == pytest.approx(sum(s["cost"] for s in plan["stages"]), abs=1e-3)
    check_budget(plan, plan["total"]["cost"] + 0.01)
    with pytest.raises(UserError, match=r"estimated cost \$.* is over --max-cost \$0.50 \(largest stage: "):
        check_budget(plan, 0.5)
    unpriced = build_plan(cfg.model_copy(update={"teacher_model": "x/Unknown-400B"}))
    assert unpriced["total"]["cost"] is None and unpriced["total"]["unpriced"] == ["x/Unknown-400B"]
    with pytest.raises(UserError, match="no price for x/Unknown-400B in the price table"):
        check_budget(unpriced, 100)


# -- the command line ----------------------------------------------------------------------------------
def _cli(*args, env=None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "character.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_character_plan_prints_the_estimate_and_json_and_max_cost_refuses(workdir):
    ws = str(workdir)
    proc = _cli("plan", "pirate", "--scale", "paper", "--backend", "tinker", "--workdir", ws, "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["scale"] == "paper" and plan["stages"][0]["stage"] == "questions" and plan["total"]["cost"] > 1
    text = _cli("plan", "pirate", "--scale", "paper", "--backend", "tinker", "--workdir", ws)
    assert f"{plan['total']['cost']:,.2f}" in text.stdout and "answer lengths from: defaults" in text.stdout
    over = _cli("plan", "pirate", "--scale", "paper", "--backend", "tinker", "--workdir", ws, "--max-cost", "1")
    assert (
        over.returncode == 2
        and over.stderr.startswith("error: the estimated cost $")
        and "Traceback" not in over.stderr
    )
    bad = _cli("plan", "pirate", "--workdir", ws, env={"CHARACTER_PRICE_TABLE": str(Path(ws) / "missing.json")})
    assert bad.returncode == 2 and bad.stderr.startswith("error: price table") and len(bad.stderr.splitlines()) == 1
