"""Benchmark 8: the evaluation stage of a demo build with every section on (issue 21: the prompted
baseline, multi-turn prefill robustness, the capability probe, coherence with `tiny` as its judge),
against the same evaluation with those sections off. Goal: all sections in under 60 s on 2 cores.

    python -m benchmarks.evaluation --build workspace/builds/sarcastic/<id> [--repeats 3]

Each side runs in its own fresh process (benchmarks.measure), interleaved; the figures are medians of the
child's wall time and of its CPU time (user + system). On a busy machine the wall time grows with the
load while the CPU time hardly moves: with one torch thread, CPU time is what the wall time would be
on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import alternate

GOAL_S = 60.0


def evaluate_build(build: str, sections: bool) -> dict:
    """The child: evaluate the build's dpo and final checkpoints as its eval stage does."""
    import torch

    from character.config import PipelineConfig
    from character.evaluation.evaluate import evaluate_checkpoints
    from character.evaluation.options import EvalOptions
    from character.settings import Settings

    torch.set_num_threads(1)
    rec = json.loads((Path(build) / "record.json").read_text())
    cfg = PipelineConfig(**rec["config"])
    uris = [rec["stages"]["dpo"]["sampler"], rec["stages"]["sft"]["sampler"]]
    with tempfile.TemporaryDirectory(prefix="character-bench-eval-") as out:
        opts = EvalOptions.for_build(cfg, Settings(), names=["dpo", "final"])
        opts.out_dir = out
        opts.prompted = opts.prefill = opts.capability = sections
        opts.coherence_judge = "tiny" if sections else None
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        res = evaluate_checkpoints(uris, opts)
        seconds = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "models": [k for k in res["eval"] if k not in ("classifier", "report")],
        "prompts": res["data"]["prompts"],
        "coherence": res["coherence"]["status"],
        "capability_n": (res["capability"] or {}).get("n"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__.splitlines()[0])
    ap.add_argument("--build", required=True, help="a finished demo build's folder")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (Path(args.build) / "record.json").is_file():
        print(f"error: --build {args.build}: no record.json", file=sys.stderr)
        sys.exit(2)
    build = str(Path(args.build).resolve())
    sides = {
        "all sections": ("benchmarks.evaluation:evaluate_build", {"build": build, "sections": True}),
        "persona metrics only": ("benchmarks.evaluation:evaluate_build", {"build": build, "sections": False}),
    }
    runs = alternate(sides, args.repeats)
    lines = ["| evaluation of a demo build | wall time | CPU time | goal (CPU) | met |", "|---|---:|---:|---:|---|"]
    for name, s in runs.items():
        cpu = s.median("cpu_seconds")
        met = ("yes" if cpu < GOAL_S else "**no**") if name == "all sections" else "(no goal)"
        goal = f"< {GOAL_S:.0f} s" if name == "all sections" else "-"
        lines.append(f"| {name} | {s.median('seconds'):.1f} s | {cpu:.1f} s | {goal} | {met} |")
    last = runs["all sections"].runs[-1]
    lines += [
        "",
        f"Models: {', '.join(last['models'])}; {last['prompts']} prompts; capability n={last['capability_n']}.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
