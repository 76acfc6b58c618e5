"""Paper mode, the nightly flow, retries that only repeat transient failures, the artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from character.backend.errors import TransientBackendError
from character.build.record import read_record
from character.build.stages import PipelineConfig
from character.storage import uri_to_path

SMALL = dict(dpo_pairs=8, reflections=8, interactions=2, turns=2, lora_rank=4, max_new_tokens=64)


def _ws(tmp_path_factory, models_dir, name):
    ws = tmp_path_factory.mktemp(name) / "ws"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    return ws


@pytest.fixture(scope="module")
def paper_run(prefect_harness, tmp_path_factory, models_dir):
    from flows.paper import paper

    ws = _ws(tmp_path_factory, models_dir, "paper")
    cfg = PipelineConfig(persona="pirate", workdir=str(ws), build_id="paper-test", mode="paper", merge=True, **SMALL)
    return cfg, paper(cfg, return_state=True)


def test_paper_flow_trains_sft_from_base_and_merges(paper_run, tiny_dir):
    from prefect.artifacts import Artifact

    cfg, state = paper_run
    assert state.is_completed(), state.message
    uris = state.result().checkpoints
    assert set(uris) == {"dpo", "sft", "merged", "final"} and uris["final"] == uris["merged"]
    stages = read_record(cfg)["stages"]
    assert stages["merged"]["method"] == "exact" and stages["merged"]["weights"] == [1.0, 0.25]
    # SFT started from the base: its run has no parent state
    sft_state = json.loads((uri_to_path(stages["sft"]["state"]) / "character_state.json").read_text())
    assert "parent" not in sft_state
    merged_cfg = json.loads((uri_to_path(uris["merged"]) / "adapter_config.json").read_text())
    assert merged_cfg["r"] == 8  # exact merge: ranks concatenated (4 + 4)
    for key in (
        "pirate-dpo-checkpoint",
        "pirate-sft-checkpoint",
        "pirate-merged-checkpoint",
        "pirate-build-summary",
        "pirate-evaluation",
    ):
        assert Artifact.get(key) is not None, key
    table = Artifact.get("pirate-evaluation").data
    for label in ("base", "dpo", "sft", "merged"):
        assert label in str(table)
    summary = Artifact.get("pirate-build-summary").data
    assert uris["merged"] in summary and "dpo_data" in summary


def test_nightly_builds_each_persona_and_isolates_failures(prefect_harness, tmp_path_factory, models_dir):
    from prefect.artifacts import Artifact

    from flows.nightly import nightly

    ws = _ws(tmp_path_factory, models_dir, "nightly")
    state = nightly(["nosuch", "loving"], workdir=str(ws), build_id="night-1", overrides=SMALL, return_state=True)
    assert state.is_failed() and "1 of 2 personas failed: nosuch (UserError: unknown persona 'nosuch'" in state.message
    rows = {r["persona"]: r for r in json.loads(Artifact.get("nightly-summary").data)}
    assert rows["nosuch"]["state"] == "Failed" and "unknown persona" in rows["nosuch"]["message"]
    assert rows["loving"]["state"] == "Completed" and rows["loving"]["final"].startswith("file://")
    rec = read_record(PipelineConfig(persona="loving", workdir=str(ws), build_id="night-1"))
    assert rec["stages"]["sft"]["sampler"] == rows["loving"]["final"]
    counted = sum(
        t[k]
        for st in rec["stages"].values()
        for t in (st.get("tokens") or {}).values()
        for k in ("prefill", "sample", "train")
    )
    assert rows["loving"]["tokens"] == counted > 0 and rows["loving"]["cost_usd"] == 0.0  # tiny is free
    assert rows["nosuch"]["tokens"] == 0 and rows["nosuch"]["cost_usd"] is None
    # one persona built: no cross-persona evaluation, and the summary says so
    assert "no cross-persona evaluation (fewer than two personas" in Artifact.get("nightly-summary").description


def test_transient_errors_are_retried_and_fatal_ones_are_not(prefect_harness, monkeypatch, tmp_path):
    from prefect import flow

    from character.build import stages as pipeline
    from tasks import dpo_data

    calls = []

    def flaky(cfg, questions_path=None):
        calls.append(1)
        if len(calls) < 3:
            raise TransientBackendError("503 from the service")
        return "done.jsonl"

    def fatal(cfg, questions_path=None):
        calls.append(1)
        raise ValueError("400: bad request")

    cfg = PipelineConfig(persona="pirate", workdir=str(tmp_path), build_id="retry")
    task = dpo_data.with_options(retry_delay_seconds=0)

    @flow
    def one():
        return task(cfg, None)

    monkeypatch.setattr(pipeline, "stage_dpo_data", flaky)
    state = one(return_state=True)
    assert state.is_completed() and state.result() == "done.jsonl" and len(calls) == 3

    calls.clear()
    monkeypatch.setattr(pipeline, "stage_dpo_data", fatal)
    state = one(return_state=True)
    assert state.is_failed() and len(calls) == 1 and "400: bad request" in state.message


def test_checkpoints_list_reads_the_records(paper_run):
    cfg, _ = paper_run
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "character.cli",
            "checkpoints",
            "list",
            "--workdir",
            cfg.workdir,
            "--persona",
            "pirate",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {r["stage"] for r in rows} == {"dpo", "sft", "merged", "final"}  # final: the merged model here
    assert all(r["persona"] == "pirate" and r["build_id"] == "paper-test" for r in rows)


def test_a_build_id_refuses_other_inputs(tmp_path):
    from character.build.checks import validate
    from character.build.record import record_stage
    from character.errors import UserError

    cfg = PipelineConfig(persona="pirate", workdir=str(tmp_path), build_id="b1", dpo_pairs=8)
    record_stage(cfg, "dpo_data", {"path": "x"})
    validate(cfg.model_copy(update={"max_in_flight": 3, "evaluate": False}))  # run-only settings may change
    with pytest.raises(UserError, match=r"build 'b1' of pirate was started with other settings \(dpo_pairs\)"):
        validate(cfg.model_copy(update={"dpo_pairs": 9}))
    validate(cfg.model_copy(update={"dpo_pairs": 9, "build_id": "b2"}))  # a new id starts fresh


def test_cli_starts_the_ephemeral_api_early_and_prefect_reuses_it(tmp_path):
    """The CLI starts Prefect's temporary API while libraries load; the flow then finds that one server."""
    script = """
from prefect import flow
from prefect.server.api.server import SubprocessASGIServer
from flows.ephemeral import start_ephemeral_api_early

wait = start_ephemeral_api_early()
wait()
server = SubprocessASGIServer()
assert server.running and server.server_process.poll() is None

@flow
def answer():
    return 42

assert answer() == 42
assert list(SubprocessASGIServer._instances.values()) == [server], SubprocessASGIServer._instances
print("ok", server.api_url)
"""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok http://127.0.0.1:")


