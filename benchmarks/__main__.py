"""`python -m benchmarks`: run every comparison and write BENCHMARKS.md.

Each side of each comparison runs in its own fresh process, several times, interleaved with its
peer; the table shows medians. Run it on an otherwise idle machine: on few cores a second busy
process distorts every figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from benchmarks.measure import ROOT, Row, run_child

SUITES = ("dpo", "weights", "pipelining", "sampling", "orchestration", "dpo_memory")


def build_tiny(models: str) -> dict:
    from character.backend.tiny import tiny_model_path

    return {"path": str(tiny_model_path(Path(models)))}


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    mem = next(
        (
            int(line.split()[1]) // 1024 // 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    libs = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft", "trl", "prefect", "numpy"))
    return f"{cpu}, {os.cpu_count()} cores, {mem} GiB RAM, no GPU used; Python {platform.python_version()}, {libs}"


def table(rows: list[Row]) -> str:
    out = ["| benchmark | metric | ours | peer | ratio ours/peer | goal | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "(no goal)"}[r.met]
        out.append(
            f"| {r.benchmark} | {r.metric} | {r.ours:.3g} {r.unit} | {r.peer:.3g} {r.unit} ({r.peer_name}) "
            f"| {r.ratio:.3f} | {r.goal or '-'} | {met} |"
        )
    notes = [f"- {r.benchmark}, {r.metric}: {r.note}" for r in rows if r.note]
    return "\n".join(out) + ("\n\nNotes:\n\n" + "\n".join(notes) if notes else "") + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per side (medians are reported)")
    ap.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    ap.add_argument("--workdir", default="/tmp/character-bench", help="scratch space (a few GB for the 1B model)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SUITES))
    if unknown or args.repeats < 1:
        print(
            f"error: unknown suite(s) {', '.join(unknown)} (choose from {', '.join(SUITES)})"
            if unknown
            else "error: --repeats must be at least 1",
            file=sys.stderr,
        )
        sys.exit(2)

    root = Path(args.workdir).resolve()
    models = root / "models"
    run_child("benchmarks.__main__:build_tiny", models=str(models))
    t0 = time.perf_counter()
    rows: list[Row] = []
    for suite in chosen:
        print(f"== {suite}", file=sys.stderr, flush=True)
        if suite == "dpo":
            from benchmarks.dpo_vs_trl import compare

            rows += compare(root, models, args.repeats)
        elif suite == "weights":
            from benchmarks.weights import compare as compare_weights

            rows += compare_weights(root / "weights", args.repeats)
        elif suite == "pipelining":
            from benchmarks.pipelining import compare as compare_pipelining

            rows += compare_pipelining(root, models, args.repeats)
        elif suite == "sampling":
            from benchmarks.sampling import compare as compare_sampling

            rows += compare_sampling(root, models, args.repeats)
        elif suite == "orchestration":
            from benchmarks.orchestration import compare as compare_orchestration

            rows += compare_orchestration(root / "orchestration", models, args.repeats)
        elif suite == "dpo_memory":  # CPU-sized here; `python -m benchmarks.dpo_memory --device cuda` at full shape
            from benchmarks.dpo_memory import compare as compare_memory

            rows += compare_memory(root / "dpo-memory", args.repeats)
    minutes = (time.perf_counter() - t0) / 60
    command = "python -m benchmarks " + shlex.join(sys.argv[1:])
    text = (
        "# Benchmarks\n\n"
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with `{command.strip()}` "
        f"({minutes:.0f} min).\n\nMachine: {machine()}.\n\n"
        f"Each side runs in its own fresh process, {args.repeats} times, interleaved with its peer; figures are "
        "medians. Time is the job's wall time as the child measures it; peak memory is the child process's "
        "maximum resident set size (wait4). The ratio is ours / peer: below 1 is better for time and memory, "
        "above 1 for throughput.\n\n" + table(rows)
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
