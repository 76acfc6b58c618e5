"""The loopback service (`character tinker loopback`) in a subprocess, and what tests run against it: the
environment a command needs to reach it with the real SDK, a finished command's JSON result, a training
state's LoRA tensors read from the service's disk, and a test workspace with the test session's models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

KEY = "tml-loopback-e2e-secret-5f3a9c"
MODEL = "loopback/tiny"
SMALL = [
    *("--dpo-pairs", "8", "--reflections", "2", "--interactions", "1", "--turns", "2"),
    *("--max-new-tokens", "64", "--batch-size", "2", "--save-every", "1", "--no-eval", "--json"),
]


class Service:
    """`character tinker loopback` in a subprocess this test started (and stops, by its pid)."""

    def __init__(self, state: Path, workdir: Path, hub: Path, *args: str, port: int = 0):
        env = {**os.environ, "CHARACTER_WORKDIR": str(workdir), "HF_HUB_CACHE": str(hub)}
        cmd = [sys.executable, "-m", "character.cli", "tinker", "loopback", "--state", str(state), "--port", str(port)]
        self.args = (state, workdir, hub, *args)
        self.proc = subprocess.Popen(
            [*cmd, "--model", MODEL, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline()
        assert line.startswith("Tinker loopback at "), line + self.proc.stderr.read()
        self.url = line.split()[3]
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stdout, self.stderr = self.proc.stdout.read(), self.proc.stderr.read()

    def restart(self) -> "Service":
        self.kill()
        return Service(*self.args, port=self.port)


def loopback_env(url: str, hub: Path, prefect_home: Path, **extra: str) -> dict:
    """This process's environment for a command that uses the service at `url` with the real SDK (its
    tokenizers from the Hub cache `hub`, offline) and a Prefect of its own in `prefect_home`; `extra` last."""
    env = {
        **os.environ,
        "TINKER_BASE_URL": url,
        "TINKER_API_KEY": KEY,
        "HF_HUB_OFFLINE": "1",  # the SDK's sampling client looks up the tokenizer by name in the Hub cache
        "HF_HUB_CACHE": str(hub),
        "PREFECT_HOME": str(prefect_home),
        "CHARACTER_TINKER_TIMEOUT_S": "60",
        **extra,
    }
    env.pop("PREFECT_API_URL", None)
    return env


def finish(proc, timeout: float = 900) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return {"result": json.loads(out.strip().splitlines()[-1]), "stdout": out, "stderr": err}


def adapter(state_dir: Path, tinker_path: str) -> dict:
    """The LoRA tensors of a training state, read from the service's disk."""
    run, _, name = tinker_path.removeprefix("tinker://").split("/")
    tensors = load_file(str(state_dir / "checkpoints" / run / "weights" / name / "adapter_model.safetensors"))
    return {k: v for k, v in tensors.items() if ".lora_" in k}


def loopback_space(tmp_path_factory, models_dir, name: str) -> Path:
    """A folder with a workspace `ws` whose models are the test session's, and an empty Hub cache `hub`."""
    root = tmp_path_factory.mktemp(name)
    (root / "ws").mkdir()
    (root / "ws" / "models").symlink_to(models_dir, target_is_directory=True)
    (root / "hub").mkdir()
    return root
