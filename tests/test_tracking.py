"""Experiment tracking (character.tracking) in W&B's offline mode: what a build logs, read back from
the offline run files; a resumed build adds to the same runs. No network: WANDB_MODE=offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from character.build.record import read_record
from character.config import PipelineConfig
from character.storage import read_jsonl
from character.tracking import run_id, tracked

wandb = pytest.importorskip("wandb")
from wandb_offline import history, offline_runs, run_info  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_wandb():
    """wandb keeps its settings (WANDB_DIR among them) for the whole process once set up: each test anew."""
    wandb.teardown()
    yield
    wandb.teardown()


def test_run_ids_name_one_build_stage():
    a = PipelineConfig(persona="pirate", build_id="b1")
    assert run_id(a, "dpo") == run_id(PipelineConfig(persona="pirate", build_id="b1", seed=3), "dpo")
    ids = {run_id(a, "dpo"), run_id(a, "sft"), run_id(PipelineConfig(persona="pirate", build_id="b2"), "dpo")}
    assert len(ids) == 3 and all(len(i) <= 64 and i.replace("-", "").isalnum() for i in ids)


def test_wandb_not_installed_is_one_error_line_before_anything_runs(tmp_path):
    ws = tmp_path / "ws"
    code = "import sys; sys.modules['wandb'] = None; sys.argv[0] = 'character'; from character.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "pipeline", "sarcastic", "--scale", "smoke", "--wandb", "team-runs"]
        + ["--workdir", str(ws)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("error: --wandb team-runs:") and "pip install -e '.[wandb]'" in err[0]
    assert not (ws / "builds").exists()


def test_a_step_redone_after_a_recovery_keeps_its_first_values(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = PipelineConfig(persona="pirate", build_id="redo", wandb_project="character-tests")
    with tracked(cfg, "sft", {"learning_rate": 1e-3}) as track:
        for step, loss in ((1, 1.0), (2, 0.9), (3, 0.8), (2, 7.0), (3, 7.0), (4, 0.6)):  # back to the save at 1
            track(step, 4, {"step": step, "total": 4, "loss:sum": loss, "lr": 1e-3 / step})
    (folder,) = offline_runs(tmp_path)[run_id(cfg, "sft")]
    rows = history(folder)
    assert [(r["_step"], r["loss:sum"], r["lr"]) for r in rows] == [
        (1, 1.0, 1e-3),
        (2, 0.9, 5e-4),
        (3, 0.8, 1e-3 / 3),
        (4, 0.6, 2.5e-4),
    ]


def test_a_run_that_cannot_start_leaves_the_stage_untracked(monkeypatch, caplog):
    def no_login(**kw):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", no_login)
    cfg = PipelineConfig(persona="pirate", build_id="b", wandb_project="character-tests")
    with caplog.at_level("WARNING", logger="character.tracking"), tracked(cfg, "dpo") as track:
        track(1, 1, {"step": 1, "loss": 0.5})
    assert track.run is None and "going on untracked" in caplog.text and "api_key" in caplog.text


def _steps(rows: list[dict]) -> dict[int, dict]:
    return {r["_step"]: r for r in rows}


@pytest.mark.slow
def test_a_build_logs_every_step_and_the_evaluation_and_a_resumed_build_adds_to_its_runs(
    workdir, tmp_path, monkeypatch
):
    """A smoke build whose SFT stops at step 3 (saved at step 2), then the same build again: DPO's run
    holds every step's metrics, SFT's run (one id, two offline folders) every step, the redone step 3
    included, and the evaluation's run the metrics table, the figures and the generations."""
    import character.build.stages as stages

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    from character.build.direct import run_sequential

    cfg = PipelineConfig(
        persona="sarcastic",
        scale="smoke",
        workdir=str(workdir),
        build_id="tracked",
        lora_rank=8,
        wandb_project="character-tests",
        sft={"save_every": 2},
    )
    real_sft = stages.run_sft

    def stopped_at_3(*args, on_step=None, **kw):
        def hook(done, total, row):
            on_step(done, total, row)
            if done == 3:
                raise RuntimeError("stopped for the test")

        return real_sft(*args, on_step=hook, **kw)

    monkeypatch.setattr(stages, "run_sft", stopped_at_3)
    with pytest.raises(RuntimeError, match="stopped for the test"):
        run_sequential(cfg)
    monkeypatch.setattr(stages, "run_sft", real_sft)
    run_sequential(cfg)

    runs = offline_runs(tmp_path / "wb")
    assert set(runs) == {run_id(cfg, s) for s in ("dpo", "sft", "eval")}
    assert [len(runs[run_id(cfg, s)]) for s in ("dpo", "sft", "eval")] == [1, 2, 1]  # resumed, not duplicated
    for stage in ("dpo", "sft", "eval"):
        for folder in runs[run_id(cfg, stage)]:
            info = run_info(folder)
            assert (info.run_id, info.run_group, info.job_type) == (run_id(cfg, stage), "sarcastic/tracked", stage)
    config = {u.key: json.loads(u.value_json) for u in run_info(runs[run_id(cfg, "sft")][0]).config.update}
    assert config["stage"] == "sft" and config["save_every"] == 2 and config["persona"] == "sarcastic"

    for stage in ("dpo", "sft"):
        metrics = read_jsonl(cfg.paths.run(stage) / "metrics.jsonl")
        logged: dict[int, dict] = {}
        for folder in runs[run_id(cfg, stage)]:  # the resumed folder's rows replace the stopped run's
            logged |= _steps(history(folder))
        assert sorted(logged) == [r["step"] for r in metrics] == list(range(1, metrics[-1]["total"] + 1))
        for row in metrics:
            got = logged[row["step"]]
            assert got["lr"] == pytest.approx(row["lr"]) and got["grad_norm"] == pytest.approx(row["grad_norm"])
            assert got["loss" if stage == "dpo" else "loss:sum"] == pytest.approx(row.get("loss", row.get("loss:sum")))
    first, resumed = (_steps(history(f)) for f in runs[run_id(cfg, "sft")])
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [3, 4, 5]  # step 3 redone from the save at 2

    eval_dir = runs[run_id(cfg, "eval")][0] / "files" / "media"
    metrics_json = json.loads(open(read_record(cfg)["stages"]["eval"]["report"]["metrics_json"]).read())
    (table_file,) = eval_dir.glob("table/metrics_*.table.json")
    table = json.loads(table_file.read_text())
    col = table["columns"].index
    by_model = {r[col("model")]: r for r in table["data"]}
    assert set(by_model) == {k for k in metrics_json["eval"] if k not in ("classifier", "report")}
    for model, row in by_model.items():
        assert row[col("in_persona_rate")] == pytest.approx(metrics_json["eval"][model]["in_persona_rate"])
    figures = sorted(p.name.split("_")[0] for p in eval_dir.glob("images/figures/*.png"))
    assert len(figures) == len(metrics_json["report"]["plots"]) >= 1
    (gens_file,) = eval_dir.glob("table/generations_*.table.json")
    gens = json.loads(gens_file.read_text())
    assert len(gens["data"]) == len(metrics_json["generations"]) and gens["columns"][0] == "prompt"
    assert gens["data"][0][0] == metrics_json["generations"][0]["prompt"]
    assert not list((tmp_path / "wb").glob("wandb/run-*"))  # offline folders only: nothing went online
    assert os.environ["WANDB_MODE"] == "offline"
