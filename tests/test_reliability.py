"""Reliability: injected transient faults, SIGKILL and resume, fatal errors, secrets, interrupted writes.

Every pipeline here uses the same small configuration, so one uninterrupted run (`reference`) is
the yardstick for all of them: a run with 20% of backend calls failing, and runs killed in the
middle of data generation, of DPO and of SFT, must all end with exactly its final adapter.

Torch runs on one thread in this module and in its child processes: the same ops on the same
thread count give the same bits, and on a shared 2-core machine two threads per process mostly
wait for each other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from adapters import assert_same_training
from kept_logs import kept_logs
from safetensors.torch import load_file

from character.backend.errors import BackendFatalError
from character.build import stages as pipeline
from character.build.direct import run_sequential
from character.build.record import read_record, record_stage
from character.build.stages import PipelineConfig
from character.storage import read_jsonl, uri_to_path

# Small counts; one item or step at a time, so there is a middle to kill a run in.
SMALL = dict(
    persona="pirate",
    dpo_pairs=24,
    reflections=16,
    interactions=2,
    turns=2,
    max_new_tokens=64,
    max_in_flight=4,
    evaluate=False,
    dpo={"batch_size": 1, "save_every": 2},
    sft={"batch_size": 1, "save_every": 2},
)
CLI_SMALL = [
    "--dpo-pairs",
    "24",
    "--reflections",
    "16",
    "--interactions",
    "2",
    "--turns",
    "2",
    "--max-new-tokens",
    "64",
    "--max-in-flight",
    "4",
    "--batch-size",
    "1",
    "--save-every",
    "2",
    "--no-eval",
]
FAKE_KEY = "sk-FAKE-KEY-123456789"
DRIVER = (
    "import json, sys; from character.build.direct import run_sequential; from character.config import PipelineConfig; "
    "run_sequential(PipelineConfig(**json.loads(sys.argv[1])))"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _ws(tmp_path_factory, models_dir, name: str) -> Path:
    ws = tmp_path_factory.mktemp(name) / "ws"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    return ws


def _cfg(ws: Path, build_id: str) -> PipelineConfig:
    return PipelineConfig(workdir=str(ws), build_id=build_id, **SMALL)


def _final_adapter(cfg: PipelineConfig) -> dict[str, torch.Tensor]:
    return load_file(uri_to_path(read_record(cfg)["stages"]["sft"]["sampler"]) / "adapter_model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


class Counting:
    """Wraps a service and everything it creates; counts the backend calls made through it."""

    COUNTED = ("sample", "compute_logprobs", "forward_backward", "forward_backward_custom", "optim_step")

    def __init__(self, inner, counts: dict):
        self._inner, self._counts = inner, counts

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name in self.COUNTED:

            def counted(*args, **kwargs):
                self._counts[name] = self._counts.get(name, 0) + 1
                return attr(*args, **kwargs)

            return counted
        if name.startswith("create_"):
            return lambda *args, **kwargs: Counting(attr(*args, **kwargs), self._counts)
        return attr


def _run_counted(cfg: PipelineConfig) -> dict:
    counts: dict[str, int] = {}
    real = pipeline._service
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "_service", lambda c: Counting(real(c), counts))
        run_sequential(cfg)
    return counts


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models_dir):
    """The uninterrupted, fault-free run: its config, final adapter, calls made, and files."""
    cfg = _cfg(_ws(tmp_path_factory, models_dir, "reference"), "reference")
    counts = _run_counted(cfg)
    return cfg, _final_adapter(cfg), counts


# -- killing a process at a moment chosen by watching its files --------------------------------------
def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _child_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING", **extra}


def kill_when(cmd: list[str], ready, log: Path, env: dict, timeout: float = 300) -> None:
    """Start `cmd`, SIGKILL its whole process group as soon as `ready()` holds."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"exited ({proc.returncode}) before the moment to kill it:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the moment to kill never came:\n{log.read_text()[-3000:]}")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(path)]


