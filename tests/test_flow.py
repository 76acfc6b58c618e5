"""The sequential flow end to end on the tiny model, through Prefect."""

from __future__ import annotations

from pathlib import Path

import pytest

from character.build.record import read_record
from character.build.stages import PipelineConfig
from character.storage import read_jsonl, uri_to_path


@pytest.fixture(scope="module")
def smoke_run(prefect_harness, tmp_path_factory, models_dir):
    from flows.sequential import sequential

    ws = tmp_path_factory.mktemp("flow") / "ws"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    cfg = PipelineConfig(persona="sarcastic", scale="smoke", workdir=str(ws), build_id="smoke-test", lora_rank=8)
    state = sequential(cfg, return_state=True)
    return cfg, state


def test_smoke_flow_completes(smoke_run):
    cfg, state = smoke_run
    assert state.is_completed(), state.message
    result = state.result()
    assert result.mode == "sequential" and result.persona == "sarcastic"
    assert set(result.checkpoints) == {"dpo", "sft", "final"}
    assert result.checkpoints["final"] == result.checkpoints["sft"] != result.checkpoints["dpo"]
    stages = read_record(cfg)["stages"]
    assert set(stages) == {"dpo_data", "dpo", "introspection", "sft", "eval"}
    assert stages["dpo_data"]["rows"] > 0 and stages["introspection"]["rows"] > 0
    # evaluation ran on the held-out rows, which training never saw
    held = stages["dpo_data"]["heldout"]
    assert "/heldout/" in held and stages["dpo_data"]["path"].endswith("/train/dpo.jsonl")
    train_prompts = {
        r["prompt"][0]["content"] + r["chosen"][0]["content"] for r in read_jsonl(Path(stages["dpo_data"]["path"]))
    }
    held_rows = read_jsonl(Path(held))
    assert held_rows and not any(
        r["prompt"][0]["content"] + r["chosen"][0]["content"] in train_prompts for r in held_rows
    )


def test_artifacts_hold_the_checkpoint_uris(smoke_run):
    from prefect.artifacts import Artifact

    _, state = smoke_run
    uris = state.result().checkpoints
    assert Artifact.get("sarcastic-evaluation") is not None
    report = Artifact.get("sarcastic-evaluation-report").data  # plots inline: the UI cannot read local files
    assert "](data:image/png;base64," in report and "](eval_metrics.png)" not in report
    assert Artifact.get("sarcastic-build-summary") is not None
    for key, stage in [
        ("sarcastic-dpo-checkpoint", "dpo"),
        ("sarcastic-sft-checkpoint", "sft"),
        ("sarcastic-final-checkpoint", "final"),
    ]:
        art = Artifact.get(key)
        assert art is not None, key
        assert art.type == "markdown" or art.type == "link"
        assert uris[stage] in str(art.data)


def test_final_checkpoint_loads_and_differs_from_base(smoke_run, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, state = smoke_run
    folder = uri_to_path(state.result().checkpoints["final"])
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), folder).merge_and_unload()
    diffs = {k: (v - base_sd[k]).abs().max().item() for k, v in merged.state_dict().items()}
    assert max(diffs.values()) > 0
    assert any(d > 0 for k, d in diffs.items() if "q_proj" in k) and any(d > 0 for k, d in diffs.items() if "mlp" in k)


def test_running_the_same_build_again_redoes_nothing(smoke_run):
    from flows.sequential import sequential

    cfg, first = smoke_run
    before = read_record(cfg)["stages"]
    again = sequential(cfg, return_state=True)
    assert again.is_completed()
    assert again.result().checkpoints == first.result().checkpoints
    assert read_record(cfg)["stages"] == before


def test_the_plain_stages_record_what_the_flow_records(smoke_run, tmp_path_factory, models_dir):
    """One plan (character.build.plan), two sets of stages: the plain ones record the same stages,
    with the same fields, evaluate the same checkpoints and write the report (no artifacts)."""
    from character.build.direct import run_sequential

    cfg, state = smoke_run
    ws = tmp_path_factory.mktemp("plain") / "ws"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    plain = cfg.model_copy(update={"workdir": str(ws)})
    out = run_sequential(plain)
    assert set(out) == set(state.result().checkpoints) and out["final"] == out["sft"]
    assert out["final"].sampler.startswith("file://" + str(ws))
    flow_stages, plain_stages = read_record(cfg)["stages"], read_record(plain)["stages"]
    assert set(plain_stages) == set(flow_stages)
    for name, entry in flow_stages.items():
        assert set(plain_stages[name]) == set(entry), name
    assert plain_stages["dpo_data"]["rows"] == flow_stages["dpo_data"]["rows"]
    assert plain_stages["eval"]["names"] == flow_stages["eval"]["names"] == ["dpo", "final"]
    assert set(plain_stages["eval"]["summary"]) == set(flow_stages["eval"]["summary"])
    assert Path(plain_stages["eval"]["report"]["markdown"]).is_file()
