"""Running one side of a comparison in a fresh process and reading its time and peak memory.

Each measurement is its own Python process, so peak memory (the kernel's max resident set size of
that process, from wait4) belongs to that side alone. The child times the job itself and reports
it; interpreter start and imports are outside that time on both sides alike.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_child(target: str, timeout_s: float = 1800, **kwargs) -> dict:
    """Run `module:function(**kwargs)` in a new process; its dict result plus `peak_rss_mb`."""
    with tempfile.TemporaryDirectory(prefix="character-bench-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}
        if kwargs.get("launched") == "now":  # the child measures from its own launch
            kwargs = {**kwargs, "launched": time.time()}
        # The child's own output (training logs, CLI lines) goes to stderr: stdout carries the table.
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.child", target, json.dumps(kwargs), str(out)],
            cwd=ROOT,
            env=env,
            stdout=sys.stderr,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark child {target} exited with {proc.returncode}")
        result = json.loads(out.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


@dataclass
class Samples:
    """Repeated measurements of one side; figures are medians."""

    runs: list[dict] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)


def alternate(sides: dict[str, tuple[str, dict]], repeats: int) -> dict[str, Samples]:
    """Measure each side `repeats` times, interleaved (A B A B ...) so drift hits both alike."""
    out = {name: Samples() for name in sides}
    for _ in range(repeats):
        for name, (target, kwargs) in sides.items():
            out[name].runs.append(run_child(target, **kwargs))
            print(f"  {name}: {out[name].runs[-1]}", file=sys.stderr, flush=True)
    return out


@dataclass
class Row:
    benchmark: str
    metric: str
    ours: float
    peer: float
    peer_name: str
    unit: str
    goal: str  # e.g. "<= 0.8"
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer else float("inf")

    @property
    def met(self) -> bool | None:
        if not self.goal:
            return None
        op, value = self.goal.split()
        return self.ratio <= float(value) if op == "<=" else self.ratio >= float(value)