def _assert_resumed_training(run_dir: Path, before_metrics: list[dict], before_saves: list[dict]) -> int:
    """Steps up to the last save before the kill were not redone; every step ran exactly once in the end.

    Returns the step the run resumed from."""
    saved = before_saves[-1]["step"]
    after = read_jsonl(run_dir / "metrics.jsonl")
    total = after[-1]["total"]
    assert [r["step"] for r in after] == list(range(1, total + 1))  # unique and contiguous
    # the rows of saved steps are the very rows written before the kill (their timings too): not redone
    assert after[:saved] == [r for r in before_metrics if r["step"] <= saved]
    saves = read_jsonl(run_dir / "checkpoints.jsonl")
    assert saves[: len(before_saves)] == before_saves and saves[-1].get("final")
    steps = [s["step"] for s in saves[:-1]]
    assert steps == sorted(set(steps))  # strictly increasing: no saved step was saved again
    return saved


# -- 1. transient faults, and 5. secrets, through Prefect ------------------------------------------
@pytest.fixture(scope="module")
def faulty_prefect_run(prefect_harness, tmp_path_factory, models_dir, reference):
    """The sequential flow with 20% of backend calls failing transiently and a fake Tinker key set.

    Everything logged is kept (DEBUG and up, every logger). Backoffs are zeroed: the faults are
    injected before any work, so waiting changes nothing but the test's duration.
    """
    import character.backend.faults as faults
    import character.backend.retry as retry
    import tasks.stages as stages
    from flows.sequential import sequential

    cfg = _cfg(_ws(tmp_path_factory, models_dir, "faulty"), "faulty")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARACTER_FAULT_RATE", "0.2")
        mp.setenv("CHARACTER_FAULT_SEED", "11")
        mp.setenv("TINKER_API_KEY", FAKE_KEY)
        mp.setattr(retry, "BACKOFF_S", 0.0)
        for name in dir(stages):
            if hasattr(getattr(stages, name), "retry_delay_seconds"):
                mp.setattr(getattr(stages, name), "retry_delay_seconds", 0)
        with kept_logs() as records:
            state = sequential(cfg, return_state=True)
    injected = dict(faults.shared_faults(0.2, 11).injected)
    return cfg, state, injected, records


@pytest.mark.slow
def test_a_fifth_of_backend_calls_failing_changes_nothing(faulty_prefect_run, reference):
    cfg, state, injected, _ = faulty_prefect_run
    assert state.is_completed(), state.message
    # faults hit sampling, reference log-probs and every kind of training call
    assert sum(injected.values()) >= 30, injected
    assert {"sample", "compute_logprobs", "optim_step", "save_state"} <= set(injected), injected
    assert {"forward_backward", "forward_backward_custom"} & set(injected), injected
    ref_cfg, ref_adapter, _ = reference
    for data in ("dpo.jsonl", "introspection.jsonl"):  # the same data, word for word
        rows = [{k: v for k, v in r.items() if k != "meta"} for r in read_jsonl(cfg.build_dir() / "data" / data)]
        ref_rows = [
            {k: v for k, v in r.items() if k != "meta"} for r in read_jsonl(ref_cfg.build_dir() / "data" / data)
        ]
        assert rows == ref_rows, data
    assert_same_training(_final_adapter(cfg), ref_adapter, "faulty")  # to rounding: tests/adapters.py
    # every training step ran once, however many of its calls failed
    for stage in ("dpo", "sft"):
        ref_steps = _steps(ref_cfg.build_dir() / stage / "metrics.jsonl")
        assert _steps(cfg.build_dir() / stage / "metrics.jsonl") == ref_steps


def test_fault_injection_is_off_by_default_and_seeded(monkeypatch, workdir):
    from character.backend.faults import Faults, with_faults
    from character.backend.local import LocalService
    from character.settings import Settings, Workspace

    monkeypatch.delenv("CHARACTER_FAULT_RATE", raising=False)
    cfg = PipelineConfig(persona="pirate", workdir=str(workdir), build_id="plain")
    assert isinstance(pipeline._service(cfg), LocalService)
    assert Settings().fault_rate == 0
    svc = LocalService(Workspace(workdir))
    assert with_faults(svc, 0.0) is svc
    a, b = Faults(0.2, seed=5), Faults(0.2, seed=5)
    draws = [a.draw("x") for _ in range(500)]
    assert draws == [b.draw("x") for _ in range(500)]
    assert 70 <= sum(d is not None for d in draws) <= 130 and {"submit", "result"} <= set(draws)


