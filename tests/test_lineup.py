"""Today's Tinker lineup: served defaults checked before anything is spent, `character tinker models`, and the
plan's token estimate against what a build on the fake SDK (tests/fake_tinker.py) counts."""

from __future__ import annotations

import json
import sys
import time

import pytest
from fake_tinker import KEY, STUDENT, TEACHER, FakeTinker, fake, no_network, tokenizer, wired  # noqa: F401 - fixtures are used by name

from character.backend import tinker as tb
from character.backend.tinker_models import merge_supported, model_roles, model_size_b
from character.build.direct import run_sequential
from character.build.record import read_record
from character.config import PipelineConfig
from character.cost.budget import build_plan
from character.cost.prices import load_prices
from character.settings import Settings
from character.train.families import renderer_name
from character.train.loop import OptimConfig
from character.train.renderer import Renderer

LINEUP = [  # the cookbook's lineup of 2026-08 (DESIGN.md 3.2), with the retired defaults gone
    "Qwen/Qwen3.8-27B",
    "Qwen/Qwen3.6-35B-A3B",
    "Qwen/Qwen3.6-27B",
    "Qwen/Qwen3.5-397B-A17B",
    "Qwen/Qwen3.5-35B-A3B-Base",
    "Qwen/Qwen3.5-9B",
    "Qwen/Qwen3.5-4B",
    "Qwen/Qwen3-8B",
    "openai/gpt-oss-120b",
    "deepseek-ai/DeepSeek-V3.1",
    "moonshotai/Kimi-K2.6",
]


def _cli(monkeypatch, capsys, *args):
    from character import cli

    monkeypatch.setattr(sys, "argv", ["character", *args])
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err, time.perf_counter() - t0


def test_the_defaults_are_in_todays_lineup_priced_and_fit_their_roles():
    s = Settings()
    assert s.tinker_base_model in LINEUP and s.tinker_teacher_model in LINEUP
    assert s.tinker_base_model not in ("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-4B-Instruct-2507")
    student = type("M", (), {"model_name": s.tinker_base_model, "sampleable": True})
    teacher = type("M", (), {"model_name": s.tinker_teacher_model, "sampleable": True})
    assert model_size_b(s.tinker_base_model) == 8 and model_roles(student, s.tinker_base_model) == []
    assert model_roles(teacher, s.tinker_base_model) == ["teacher", "judge"]  # 397B: ~50x the student
    assert merge_supported(s.tinker_base_model)  # paper mode can export and merge its adapters
    # both are rendered by a family renderer tested against their own templates, in non-thinking mode
    assert renderer_name(s.tinker_base_model) == "qwen3_disable_thinking"
    assert renderer_name(s.tinker_teacher_model) == "qwen3_5_disable_thinking"
    prices = load_prices()
    assert prices.price(s.tinker_base_model).train == 0.40 and prices.price(s.tinker_teacher_model).sample == 5.00


@pytest.fixture
def served(tokenizer, tmp_path, monkeypatch):
    """A fake Tinker serving today's lineup minus the default student."""
    f = FakeTinker(tokenizer, tmp_path / "store", models=[m for m in LINEUP if m != Settings().tinker_base_model])
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    monkeypatch.setattr(tb, "default_client_factory", f.service_client)
    monkeypatch.setattr(tb, "default_rest_factory", f.rest_client)
    monkeypatch.setattr(tb, "_tcp_check", lambda url, timeout: None)
    yield f
    f.server.shutdown(wait=True)


