"""Ctrl-C and SIGTERM sent to a command's whole process group, as a terminal, `timeout`, systemd or a
container runtime sends them: the command stops within seconds with one line naming the resume
command, exit 130 or 143, no traceback, no process left behind, the Prefect flow run marked; the
printed command then finishes the build with exactly the adapter of an uninterrupted one.

One build is stopped four times: by SIGINT and by SIGTERM, each during data generation and during DPO
training, with the CLI's temporary Prefect server and against a running one (the test session's),
which must keep running; each time the next run is the command the line printed. Torch runs on one
thread here and in the children, so the same steps give the same bits.
"""

from __future__ import annotations

import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from signals import signalled

from character.build.direct import run_sequential
from character.build.record import read_record
from character.config import PipelineConfig
from character.storage import uri_to_path

SMALL = dict(
    persona="pirate",
    dpo_pairs=12,
    reflections=4,
    interactions=2,
    turns=2,
    max_new_tokens=64,
    max_in_flight=4,
    evaluate=False,
    dpo={"batch_size": 2, "save_every": 2},
    sft={"batch_size": 2, "save_every": 2},
)
CLI_SMALL = (
    "--dpo-pairs 12 --reflections 4 --interactions 2 --turns 2 --max-new-tokens 64 --max-in-flight 4 "
    "--batch-size 2 --save-every 2 --no-eval"
).split()
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")]


def _ws(tmp_path_factory, models_dir, name: str) -> Path:
    ws = tmp_path_factory.mktemp(name) / "ws"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    return ws


def _final_adapter(cfg: PipelineConfig) -> dict[str, torch.Tensor]:
    return load_file(uri_to_path(read_record(cfg)["stages"]["sft"]["sampler"]) / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models_dir):
    """The final adapter of the same build, uninterrupted (in this process, without Prefect)."""
    cfg = PipelineConfig(workdir=str(_ws(tmp_path_factory, models_dir, "reference")), build_id="ref", **SMALL)
    run_sequential(cfg)
    return _final_adapter(cfg)


