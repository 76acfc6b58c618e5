"""The benchmark machinery measures what it claims: like-for-like sides, a table that reads back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_latency_backend_runs_both_loops_to_the_same_adapter(workdir, one_thread, tmp_path):
    """Our loop and the naive loop send the same calls and train the same adapter; only waiting differs."""
    from benchmarks.data import workspace
    from benchmarks.pipelining import max_difference, naive, ours

    a = ours(str(workdir), latency=0.0, pairs=4)
    b = naive(str(workspace(tmp_path / "naive", workdir / "models")), latency=0.0, pairs=4)
    assert a["calls"] == b["calls"] == 2 * 4 + 2 + 2 * 1 + 2  # ref log-probs, clients, one step, two saves
    assert max_difference(a["adapter"], b["adapter"]) == 0.0


def test_remote_answers_in_order_after_the_round_trip():
    import time

    from benchmarks.pipelining import _Remote

    remote = _Remote(latency=0.05)
    t0 = time.perf_counter()
    futures = [remote.submit(lambda i=i: i) for i in range(5)]
    assert [f.result() for f in futures] == list(range(5))
    assert time.perf_counter() - t0 >= 0.05  # at least one round trip, overlapped for all five


@pytest.mark.slow
def test_runner_writes_the_table(tmp_path, models_dir):
    work = tmp_path / "bench"
    work.mkdir()
    (work / "models").symlink_to(models_dir, target_is_directory=True)
    out = tmp_path / "B.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--only",
            "sampling",
            "--repeats",
            "1",
            "--workdir",
            str(work),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "Machine:" in text and "python -m benchmarks --only sampling --repeats 1" in text
    row = next(line for line in text.splitlines() if line.startswith("| 5. sampling"))
    assert "tok/s" in row and "same tokens both ways" in text


def test_runner_refuses_an_unknown_suite():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown suite")