def test_injected_faults_surface_only_when_awaited_as_on_tinker():
    """The Tinker SDK never raises when a training or sampling call is submitted: the failure reaches
    `.result()`, after later calls were submitted. A fault drawn "submit" is a request that never ran, one
    drawn "result" ran and lost its result; a failed custom loss poisons the client."""
    from character.backend.errors import TransientBackendError, is_transient
    from character.backend.faults import Faults, FaultySamplingClient, FaultyTrainingClient

    class Inner:
        def __init__(self):
            self.ran: list[str] = []

        def __getattr__(self, name):
            def call(*args):
                self.ran.append(name)
                return SimpleNamespace(result=lambda: name)

            return call

    class Plan(Faults):
        def __init__(self, plan):
            super().__init__(rate=0.0)
            self.plan = list(plan)

        def draw(self, what):
            return self.plan.pop(0)

    inner = Inner()
    trainer = FaultyTrainingClient(inner, Plan(["submit", "result", None, "result", None]))
    never_ran = trainer.forward_backward([], "cross_entropy")  # no raise here
    ran = trainer.optim_step(None)
    fine = trainer.save_state("s")
    assert inner.ran == ["optim_step", "save_state"] and fine.result() == "save_state"
    for fut in (never_ran, ran):
        with pytest.raises(TransientBackendError):
            fut.result()
    custom = trainer.forward_backward_custom([], None)  # ran, then poisoned its client
    later = trainer.optim_step(None)  # submitted fine; fails when awaited, chained to the first failure
    assert inner.ran[-1] == "forward_backward_custom"
    with pytest.raises(TransientBackendError):
        custom.result()
    with pytest.raises(RuntimeError, match="poisoned") as err:
        later.result()
    assert is_transient(err.value) and inner.ran[-1] == "forward_backward_custom"  # the later call never ran
    sampler = FaultySamplingClient(Inner(), Plan(["submit", "result"]))
    for fut in (sampler.sample(None, 1, None), sampler.compute_logprobs(None)):
        with pytest.raises(TransientBackendError):
            fut.result()


def test_a_training_call_that_fails_transiently_is_made_again_in_order(monkeypatch, workdir, tmp_path):
    """Each failed training call sends the loop back to its last saved state on a fresh client; a failed
    forward/backward is not followed by its (already submitted) optimizer step on the kept weights. Training
    calls fail only when awaited: "submit" means the request never ran, "result" that it ran."""
    import character.backend.retry as retry
    from character.backend.faults import Faults, FaultyService
    from character.backend.local import LocalService
    from character.settings import Workspace
    from character.train.loop import OptimConfig
    from character.train.renderer import Renderer
    from character.train.sft import run_sft

    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)
    svc = LocalService(Workspace(workdir), device="cpu", seed=0)
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Who are you? {i}"},
                        {"role": "assistant", "content": f"A pirate, {i}."},
                    ]
                }
            )
            + "\n"
            for i in range(6)
        )
    )
    opt = OptimConfig(learning_rate=5e-3, batch_size=2, save_every=1)

    def run(service, name):
        start = lambda: service.create_lora_training_client("tiny", rank=4, seed=0)  # noqa: E731
        res = run_sft(service, start, Renderer(svc.get_tokenizer("tiny")), data, tmp_path / name, opt)
        return load_file(uri_to_path(res.sampler) / "adapter_model.safetensors")

    class Scripted(Faults):
        """(call, nth attempt) -> where it fails."""

        PLAN = {
            ("create_lora_training_client", 1): "submit",
            ("forward_backward", 1): "result",  # after the optimizer step was submitted
            ("forward_backward", 2): "submit",  # and its first retry too
            ("optim_step", 3): "result",
            ("save_state", 1): "submit",
            ("save_state", 3): "result",
            ("save_weights_for_sampler", 1): "result",
        }

        def __init__(self):
            super().__init__(rate=0.0)
            self.seen: dict[str, int] = {}

        def draw(self, what):
            self.seen[what] = self.seen.get(what, 0) + 1
            where = self.PLAN.get((what, self.seen[what]))
            if where:
                self.injected[what] = self.injected.get(what, 0) + 1
            return where

    clean = run(svc, "clean")
    faults = Scripted()
    flaky = run(FaultyService(svc, faults), "flaky")
    assert sum(faults.injected.values()) == len(Scripted.PLAN)
    assert all(torch.equal(clean[k], flaky[k]) for k in clean)
    assert _steps(tmp_path / "flaky" / "metrics.jsonl") == [1, 2, 3]


