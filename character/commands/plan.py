"""`character plan PERSONA`: the price of a build before it starts, with `character pipeline`'s flags."""

from __future__ import annotations

import functools
import json

import typer

from character.commands import build


@functools.wraps(build.pipeline)  # the same flags, by the same names: a plan describes that very build
def plan(**flags) -> None:
    from character.cost.budget import build_plan, check_budget

    cfg = build._pipeline_config(**flags)
    p = build_plan(cfg)
    typer.echo(json.dumps(p) if flags["as_json"] else plan_text(p))
    if cfg.max_cost is not None:
        check_budget(p, cfg.max_cost)


plan.__doc__ = """Estimate a build before running it: per stage, the tokens each model will prefill, sample and
train on, their cost at the price table's rates (CHARACTER_PRICE_TABLE), and a rough duration. Takes
`character pipeline`'s flags; with --max-cost it exits 2 when the estimate is over the budget."""


def _dollars(v) -> str:
    return "no price" if v is None else f"${v:,.2f}" if v >= 1 else f"${v:.4f}"


def plan_text(p: dict) -> str:
    lines = [
        f"{p['persona']} at scale {p['scale']} ({p['mode']}) on {p['backend']}: "
        f"student {p['base_model']}, teacher {p['teacher_model']}",
        f"{'stage':<14} {'model':<40} {'prefill':>11} {'sampled':>11} {'trained':>11} {'cost':>10} {'time':>8}",
    ]
    for s in p["stages"]:
        for i, (model, t) in enumerate(s["tokens"].items()):
            when = _duration(s["seconds"]) if i == 0 else ""
            one = _dollars(s["cost"]) if len(s["tokens"]) == 1 else ""
            lines.append(
                f"{s['stage'] if i == 0 else '':<14} {model:<40} {t['prefill']:>11,} {t['sample']:>11,} "
                f"{t['train']:>11,} {one:>10} {when:>8}"
            )
        if len(s["tokens"]) > 1:
            lines.append(f"{'':<14} {'(stage)':<40} {'':>11} {'':>11} {'':>11} {_dollars(s['cost']):>10}")
    t = p["total"]
    lines.append(
        f"{'total':<14} {'':<40} {'':>11} {'':>11} {'':>11} {_dollars(t['cost']):>10} {_duration(t['seconds']):>8}"
    )
    if t["unpriced"]:
        lines.append(f"no price in the table for: {', '.join(t['unpriced'])}")
    if p["not_estimated"]:
        lines.append(f"not estimated: {', '.join(p['not_estimated'])} (its tokens are counted during the build)")
    lines.append(f"answer lengths from: {p['answers_from']}; prices: {p['prices']['table']} of {p['prices']['as_of']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
