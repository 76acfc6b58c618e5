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
from pathlib import Path

import pytest
from adapters import make_adapter
from safetensors.torch import load_file
from signals import signalled

from character.backend.tiny import tiny_model_path

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups and /proc")

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

# Runs `character <args>` with every tensor write slowed; prints WRITING on stdout at the first one.
LAUNCHER = """
import sys, time
from character.weights import safetensors_io
real, said = safetensors_io.StreamingSafetensorsWriter.write, []
def slow(self, name, tensor):
    if not said:
        said.append(1)
        print("WRITING", flush=True)
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
    rc, took, stdout, stderr = signalled([LAUNCHER, *args], env, [(b"WRITING\n", sig)])
    run = {"rc": rc, "took": took, "out": stdout.decode(), "err": stderr.decode()}
    _assert_stopped(run, sig, command, out)

    again = subprocess.run([sys.executable, "-m", "character.cli", *args], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    weights = "adapter_model.safetensors" if command == "merge" else "model.safetensors"
    if command == "fold" and not (out / weights).exists():  # sharded like its base
        weights = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].popitem()[1]
    assert load_file(str(out / weights))  # the whole output, loading back
