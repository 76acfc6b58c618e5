"""Benchmark 9: did each model get *its own* persona? Demo-scale sequential builds of the shipped personas
(all eleven unless --personas says which) on the local embedded model, one after another, then the
cross-persona evaluation over them (issue 20), and the table: the classifier's held-out macro-F1 on the
teacher answers, the macro-F1 of the base and final models' answers, and each build's persona specificity.

    python -m benchmarks.personas WORKSPACE [--personas pirate,poetic] [--scale demo] [--build-id ID]

Builds already finished in WORKSPACE under the same build id are resumed (nothing redone), so a run that
stopped can be started again. Chance level: macro-F1 and specificity about 1 / (number of personas).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from character.persona.constitution import shipped_personas


def _character(*args: str) -> dict:
    """One `character` command with --json; its last stdout line."""
    proc = subprocess.run(
        [sys.executable, "-m", "character.cli", *args, "--json"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"character {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _specificity(summary: dict, model: str) -> float | None:
    return (summary.get(model) or {}).get("specificity")


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--personas", default=",".join(shipped_personas()), help="comma-separated shipped personas")
    ap.add_argument("--scale", default="demo")
    ap.add_argument("--build-id", default="personas-bench")
    args = ap.parse_args()
    personas = [p.strip() for p in args.personas.split(",") if p.strip()]
    unknown = sorted(set(personas) - set(shipped_personas()))
    if unknown or len(personas) < 2:
        sys.exit(f"--personas: give two shipped personas at least (unknown: {', '.join(unknown) or 'none'})")
    ws = str(args.workspace.expanduser().resolve())
    t0, rows = time.perf_counter(), {}
    for p in personas:
        t = time.perf_counter()
        out = _character("pipeline", p, "--scale", args.scale, "--workdir", ws, "--build-id", args.build_id)
        rows[p] = {"summary": out.get("eval") or {}, "seconds": time.perf_counter() - t}
        print(f"{p}: built and evaluated in {rows[p]['seconds']:.0f} s", file=sys.stderr)
    t = time.perf_counter()
    specs = [x for p in personas for x in ("--build", f"{p}/{args.build_id}")]
    cross = _character("eval", *specs, "--workdir", ws)
    cross_s = time.perf_counter() - t

    print(f"cross-persona evaluation of {len(personas)} personas ({args.scale} builds; chance {1 / len(personas):.3f})")
    print(f"classifier held-out macro-F1 (teacher answers): {_f(cross['classifier_heldout_macro_f1'])}")
    for group in ("base", "prompted", "dpo", "final"):
        if f"{group}_macro_f1" in cross:
            print(
                f"{group:>8} answers macro-F1: {_f(cross[f'{group}_macro_f1'])} (no system prompt), "
                f"{_f(cross[f'{group}_robust_macro_f1'])} (break-character)"
            )
    print("\n| persona | specificity base | prompted | dpo | final | in-persona final | build s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for p, r in rows.items():
        s = r["summary"]
        print(
            f"| {p} | {_f(_specificity(s, 'base'))} | {_f(_specificity(s, 'prompted'))} | "
            f"{_f(_specificity(s, 'dpo'))} | {_f(_specificity(s, 'final'))} | "
            f"{_f((s.get('final') or {}).get('in_persona_rate'))} | {r['seconds']:.0f} |"
        )
    print(f"\nreport: {cross['report']['markdown']}")
    print(f"total {time.perf_counter() - t0:.0f} s (cross-persona evaluation {cross_s:.0f} s)")


if __name__ == "__main__":
    main()