# -- 2. crash and resume ------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_during_data_generation_resumes_without_redoing_items(tmp_path_factory, models_dir, reference):
    ref_cfg, ref_adapter, ref_counts = reference
    cfg = _cfg(_ws(tmp_path_factory, models_dir, "gen-crash"), "gen-crash")
    data = cfg.build_dir() / "data" / "dpo.jsonl"
    skipped = data.with_name("dpo.jsonl.skipped.jsonl")
    kill_when(
        [sys.executable, "-c", DRIVER, cfg.model_dump_json()],
        lambda: _lines(data) + _lines(skipped) > 0,
        Path(cfg.workdir) / "gen-crash.log",
        _child_env(),
    )
    assert "dpo_data" not in read_record(cfg).get("stages", {})  # killed in the middle of generation
    done = {r["meta"]["index"] for r in read_jsonl(data)} | {r["index"] for r in read_jsonl(skipped)}
    assert 0 < len(done) < 24

    counts = _run_counted(cfg)
    # one teacher and one student request per prompt: exactly the finished prompts were not asked again
    assert counts["sample"] == ref_counts["sample"] - 2 * len(done)
    assert data.read_bytes() == (ref_cfg.build_dir() / "data" / "dpo.jsonl").read_bytes()
    assert _max_diff(_final_adapter(cfg), ref_adapter) <= 1e-6