def test_a_lineup_without_the_default_student_fails_at_once_naming_the_alternatives(
    served, tmp_path, monkeypatch, capsys
):
    code, out, err, seconds = _cli(
        monkeypatch, capsys, "pipeline", "pirate", "--backend", "tinker", "--workdir", str(tmp_path / "ws")
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and seconds < 2.0, (code, err, seconds)
    assert lines[0].startswith("error: base model 'Qwen/Qwen3-8B' is not served by Tinker")
    assert "Qwen/Qwen3.5-4B" in lines[0] and "Qwen/Qwen3.5-9B" in lines[0]  # trainable chat alternatives
    assert "Base" not in lines[0]  # base models cannot stand in for a chat student
    for refused in ("gpt-oss", "DeepSeek", "Kimi"):  # served and trainable, but the renderers refuse them
        assert refused not in lines[0], lines[0]
    assert [c[0] for c in served.calls] == ["get_server_capabilities"]  # nothing else was asked, nothing spent
    assert not (tmp_path / "ws" / "builds").exists()


def test_a_build_over_its_budget_is_refused_before_anything_is_spent(served, tmp_path, monkeypatch, capsys):
    served.models = LINEUP
    ws = str(tmp_path / "ws")
    code, out, err, _ = _cli(
        monkeypatch,
        capsys,
        "pipeline",
        "pirate",
        "--backend",
        "tinker",
        "--scale",
        "paper",
        "--workdir",
        ws,
        "--max-cost",
        "1",
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: the estimated cost $"), err
    assert "over --max-cost $1.00" in lines[0]
    assert [c[0] for c in served.calls] == ["get_server_capabilities"] and not (tmp_path / "ws" / "builds").exists()


def test_every_flow_run_checks_its_budget_and_the_lineup_before_its_lock(served, tmp_path):
    from character.errors import UserError

    served.models = LINEUP
    cfg = PipelineConfig.from_settings(
        Settings(), persona="pirate", backend="tinker", workdir=str(tmp_path / "ws"), max_cost=0.001
    )
    with pytest.raises(UserError, match=r"estimated cost \$0\.0\d+ is over --max-cost \$0\.00"):
        run_sequential(cfg)  # the plan every flow runs (character.build.plan.run)
    assert [c[0] for c in served.calls] == ["get_server_capabilities"] and not (tmp_path / "ws" / "builds").exists()
    served.models = [m for m in LINEUP if m != cfg.teacher_model]
    with pytest.raises(UserError, match="teacher model 'Qwen/Qwen3.5-397B-A17B' is not served"):
        run_sequential(cfg.model_copy(update={"max_cost": None}))


def test_a_teacher_that_cannot_sample_and_a_judge_not_served_are_refused(served, tmp_path, monkeypatch):
    from tinker.types.get_server_capabilities_response import SupportedModel

    from character.backend.tinker_models import check_served, models_to_check
    from character.build import checks
    from character.errors import UserError

    caps = [
        SupportedModel(model_name="Qwen/Qwen3-8B", trainable=True, sampleable=True),
        SupportedModel(model_name="Qwen/Qwen3.5-4B", trainable=True, sampleable=True),
        SupportedModel(model_name="Qwen/Qwen3.5-397B-A17B", trainable=False, sampleable=False),
        SupportedModel(model_name="openai/gpt-oss-120b", trainable=False, sampleable=True),
        SupportedModel(model_name="deepseek-ai/DeepSeek-V3.1", trainable=True, sampleable=True),
        SupportedModel(model_name="nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16", trainable=False, sampleable=True),
    ]
    cfg = PipelineConfig(persona="pirate", backend="tinker", base_model="Qwen/Qwen3-8B", workdir=str(tmp_path))
    teacher = cfg.model_copy(update={"teacher_model": "Qwen/Qwen3.5-397B-A17B"})
    with pytest.raises(UserError, match="teacher model 'Qwen/Qwen3.5-397B-A17B' cannot be sampled there now") as e:
        check_served(caps, models_to_check(teacher, []), "here")
    # gpt-oss and DeepSeek can be sampled there, but the renderers refuse them: never offered
    assert "sampled: Qwen/Qwen3-8B, Qwen/Qwen3.5-4B, nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16 (" in str(e.value)
    student = cfg.model_copy(update={"base_model": "openai/gpt-oss-120b", "teacher_model": None})
    with pytest.raises(UserError, match="'openai/gpt-oss-120b' cannot be trained and sampled") as e:
        check_served(caps, models_to_check(student, []), "here")
    assert "trained and sampled: Qwen/Qwen3-8B, Qwen/Qwen3.5-4B (" in str(e.value)  # not DeepSeek either
    check_served([], models_to_check(student, []), "here")  # a service that lists nothing answers for itself
    monkeypatch.setenv("CHARACTER_REVEALED_JUDGE", "zai-org/GLM-5.3")  # through the service, as a build asks
    judged = cfg.model_copy(update={"teacher_model": "Qwen/Qwen3.5-397B-A17B", "base_model": "Qwen/Qwen3.5-4B"})
    with pytest.raises(UserError, match=r"judge \(CHARACTER_REVEALED_JUDGE\) 'zai-org/GLM-5.3' is not served"):
        checks.check_served_models(judged)
    checks.check_served_models(judged.model_copy(update={"evaluate": False}))  # no evaluation: no judge


def test_tinker_models_shows_capabilities_merge_support_prices_and_the_defaults(served, monkeypatch, capsys):
    served.models = LINEUP
    code, out, err, _ = _cli(monkeypatch, capsys, "tinker", "models")
    assert code == 0 and KEY not in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    qwen3 = rows["Qwen/Qwen3-8B"]
    assert qwen3[1:7] == ["32768", "yes", "yes", "yes", "0.13/0.4/0.4", "qwen3_disable_thinking"]
    assert "(default student)" in " ".join(qwen3)
    teacher = " ".join(rows["Qwen/Qwen3.5-397B-A17B"])  # no merge: a mixture of experts
    assert "no 2/5/6 qwen3_5_disable_thinking teacher, judge (default teacher)" in teacher
    # big enough to teach and judge, but refused by the renderers: shown so, offered as neither
    for refused in ("deepseek-ai/DeepSeek-V3.1", "moonshotai/Kimi-K2.6", "openai/gpt-oss-120b"):
        assert rows[refused][6:] == ["refused", "-"], rows[refused]
    assert rows["Qwen/Qwen3.8-27B"][5] == "-"  # no price in the table: shown as such, never guessed
    assert "not served now" not in out and "refused:" not in out
    served.models = [m for m in LINEUP if m != "Qwen/Qwen3-8B"]
    code, out, err, _ = _cli(monkeypatch, capsys, "tinker", "models")
    assert code == 0 and out.splitlines()[-1].startswith("not served now: student Qwen/Qwen3-8B (set ")
    monkeypatch.setenv("CHARACTER_TINKER_TEACHER_MODEL", "deepseek-ai/DeepSeek-V3.1")
    code, out, err, _ = _cli(monkeypatch, capsys, "tinker", "models")
    assert code == 0 and out.splitlines()[-1].startswith(
        "refused: teacher model deepseek-ai/DeepSeek-V3.1 is a DeepSeek"
    )
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-2]}
    assert rows["deepseek-ai/DeepSeek-V3.1"][6:] == ["refused", "-", "(default", "teacher)"]  # marked, no role