# -- watching a command from outside --------------------------------------------------------------
def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (the temporary server and its watchdog run in sessions of their own)."""
    parents = {int(e): _parent(int(e)) for e in os.listdir("/proc") if e.isdigit()}
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _env(prefect_home: Path, api_url: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(OMP_NUM_THREADS="1", PREFECT_LOGGING_LEVEL="WARNING", PREFECT_HOME=str(prefect_home))
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def interrupt_when(cmd: list[str], ready, sig: int, env: dict, log: Path, timeout: float = 300) -> dict:
    """Start `cmd` in its own process group, send `sig` to the whole group once `ready(pid)` holds; the
    exit status, seconds from the signal to the exit, both streams and the processes it had started."""
    with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
    started: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while not ready(proc.pid):
            started |= _descendants(proc.pid)
            assert proc.poll() is None, f"exited before the signal:\n{log.with_suffix('.err').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the moment for the signal never came"
            time.sleep(0.02)
        started |= _descendants(proc.pid)
        os.killpg(proc.pid, sig)
        sent = time.monotonic()
        rc = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return dict(
        rc=rc,
        took=took,
        pgid=proc.pid,
        started=started,
        out=log.with_suffix(".out").read_text(),
        err=log.with_suffix(".err").read_text(),
    )


def assert_stopped(run: dict, sig: int, what: str) -> list[str]:
    """The contract of a stop: status, time, one line, no traceback, nothing left running. Returns the
    command the line prints."""
    assert run["rc"] == 128 + sig, run["err"][-3000:]
    assert run["took"] < 10, f"{run['took']:.1f} s from the signal to the exit"
    assert "Traceback" not in run["out"] + run["err"], run["err"][-3000:]
    lines = [ln for ln in run["err"].splitlines() if ln.startswith("stopped:")]
    assert len(lines) == 1 and run["err"].rstrip("\n").endswith(lines[0]), run["err"][-3000:]
    prefix = f"stopped: {what} ({NAMES[sig]}); "
    assert lines[0].startswith(prefix), lines[0]
    verb, command = lines[0][len(prefix) :].split(": ", 1)
    assert verb in ("resume with", "run again with")
    assert not _group_alive(run["pgid"]), "a process of the command's group outlived it"
    deadline = time.monotonic() + 5  # the temporary server's watchdog notices its parent's exit within 0.5 s
    while any(_alive(p) for p in run["started"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in run["started"] if _alive(p)], "a process the command started outlived it"
    return shlex.split(command)


# -- where Prefect records a flow run's end ------------------------------------------------------
def _last_flow_run_state_in_home(prefect_home: Path) -> str:
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return db.execute("SELECT state_type FROM flow_run ORDER BY created DESC LIMIT 1").fetchone()[0]


def _last_flow_run_state_on_server(build_id: str) -> str:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        runs = [
            r
            for r in client.read_flow_runs(limit=200)
            if (r.parameters.get("config") or {}).get("build_id") == build_id
        ]
    return max(runs, key=lambda r: r.created).state.type.value


# -- one build stopped four times, then finished ---------------------------------------------------
def _lines(*paths: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in paths if p.is_file())


@pytest.mark.slow
def test_signals_to_the_group_stop_a_build_and_the_printed_command_finishes_it(
    prefect_harness, tmp_path_factory, models_dir, reference
):
    """SIGINT and SIGTERM, each during data generation and during DPO, with the CLI's temporary server
    and with a running one; the fifth run, the command the fourth printed, finishes the build."""
    from prefect.settings import PREFECT_API_URL

    ws = _ws(tmp_path_factory, models_dir, "stopped")
    home = ws.parent / "prefect-home"
    temporary, running = _env(home, None), _env(home, PREFECT_API_URL.value())
    cmd = [sys.executable, "-m", "character.cli", "pipeline", "pirate", "--workdir", str(ws), *CLI_SMALL]

    # 1. Ctrl-C during data generation, no --build-id given: the line adds the build's (a timestamp)
    run = interrupt_when(
        cmd, lambda _: _lines(*(ws / "builds").glob("*/*/data/dpo.jsonl*")) > 0, signal.SIGINT, temporary, ws / "1"
    )
    build = next((ws / "builds").glob("*/*/data/dpo.jsonl*")).parents[1]
    cfg = PipelineConfig(workdir=str(ws), build_id=build.name, **SMALL)
    data = [build / "data" / "dpo.jsonl", build / "data" / "dpo.jsonl.skipped.jsonl"]
    metrics = build / "dpo" / "metrics.jsonl"
    resume = assert_stopped(run, signal.SIGINT, f"build pirate/{build.name} during dpo_data")
    assert resume == [*cmd, "--build-id", build.name]
    assert _last_flow_run_state_in_home(home) in ("CRASHED", "CANCELLED")

    # 2. SIGTERM, against a running server, once more pairs are written
    done = _lines(*data)
    run = interrupt_when(resume, lambda _: _lines(*data) > done, signal.SIGTERM, running, ws / "2")
    assert assert_stopped(run, signal.SIGTERM, f"build pirate/{build.name} during dpo_data") == resume
    assert _last_flow_run_state_on_server(build.name) in ("CRASHED", "CANCELLED")
    assert "dpo_data" not in read_record(cfg).get("stages", {}) and 0 < _lines(*data) < 12

    # 3. Ctrl-C during DPO, after its first save (every 2 steps), still against the running server
    run = interrupt_when(resume, lambda _: _lines(metrics) >= 3, signal.SIGINT, running, ws / "3")
    assert assert_stopped(run, signal.SIGINT, f"build pirate/{build.name} during dpo") == resume
    assert _last_flow_run_state_on_server(build.name) in ("CRASHED", "CANCELLED")
    assert httpx.get(f"{PREFECT_API_URL.value()}/health", timeout=10).status_code == 200  # left running

    # 4. SIGTERM during DPO with a temporary server, two steps further on
    done = _lines(metrics)
    run = interrupt_when(resume, lambda _: _lines(metrics) >= done + 2, signal.SIGTERM, temporary, ws / "4")
    assert assert_stopped(run, signal.SIGTERM, f"build pirate/{build.name} during dpo") == resume
    assert _last_flow_run_state_in_home(home) in ("CRASHED", "CANCELLED")
    stages = read_record(cfg)["stages"]
    assert "dpo_data" in stages and "dpo" not in stages

    # 5. the printed command: the build finishes where it stopped, with the uninterrupted adapter
    finished = subprocess.run(resume, capture_output=True, text=True, env=running, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "Traceback" not in finished.stdout + finished.stderr
    assert _last_flow_run_state_on_server(build.name) == "COMPLETED"
    adapter = _final_adapter(cfg)
    assert adapter.keys() == reference.keys()
    assert max((adapter[k] - reference[k]).abs().max().item() for k in adapter) <= 1e-6


# -- the other commands ---------------------------------------------------------------------------
def _loaded_torch(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch_cpu" in f.read()
    except OSError:
        return False


@pytest.mark.slow
def test_generate_stopped_by_sigterm_names_its_resume_command(workdir, tmp_path):
    cmd = [sys.executable, "-m", "character.cli", "generate", "dpo", "pirate", "--workdir", str(workdir)]
    cmd += ["--build-id", "g1", "--dpo-pairs", "16", "--max-in-flight", "4", "--max-new-tokens", "64"]
    data = workdir / "builds" / "pirate" / "g1" / "data"
    run = interrupt_when(
        cmd, lambda _: _lines(*data.glob("dpo.jsonl*")) > 0, signal.SIGTERM, _env(tmp_path, None), tmp_path / "g"
    )
    assert assert_stopped(run, signal.SIGTERM, "generate dpo pirate/g1 during dpo_data") == cmd
    assert all(line.endswith("}") for line in (data / "dpo.jsonl").read_text().splitlines())  # whole rows only


@pytest.mark.slow
def test_sample_stopped_by_ctrl_c_says_how_to_run_it_again(workdir, tmp_path):
    cmd = [sys.executable, "-m", "character.cli", "sample", "tiny", "--prompt", "Tell me about the sea."]
    cmd += ["-n", "256", "--max-new-tokens", "96", "--workdir", str(workdir)]
    started = []

    def ready(pid: int) -> bool:  # a second after torch is loaded: loading the model, or sampling
        if not started and _loaded_torch(pid):
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > 1.0

    run = interrupt_when(cmd, ready, signal.SIGINT, _env(tmp_path, None), tmp_path / "s")
    assert run["out"] == ""
    assert assert_stopped(run, signal.SIGINT, "sample") == cmd


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_chat_leaves_quietly_on_ctrl_c_and_stops_on_sigterm(sig, workdir, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "character.cli", "chat", "tiny", "--max-new-tokens", "32", "--workdir", str(workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(tmp_path, None),
        start_new_session=True,
    )
    try:
        proc.stdin.write(b"Hello\n")
        proc.stdin.flush()
        assert proc.stdout.readline()  # the answer: now it waits for the next line
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert b"Traceback" not in out + err, err.decode()[-3000:]
    if sig == signal.SIGINT:  # as /exit: status 0, nothing on stderr
        assert proc.returncode == 0 and err.decode().strip() == ""
    else:
        assert proc.returncode == 143
        assert err.decode().strip().splitlines()[-1].startswith("stopped: chat (SIGTERM); run again with: ")


SLOW_STOP = """
import time
from character.commands import interrupt
interrupt.install()
interrupt.describe("build pirate/b1", ["pipeline", "pirate", "--build-id", "b1"])
try:
    print("working", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    print("stopping", flush=True)
    time.sleep(60)  # a stop that hangs (a server that no longer answers)
"""


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_while_stopping_exits_at_once(second, tmp_path):
    steps = [(b"working\n", signal.SIGINT), (b"stopping\n", second)]
    returncode, took, out, err = signalled([SLOW_STOP], _env(tmp_path, None), steps)
    assert returncode == 130 and took < 2  # the first signal gives the status
    assert b"Traceback" not in out + err
    assert err.decode().splitlines() == [
        f"stopped: build pirate/b1 ({NAMES[second]}, at once); resume with: "
        f"{shlex.quote(sys.executable)} -m character.cli pipeline pirate --build-id b1"
    ]


SWALLOWED = """
import contextlib, sys, time
from character.commands import interrupt
interrupt.install()

class Closing:
    def __del__(self):  # Python ignores what a __del__ raises (an import's weakref callback, too)
        print("closing", flush=True)
        time.sleep(30)

if sys.argv[1] == "flow":  # while a flow runs, Prefect's own SIGTERM handler is the one installed
    from prefect.utilities.engine import capture_sigterm
    during = capture_sigterm()
else:
    during = contextlib.nullcontext()
try:
    with during:
        obj = Closing()
        del obj
        print("went on", flush=True)
        time.sleep(30)
except KeyboardInterrupt:
    interrupt.exit()
"""


@pytest.mark.parametrize("during", ["command", "flow"])
def test_an_interrupt_that_lands_where_python_ignores_exceptions_still_stops(during, tmp_path):
    returncode, took, out, err = signalled([SWALLOWED, during], _env(tmp_path, None), [(b"closing\n", signal.SIGTERM)])
    assert returncode == 143 and took < 2  # not after the 30 s it would sleep on
    assert err.decode().splitlines() == [
        f"stopped: {during} (SIGTERM); run again with: {shlex.quote(sys.executable)} -m character.cli {during}"
    ]
