"""The command line's own lifecycle: bad flags refused before the heavy imports, and no temporary
Prefect server left behind by a killed command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

PROBE = """
import sys
from character.cli import main
sys.argv = ["character", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    heavy = sorted(m for m in ("torch", "transformers", "prefect", "tinker", "peft") if m in sys.modules)
    print("exit", e.code, "heavy", ",".join(heavy) or "-")
"""


@pytest.mark.parametrize(
    "args",
    [
        ["pipeline", "nosuchpersona"],
        ["pipeline", "pirate", "--scale", "huge"],
        ["pipeline", "pirate", "--dpo-pairs", "0"],
        ["pipeline", "pirate", "--batch-size", "0"],
        ["pipeline", "pirate", "--merge"],
        ["generate", "dpo", "nosuch"],
        ["generate", "banana", "pirate"],
        ["personas", "validate", "/no/such.json"],
        ["pipeline", "pirate", "--base-model", "/no/such/model"],
        ["pipeline", "pirate", "--teacher-model", "/no/such/model"],
    ],
)
def test_bad_flags_are_refused_before_torch_tinker_or_prefect_is_imported(tmp_path, args):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args, *(["--workdir", str(tmp_path)] if args[0] != "personas" else [])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "exit 2 heavy -", proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(entry))
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_cli_leaves_no_prefect_server_behind(workdir, tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "character.cli",
            "pipeline",
            "pirate",
            "--workdir",
            str(workdir),
            "--build-id",
            "killed",
            "--no-eval",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    server = None
    try:
        deadline = time.monotonic() + 300
        while server is None and time.monotonic() < deadline and cli.poll() is None:
            server = next((k for k in _children(cli.pid) if "uvicorn" in _cmdline(k)), None)
            time.sleep(0.2)
        assert server is not None, "the CLI never started its temporary Prefect server"
        time.sleep(1.0)  # let the start-up (and its watchdog) finish
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait()
    deadline = time.monotonic() + 30
    while "uvicorn" in _cmdline(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "uvicorn" not in _cmdline(server), f"Prefect server {server} outlived the killed CLI"


TWO_STARTS = """
import json, sys
from character.cli import PREFECT_DEFAULTS
import os
for k, v in PREFECT_DEFAULTS.items():
    os.environ.setdefault(k, v)
from flows.ephemeral import finish_ephemeral_api, start_ephemeral_api_early
ready = start_ephemeral_api_early()
from prefect import flow, task

@task
def one():
    return 1

@flow
def tiny_flow():
    return one() + one()

ready()
try:
    result = tiny_flow()
finally:
    finish_ephemeral_api()
print(json.dumps(result))
"""


@pytest.mark.slow
def test_two_first_starts_on_one_prefect_home_print_no_traceback(tmp_path):
    """Both start a temporary server on a fresh PREFECT_HOME at once (the SQLite migration race)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_LOGGING_LEVEL="INFO")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_STARTS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == "2"
        assert "Traceback" not in out + err and "OperationalError" not in err, err[-3000:]