# -- the plan against the build, on the fake SDK --------------------------------------------------------
def _cfg(tmp_path, persona: str, scale: str) -> PipelineConfig:
    opt = OptimConfig(learning_rate=5e-2, batch_size=8, save_every=5, warmup_ratio=0.0)
    return PipelineConfig(
        persona=persona,
        scale=scale,
        backend="tinker",
        base_model=STUDENT,
        teacher_model=TEACHER,
        workdir=str(tmp_path / "ws"),
        build_id=f"{persona}-{scale}",
        max_new_tokens=48,
        lora_rank=4,
        evaluate=False,
        dpo=opt,
        sft=opt,
    )


def within(estimate: dict, counted: dict, tolerance: float = 0.25) -> list[str]:
    """Every token count of the estimate within `tolerance` of the counted one, per stage, model and kind."""
    bad = []
    for s in estimate["stages"]:
        got = counted[s["stage"]]["tokens"]
        assert set(got) == set(s["tokens"]), (s["stage"], got, s["tokens"])
        for model, row in s["tokens"].items():
            for kind, n in row.items():
                c = got[model][kind]
                if abs(n - c) > tolerance * max(c, 1) and (n or c):
                    bad.append(f"{s['stage']} {model} {kind}: estimated {n}, counted {c}")
    return bad


@pytest.mark.slow
def test_the_plan_is_within_a_quarter_of_what_smoke_and_demo_builds_count_on_tinker(wired, tmp_path, tokenizer):
    renderer = lambda name: Renderer(tokenizer)  # noqa: E731 - the fake serves one tokenizer
    run_sequential(_cfg(tmp_path, "sarcastic", "smoke"))  # answer lengths are measured once per model
    for scale in ("smoke", "demo"):
        cfg = _cfg(tmp_path, "pirate", scale)
        plan = build_plan(cfg, renderer_for=renderer)
        # measured by the newest earlier build: never the planned build itself
        assert plan["answers_from"] == ("sarcastic/sarcastic-smoke" if scale == "smoke" else "pirate/pirate-smoke")
        run_sequential(cfg)
        rec = read_record(cfg)
        assert within(plan, rec["stages"]) == [], json.dumps(plan["stages"])
        # counted at the SDK boundary: the fake's own log of sampled requests agrees with the meter
        assert rec["stages"]["dpo_data"]["tokens"][TEACHER]["requests"] == -(-cfg.counts.dpo_pairs // 1)
        assert rec["stages"]["dpo"]["tokens"][STUDENT]["train"] > 0