@pytest.mark.slow
def test_killed_during_dpo_the_cli_resumes_from_the_last_save(prefect_harness, tmp_path_factory, models_dir, reference):
    """Through the command line and Prefect (the test's Prefect server, so no start-up to wait for)."""
    from prefect.settings import PREFECT_API_URL

    _, ref_adapter, _ = reference
    ws = _ws(tmp_path_factory, models_dir, "dpo-crash")
    cfg = _cfg(ws, "dpo-crash")  # what the command line below asks for
    run_dir = cfg.build_dir() / "dpo"
    cmd = [
        sys.executable,
        "-m",
        "character.cli",
        "pipeline",
        "pirate",
        "--workdir",
        str(ws),
        "--build-id",
        "dpo-crash",
        "--json",
        *CLI_SMALL,
    ]
    env = _child_env(PREFECT_API_URL=PREFECT_API_URL.value())
    kill_when(cmd, lambda: _lines(run_dir / "metrics.jsonl") >= 3, ws / "dpo-crash.log", env)
    before_metrics, before_saves = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "checkpoints.jsonl")
    assert before_saves and not before_saves[-1].get("final")  # killed in the middle of DPO
    stages = read_record(cfg)["stages"]
    assert "dpo_data" in stages and "dpo" not in stages
    data, refs = Path(stages["dpo_data"]["all"]), run_dir / "reference_logprobs.json"
    stamps = (data.stat().st_mtime_ns, refs.stat().st_mtime_ns, stages["dpo_data"]["finished_at"])

    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["persona"], summary["mode"], summary["base_model"]) == ("pirate", "sequential", "tiny")
    assert summary["workdir"] == str(ws.resolve()) and set(summary["checkpoints"]) == {"dpo", "sft", "final"}
    assert all(uri.startswith("file://") for uri in summary["checkpoints"].values())
    final = summary["checkpoints"]["final"]
    ev = summary["eval"]  # --no-eval: the same shape, every metric null with the reason in its notes
    assert {"base", "final", "classifier", "report"} <= set(ev) and set(ev["classifier"]) == {"heldout_accuracy", "n"}
    assert list(ev["final"]) == [
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
    assert ev["final"]["in_persona_rate"] is None and any("--no-eval" in n for n in ev["final"]["notes"])
    for stage in ("dpo", "introspection", "sft"):  # progress on stderr (no terminal: lines)
        assert f"\n{stage}: done " in "\n" + proc.stderr, stage
    saved = _assert_resumed_training(run_dir, before_metrics, before_saves)
    assert saved >= 2
    # the data and the reference log-probs were not made again
    assert (
        data.stat().st_mtime_ns,
        refs.stat().st_mtime_ns,
        read_record(cfg)["stages"]["dpo_data"]["finished_at"],
    ) == stamps
    adapter = load_file(uri_to_path(final) / "adapter_model.safetensors")
    assert _max_diff(adapter, ref_adapter) <= 1e-6

    # Once more, finished: every stage is skipped, so the run lasts seconds. With its own temporary
    # Prefect server and Prefect's defaults left to the CLI, this is the run that used to end in
    # ~150 lines of CancelledError tracebacks after the summary.
    ephemeral = {
        k: v
        for k, v in env.items()
        if k
        not in (
            "PREFECT_API_URL",
            "PREFECT_SERVER_ANALYTICS_ENABLED",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
        )
    }
    ephemeral.update(PREFECT_HOME=str(ws.parent / "prefect-home"), PREFECT_LOGGING_LEVEL="INFO")
    again = subprocess.run(cmd, capture_output=True, text=True, env=ephemeral, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary  # the summary is the last line
    assert "Traceback" not in again.stdout + again.stderr, again.stderr[-3000:]
    for stage in ("dpo_data", "dpo", "introspection", "sft"):
        assert f"{stage}: skipped: finished at " in again.stderr, stage
    assert "eval: skipped: --no-eval" in again.stderr


@pytest.mark.slow
def test_killed_during_sft_resumes_from_the_last_save(tmp_path_factory, models_dir, reference):
    _, ref_adapter, ref_counts = reference
    cfg = _cfg(_ws(tmp_path_factory, models_dir, "sft-crash"), "sft-crash")
    run_dir = cfg.build_dir() / "sft"
    kill_when(
        [sys.executable, "-c", DRIVER, cfg.model_dump_json()],
        lambda: _lines(run_dir / "metrics.jsonl") >= 3,
        Path(cfg.workdir) / "sft-crash.log",
        _child_env(),
    )
    before_metrics, before_saves = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "checkpoints.jsonl")
    assert before_saves and not before_saves[-1].get("final")  # killed in the middle of SFT
    assert "sft" not in read_record(cfg)["stages"]

    counts = _run_counted(cfg)
    saved = _assert_resumed_training(run_dir, before_metrics, before_saves)
    total = read_jsonl(run_dir / "metrics.jsonl")[-1]["total"]
    # only the SFT steps after the last save ran: no sampling, no DPO, no reference log-probs
    assert counts == {"forward_backward": total - saved, "optim_step": total - saved}
    assert ref_counts["forward_backward"] == total
    assert _max_diff(_final_adapter(cfg), ref_adapter) <= 1e-6


# -- 3. fatal errors ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_fatal_error_fails_at_once_and_leaves_only_complete_files(
    prefect_harness, tmp_path_factory, models_dir, monkeypatch
):
    """A fatal backend error at DPO step 5: neither the loop nor Prefect tries again."""
    from flows.sequential import sequential

    message = "Tinker rejected the API key (401) while training: set TINKER_API_KEY to a valid key"
    calls = {"optim_step": 0, "dpo_stage": 0}
    real_service, real_dpo = pipeline._service, pipeline.stage_dpo

    class FatalAtStep5:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def optim_step(self, params):
            calls["optim_step"] += 1
            if calls["optim_step"] == 5:
                raise BackendFatalError(message)
            return self._inner.optim_step(params)

    def service(c):
        svc = real_service(c)
        make = svc.create_lora_training_client
        svc.create_lora_training_client = lambda *a, **k: FatalAtStep5(make(*a, **k))
        return svc

    def stage_dpo(*a, **k):
        calls["dpo_stage"] += 1
        return real_dpo(*a, **k)

    monkeypatch.setattr(pipeline, "_service", service)
    monkeypatch.setattr(pipeline, "stage_dpo", stage_dpo)
    cfg = _cfg(_ws(tmp_path_factory, models_dir, "fatal"), "fatal")
    state = sequential(cfg, return_state=True)
    assert state.is_failed()
    assert message in state.message and "\n" not in message
    with pytest.raises(BackendFatalError, match="rejected the API key"):
        state.result()
    assert calls == {"optim_step": 5, "dpo_stage": 1}  # no retry anywhere
    # nothing half-written: no stage recorded for DPO, no temp files, every recorded state complete
    assert set(read_record(cfg)["stages"]) == {"dpo_data"}
    ws = Path(cfg.workdir)
    assert not [p for p in ws.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    run_dir = cfg.build_dir() / "dpo"
    assert _steps(run_dir / "metrics.jsonl") == [1, 2, 3, 4]
    saves = read_jsonl(run_dir / "checkpoints.jsonl")
    assert [s["step"] for s in saves] == [2, 4]
    for s in saves:
        folder = uri_to_path(s["state"])
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "character_state.json"} <= {
            p.name for p in folder.iterdir()
        }
    assert not list(ws.glob("checkpoints/*/sampler_weights"))


