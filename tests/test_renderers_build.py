"""The renderer in the build: chosen by model name before anything is called, recorded in record.json,
and a build refuses to resume with another; a family we cannot render or export fails with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from character.build import checks
from character.build.record import check_same_renderers, read_record, record_stage
from character.config import PipelineConfig
from character.errors import UserError


@pytest.fixture
def keyed(monkeypatch, tmp_path):
    monkeypatch.setenv("TINKER_API_KEY", "tml-not-a-real-key")
    monkeypatch.setenv("CHARACTER_WORKDIR", str(tmp_path / "ws"))
    return tmp_path / "ws"


def _cfg(workdir, **kw) -> PipelineConfig:
    return PipelineConfig(persona="pirate", workdir=str(workdir), build_id="b1", **kw)


def test_the_record_names_each_models_renderer(tmp_path):
    cfg = _cfg(tmp_path, backend="tinker", base_model="Qwen/Qwen3.5-4B", teacher_model="Qwen/Qwen3.6-35B-A3B")
    record_stage(cfg, "questions", {"path": None})
    assert read_record(cfg)["renderers"] == {
        "student": "qwen3_5_disable_thinking",
        "teacher": "qwen3_5_disable_thinking",
    }
    check_same_renderers(cfg)  # the same build resumes
    local = _cfg(tmp_path / "local")
    record_stage(local, "questions", {"path": None})
    assert read_record(local)["renderers"] == {"student": "template", "teacher": "template"}


def test_a_build_refuses_to_resume_with_another_renderer(tmp_path):
    cfg = _cfg(tmp_path, backend="tinker", base_model="Qwen/Qwen3-8B")
    record_stage(cfg, "questions", {"path": None})
    rec = json.loads(cfg.paths.record.read_text())
    rec["renderers"]["student"] = "template"  # as a version before family renderers would have made it
    cfg.paths.record.write_text(json.dumps(rec))
    with pytest.raises(UserError, match="started with the template renderer for its student .Qwen/Qwen3-8B.") as e:
        check_same_renderers(cfg)
    assert "qwen3_disable_thinking" in str(e.value) and "--build-id" in str(e.value)
    del rec["renderers"]  # a record from before renderers were recorded: it used the generic one
    cfg.paths.record.write_text(json.dumps(rec))
    with pytest.raises(UserError, match="template renderer"):
        check_same_renderers(cfg)


def test_validate_refuses_an_unrenderable_teacher_before_any_call(keyed):
    with pytest.raises(UserError, match="^teacher: model openai/gpt-oss-120b is a reasoning-only model"):
        checks.validate(_cfg(keyed, backend="tinker", base_model="Qwen/Qwen3-8B", teacher_model="openai/gpt-oss-120b"))
    checks.validate(_cfg(keyed, backend="tinker", base_model="Qwen/Qwen3-8B", teacher_model="Qwen/Qwen3.5-397B-A17B"))


@pytest.mark.parametrize(
    "model,family",
    [
        ("Qwen/Qwen3.6-35B-A3B", "mixture-of-experts"),
        ("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "mixture-of-experts"),
    ],
)
def test_paper_mode_merge_is_refused_before_training_for_families_we_cannot_export(keyed, model, family):
    with pytest.raises(UserError, match=family) as e:
        checks.validate(_cfg(keyed, backend="tinker", base_model=model, mode="paper", merge=True))
    assert model in str(e.value)
    checks.validate(_cfg(keyed, backend="tinker", base_model=model, mode="paper"))  # without --merge: fine


def test_paper_mode_merge_is_accepted_for_dense_families(keyed):
    for model in ("Qwen/Qwen3-8B", "Qwen/Qwen3.5-4B", "Qwen/Qwen3.6-27B", "meta-llama/Llama-3.3-70B-Instruct"):
        checks.validate(_cfg(keyed, backend="tinker", base_model=model, mode="paper", merge=True))


def test_the_cli_refuses_a_reasoning_only_student_in_one_line(tmp_path):
    env = {**os.environ, "TINKER_API_KEY": "tml-not-a-real-key"}
    args = ["pipeline", "pirate", "--backend", "tinker", "--base-model", "openai/gpt-oss-20b"]
    out = subprocess.run(
        [sys.executable, "-m", "character.cli", *args, "--workdir", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: student: model openai/gpt-oss-20b is a reasoning-only")
    assert not (tmp_path / "ws" / "builds").exists()  # nothing was written, nothing was called