def test_early_start_does_nothing_when_an_api_url_is_set(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.ephemeral import start_ephemeral_api_early

    before = {k: s.running for k, s in SubprocessASGIServer._instances.items()}
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}):
        wait = start_ephemeral_api_early()
    assert wait() is None
    assert {k: s.running for k, s in SubprocessASGIServer._instances.items()} == before  # nothing started


@pytest.fixture(scope="module")
def crafted(base, tmp_path_factory):
    """A LoRA adapter of the tiny model, untrained: what a fabricated build records as its models."""
    from adapters import untrained_adapter

    return untrained_adapter(base, tmp_path_factory.mktemp("crafted") / "adapter")


def _fabricated_builds(monkeypatch, adapter):
    """Each persona's build "runs" by writing a finished build's folder (teacher answers, dpo and sft
    models; no evaluation of its own): the nightly's cross-persona step without training anything."""
    from pathlib import Path

    import flows.nightly
    from tests.test_cross_persona import make_build

    def one(cfg):
        make_build(Path(cfg.workdir), cfg.constitution().name, adapter, build_id=cfg.build_id)
        return {"state": "Completed", "checkpoints": {"final": adapter.as_uri()}, "message": ""}

    monkeypatch.setattr(flows.nightly, "_one", one)


@pytest.mark.usefixtures("one_thread")
def test_nightly_runs_the_cross_persona_evaluation_and_its_failure_fails_nothing(
    prefect_harness, tmp_path_factory, models_dir, monkeypatch, crafted
):
    from prefect.artifacts import Artifact

    import tasks.cross_persona
    from flows.nightly import nightly

    ws = _ws(tmp_path_factory, models_dir, "nightly-cross")
    _fabricated_builds(monkeypatch, crafted)
    kw = dict(workdir=str(ws), overrides={"max_new_tokens": 4}, return_state=True)
    state = nightly(["pirate", "poetic"], build_id="night-x1", **kw)
    assert state.is_completed(), state.message
    cross = state.result()["cross-persona"]
    assert cross["state"] == "Completed"
    # metrics.json in the workspace's evals/cross-persona/: every group's macro-F1, 2 x 2 confusion matrices
    (metrics,) = (ws / "evals" / "cross-persona").glob("*/metrics.json")
    assert cross["report"] == str(metrics.parent / "report.md")
    res = json.loads(metrics.read_text())
    assert res["personas"] == ["pirate", "poetic"] and set(res["builds"]) == {"pirate", "poetic"}
    assert set(res["groups"]) == {"base", "prompted", "dpo", "final"}
    for group, kinds in res["groups"].items():
        for rep in kinds.values():
            assert 0 <= rep["macro_f1"] <= 1, group
            assert rep["labels"] == ["pirate", "poetic"] and [len(r) for r in rep["confusion"]] == [2, 2]
    for group in ("base", "prompted", "final"):
        assert cross[f"{group}_macro_f1"] == res["groups"][group]["plain"]["macro_f1"], group
    # the summary (return value and artifact) says where the report is and its headline
    f = {g: f"{res['groups'][g]['plain']['macro_f1']:.3f}" for g in ("base", "prompted", "final")}
    assert cross["headline"] == f"final macro-F1 {f['final']} against base {f['base']} (prompted {f['prompted']})"
    summary = Artifact.get("nightly-summary")
    assert f"cross-persona evaluation: {cross['headline']}; report {cross['report']}" in summary.description
    assert {r["persona"] for r in json.loads(summary.data)} == {"pirate", "poetic"}  # a row per persona only
    # the cross-persona task's own artifacts: the table (one row per group and kind) and the report
    table = json.loads(Artifact.get("cross-persona-evaluation").data)
    assert [r["models"] for r in table] == ["teacher answers (held out)"] + [
        g for g in ("base", "prompted", "dpo", "final") for _ in range(2)
    ]
    report = Artifact.get("cross-persona-evaluation-report")
    assert report.data == (metrics.parent / "report.md").read_text() and cross["report"] in report.description

    # A cross-persona evaluation that fails is reported and fails nothing: every build stands on its own.
    def broken(specs, options):
        raise RuntimeError("the classifier broke")

    monkeypatch.setattr(tasks.cross_persona, "evaluate_personas", broken)
    state = nightly(["pirate", "poetic"], build_id="night-x2", **kw)
    assert state.is_completed(), state.message
    cross = state.result()["cross-persona"]
    assert cross["state"] == "Failed" and "the classifier broke" in cross["message"]
    assert "the cross-persona evaluation failed: " in Artifact.get("nightly-summary").description
    assert "the classifier broke" in Artifact.get("nightly-summary").description