@pytest.mark.slow
def test_a_fatal_error_through_the_cli_is_one_line_with_no_retry(prefect_harness, tmp_path):
    """Tinker refusing the connection (a closed local port: nothing leaves the machine) is fatal."""
    from prefect.settings import PREFECT_API_URL

    ws = tmp_path / "ws"
    env = _child_env(
        PREFECT_API_URL=PREFECT_API_URL.value(),
        PREFECT_LOGGING_LEVEL="INFO",
        TINKER_API_KEY=FAKE_KEY,
        TINKER_BASE_URL="http://127.0.0.1:9",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "character.cli",
            "pipeline",
            "pirate",
            "--backend",
            "tinker",
            "--workdir",
            str(ws),
            "--build-id",
            "fatal",
            "--no-eval",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("error: cannot connect to Tinker at http://127.0.0.1:9")
    assert "Traceback" not in proc.stderr and "Retry" not in proc.stderr  # one attempt, no stack dump
    assert FAKE_KEY not in proc.stderr + proc.stdout
    assert not [p for p in ws.rglob("*") if p.is_file()]  # nothing written


# -- 5. secrets ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_tinker_key_appears_in_no_log_artifact_record_or_parameter(faulty_prefect_run):
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    cfg, state, _, records = faulty_prefect_run
    assert state.is_completed(), state.message
    assert len(records) > 50  # the run was logged, down to DEBUG
    assert not [r for r in records if FAKE_KEY in r]

    async def stored() -> str:
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
            logs = await client.read_logs()
            artifacts = await client.read_artifacts()
            tasks = await client.read_task_runs()
        assert run.parameters["config"]["persona"] == "pirate" and logs and artifacts
        return json.dumps(
            [
                run.model_dump(mode="json"),
                [x.model_dump(mode="json") for x in logs],
                [a.model_dump(mode="json") for a in artifacts],
                [t.model_dump(mode="json") for t in tasks],
            ]
        )

    import asyncio

    assert FAKE_KEY not in asyncio.run(stored())
    # and byte for byte: the Prefect database, the results store and every file of the build's workspace
    db = get_current_settings().server.database.connection_url.get_secret_value().split("///")[-1]
    places = [Path(db), Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]), Path(cfg.workdir)]
    files = [
        p
        for place in places
        for p in ([place] if place.is_file() else place.rglob("*"))
        if p.is_file() and not p.is_symlink()
    ]
    assert any(p.name == "record.json" for p in files) and any(p.suffix == ".db" for p in files)
    assert not [p for p in files if FAKE_KEY.encode() in p.read_bytes()]


