"""Ctrl-C and SIGTERM during `character merge` and `character fold` (issue 24): the same one-line stop
as a build, and nothing half-written: the output folder appears only when complete (one rename), so a
stopped command leaves no output and no temp folder, and running it again writes the whole output.

On the tiny model both commands finish within a second of loading torch, too soon to signal reliably, so
the command runs through a small launcher that makes each tensor write take 0.3 s (and says when the
first one starts): everything else is the real CLI, its signal handling and its atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adapters import make_adapter
from safetensors.torch import load_file

from character.backend.tiny import tiny_model_path

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups and /proc")

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

# Runs `character <args>` with every tensor write slowed; prints WRITING on stderr at the first one.
LAUNCHER = """
import sys, time
from character.weights import safetensors_io
real, said = safetensors_io.StreamingSafetensorsWriter.write, []
def slow(self, name, tensor):
    if not said:
        said.append(1)
        print("WRITING", file=sys.stderr, flush=True)
    time.sleep(0.3)
    return real(self, name, tensor)
safetensors_io.StreamingSafetensorsWriter.write = slow
sys.argv = ["character", *sys.argv[1:]]
from character.cli import main
main()
"""


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, models_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(models_dir))
    root = tmp_path_factory.mktemp("interrupt-weights")
    return make_adapter(base, root / "dpo", seed=1), make_adapter(base, root / "sft", seed=2)


def _stop(args: list[str], sig: int, env: dict, log: Path) -> dict:
    """Run the launcher in its own process group; signal the group once the first tensor is written."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, *args], stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True
        )
    deadline = time.monotonic() + 120
    try:
        while b"WRITING" not in log.read_bytes():
            assert proc.poll() is None, f"exited before the signal:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "it never started writing"
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        t = time.monotonic()
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"rc": proc.returncode, "took": took, "out": out.decode(), "err": log.read_text()}


def _assert_stopped(run: dict, sig: int, command: str, output: Path) -> None:
    assert run["rc"] == 128 + sig, run["err"][-3000:]
    assert run["took"] < 10, run["took"]
    assert "Traceback" not in run["out"] + run["err"], run["err"][-3000:]
    lines = [ln for ln in run["err"].splitlines() if ln.startswith("stopped:")]
    assert len(lines) == 1 and run["err"].rstrip("\n").endswith(lines[0]), run["err"][-3000:]
    assert lines[0].startswith(f"stopped: {command} ({NAMES[sig]}); run again with: "), lines[0]
    assert not output.exists(), "a stopped command left a partial output"
    assert not [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")], "temp left"


@pytest.mark.parametrize(
    "command,sig",
    [("merge", signal.SIGINT), ("merge", signal.SIGTERM), ("fold", signal.SIGINT), ("fold", signal.SIGTERM)],
)
def test_a_stopped_merge_or_fold_leaves_no_partial_output_and_runs_again(command, sig, adapters, models_dir, tmp_path):
    dpo, sft = adapters
    out = tmp_path / "out"
    args = [command, str(dpo), str(sft)] if command == "merge" else [command, str(dpo), "--base-model", "tiny"]
    args += ["--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHARACTER_MODEL_CACHE": str(models_dir)}
    if command == "fold":
        args += ["--workdir", str(tmp_path / "ws")]
    _assert_stopped(_stop(args, sig, env, tmp_path / "err.log"), sig, command, out)

    again = subprocess.run([sys.executable, "-m", "character.cli", *args], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    weights = "adapter_model.safetensors" if command == "merge" else "model.safetensors"
    if command == "fold" and not (out / weights).exists():  # sharded like its base
        weights = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].popitem()[1]
    assert load_file(str(out / weights))  # the whole output, loading back
