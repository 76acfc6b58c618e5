"""The CPU thread setting: `--threads N` over CHARACTER_THREADS over a default that leaves busy cores alone,
applied to torch, recorded in the build; and whether the count changes what training computes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from character import settings as settings_module
from character.settings import apply_threads, default_threads


def cli(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "character.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING", **env},
    )


@pytest.fixture
def torch_threads(monkeypatch):
    """apply_threads changes the process's torch and its OMP/MKL variables: put them back afterwards."""
    import torch

    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    yield torch
    torch.set_num_threads(before)


def test_the_default_leaves_the_cores_other_processes_keep_busy(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(settings_module, "_cgroup_cpus", lambda: None)
    for load, threads in ((0.0, 4), (1.4, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert default_threads() == threads, load
    monkeypatch.setattr(settings_module, "_cgroup_cpus", lambda: 2)  # a container's CPU quota
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins over the guess
    assert default_threads() == 3


def test_apply_threads_sets_torch_before_and_after_it_is_imported(torch_threads):
    assert apply_threads(2) == 2 and torch_threads.get_num_threads() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2"
    code = (
        "from character.settings import apply_threads; apply_threads(1); import torch; print(torch.get_num_threads())"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert child.stdout.strip() == "1", child.stderr


def test_bad_thread_counts_are_one_line():
    for args, env, needle in (
        (["pipeline", "sarcastic", "--threads", "0"], {}, "--threads: Input should be greater than or equal to 1"),
        (["pipeline", "sarcastic"], {"CHARACTER_THREADS": "many"}, "CHARACTER_THREADS='many'"),
    ):
        proc = cli(*args, **env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr


def test_the_build_records_the_thread_count_the_flag_winning_over_the_variable(workdir):
    proc = cli(
        "generate", "dpo", "sarcastic", "--workdir", workdir, "--build-id", "t1", "--dpo-pairs", "4", "--threads", "1",
        CHARACTER_THREADS="2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((workdir / "builds" / "sarcastic" / "t1" / "record.json").read_text())
    assert record["config"]["threads"] == 1


def test_the_variable_and_the_default_reach_the_config(workdir, monkeypatch, torch_threads):
    from character.commands.build import _config

    monkeypatch.setenv("CHARACTER_THREADS", "3")
    assert _config(workdir, persona="sarcastic").threads == 3 == torch_threads.get_num_threads()
    monkeypatch.delenv("CHARACTER_THREADS")
    assert _config(workdir, persona="sarcastic").threads == default_threads()


def _train(workdir, threads: int, steps: int = 3):
    """A few SFT steps of the tiny model's LoRA on the local backend with `threads` CPU threads."""
    from tinker import types

    from character.backend.local import LocalService
    from character.settings import Workspace
    from character.train.renderer import Renderer, to_datum

    apply_threads(threads)
    service = LocalService(Workspace(workdir), device="cpu", seed=0)
    r = Renderer(service.get_tokenizer("tiny"))
    data = []
    for i in range(8):
        conv = [
            {"role": "user", "content": f"Tell me about thing {i}."},
            {"role": "assistant", "content": f"Thing {i} is fine."},
        ]
        data.append(to_datum(*r.training_tokens(conv)))
    client = service.create_lora_training_client("tiny", rank=8)
    losses = []
    for _ in range(steps):
        out = client.forward_backward(data, "cross_entropy").result()
        losses.append(float(out.metrics["loss:sum"]))
        client.optim_step(types.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.98, eps=1e-8)).result()
    return losses, {k: v.detach().clone() for k, v in client.model.named_parameters() if "lora_" in k}


def test_the_thread_count_changes_training_on_cpu_only_at_float_rounding(workdir, torch_threads):
    """What README says: one and two threads train to the same weights within float rounding (sums are
    split differently across threads, so the last bits may differ); a build may change --threads on resume."""
    one_loss, one = _train(workdir, 1)
    two_loss, two = _train(workdir, 2)
    assert torch_threads.get_num_threads() == 2
    scale = max(float(one[k].abs().max()) for k in one)
    diffs = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    off = float((diffs > 1e-3 * scale).float().mean())
    print(
        f"threads 1 vs 2: losses {one_loss} vs {two_loss}; max |dW| {float(diffs.max()):.3g} of max |W| "
        f"{scale:.3g}; share of weights off by more than 1e-3 of it: {off:.2g}"
    )
    assert one.keys() == two.keys() and scale > 0
    # Adam's first steps are about lr x sign(g): where a gradient is float noise (LoRA A after B's first step,
    # the written heads' saturated query and key) rounding flips the sign, so a few weights differ by up to
    # a step per step (lr 1e-2, 3 steps); the rest within 1e-3 of the weights' scale
    assert float(diffs.max()) <= 2 * 3 * 1e-2 and off < 0.01
    # the first loss is the same sums split differently; later ones come after those few flipped steps
    assert abs(one_loss[0] - two_loss[0]) <= 1e-6 * abs(one_loss[0])
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(one_loss, two_loss))