# -- 6. atomicity ----------------------------------------------------------------------------------
class Boom(OSError):
    pass


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    import character.storage as storage

    target = tmp_path / "record.json"
    storage.write_json_atomic(target, {"good": True})
    good = target.read_bytes()

    # the write itself stops half way (disk full)
    real_open = open

    class HalfWriter:
        def __init__(self, f):
            self._f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def write(self, text):
            self._f.write(text[: len(text) // 2])
            raise Boom(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(storage, "open", lambda *a, **k: HalfWriter(real_open(*a, **k)), raising=False)
    with pytest.raises(storage.DiskFull):  # a full disk is told in one line
        storage.write_json_atomic(target, {"good": False, "pad": "x" * 10000})
    monkeypatch.undo()
    assert target.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]

    # the rename fails
    def failing_replace(src, dst):
        raise Boom(5, "I/O error")

    monkeypatch.setattr(storage.os, "replace", failing_replace)
    with pytest.raises(Boom):
        storage.write_json_atomic(target, {"good": False})
    monkeypatch.undo()
    assert target.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_an_interrupted_record_or_dataset_rewrite_keeps_the_previous_one(tmp_path, monkeypatch):
    import character.storage as storage
    from character.datagen.engine import Ledger

    cfg = PipelineConfig(persona="pirate", workdir=str(tmp_path), build_id="atomic")
    record_stage(cfg, "dpo_data", {"path": "data/train/dpo.jsonl", "rows": 3})
    record = (cfg.build_dir() / "record.json").read_bytes()
    out = tmp_path / "dpo.jsonl"
    ledger = Ledger(out, key=lambda r: str(r["meta"]["index"]))
    ledger.commit([{"meta": {"index": i}, "text": "x" * 100} for i in (2, 0, 1)], [])
    dataset = out.read_bytes()

    def failing_replace(src, dst):
        raise Boom(5, "I/O error")

    monkeypatch.setattr(storage.os, "replace", failing_replace)
    with pytest.raises(Boom):
        record_stage(cfg, "dpo", {"sampler": "file:///x", "state": "file:///y", "steps": 1})
    with pytest.raises(Boom):
        ledger.finish(order=lambda r: r["meta"]["index"])  # the sorted rewrite
    monkeypatch.undo()
    assert (cfg.build_dir() / "record.json").read_bytes() == record
    assert json.loads(record)["stages"].keys() == {"dpo_data"}
    assert out.read_bytes() == dataset
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]


def test_a_torn_append_loses_only_the_unfinished_row(tmp_path):
    from character.storage import append_jsonl

    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, [{"step": 1}, {"step": 2}])
    with open(path, "ab") as f:  # a crash in the middle of appending row 3
        f.write(b'{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    append_jsonl(path, {"step": 3})
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_an_interrupted_checkpoint_save_leaves_no_checkpoint(workdir, monkeypatch):
    """save_state dies while writing the optimizer state: no folder, no temp files; the old one stays."""
    import character.backend.local as local
    import character.storage as storage
    from character.backend.local import LocalService
    from character.settings import Workspace

    svc = LocalService(Workspace(workdir), device="cpu", seed=0)
    client = svc.create_lora_training_client("tiny", rank=4, seed=0)
    good = uri_to_path(client.save_state("step-000002").result().path)
    files = {p.name: p.read_bytes() for p in good.iterdir()}
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:100])  # truncated
        raise Boom(28, "No space left on device")

    monkeypatch.setattr(local.torch, "save", dying_save)
    with pytest.raises(storage.DiskFull):  # a full disk is told in one line
        client.save_state("step-000004")
    with pytest.raises(storage.DiskFull):  # a full disk is told in one line
        client.save_state("step-000002")  # over an existing one
    monkeypatch.undo()
    weights = good.parent
    assert sorted(p.name for p in weights.iterdir()) == ["step-000002"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == files

    # a rename that fails half way through replacing a folder puts the old one back
    real_replace = os.replace

    def moving_the_new_folder_in_fails(src, dst):  # after the old folder was moved aside
        if str(src).endswith(".tmp") and Path(dst) == good:
            raise Boom(5, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", moving_the_new_folder_in_fails)
    with pytest.raises(Boom):
        client.save_state("step-000002")
    monkeypatch.undo()
    assert sorted(p.name for p in weights.iterdir()) == ["step-000002"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == files


KILLED_WRITER = """
import sys
from character.storage import append_jsonl, write_json_atomic
target, log = sys.argv[1], sys.argv[2]
i = 0
while True:
    i += 1
    write_json_atomic(target, {"version": i, "pad": str(i) * 200000})
    append_jsonl(log, {"version": i, "pad": "y" * 50000})
"""


def test_sigkill_during_writes_never_leaves_a_truncated_file(tmp_path):
    for attempt in range(4):
        target, log = tmp_path / f"record-{attempt}.json", tmp_path / f"log-{attempt}.jsonl"
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, str(target), str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while _lines(log) < 3 + attempt and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rec = json.loads(target.read_text())  # whole, never torn
        assert rec["pad"] == str(rec["version"]) * 200000
        rows = read_jsonl(log)
        assert [r["version"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 3 + attempt
        assert rec["version"] in (len(rows), len(rows) + 1)
