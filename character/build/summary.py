"""Human-readable summaries of a build: the markdown and tables the Prefect UI shows, the `eval`
object of `character pipeline --json`, and the nightly comparison with the previous night."""

from __future__ import annotations

import json
import re
from pathlib import Path

from character.build.paths import build_records

HEADLINE = (
    "in_persona_rate",
    "robust_in_persona_rate",
    "pref_accuracy",
    "prefill_in_persona_rate",
    "capability_accuracy",
    "prompted_in_persona_rate",
    "prompted_robust_in_persona_rate",
    "coherence_win_vs_base",
    "coherence_win_vs_prompted",
)
_SECTIONS = ("classifier", "report", "coherence", "capability")  # the eval object's keys that are no model
_NIGHTLY = re.compile(r"^nightly-(\d{4}-\d{2}-\d{2})$")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def eval_summary(record: dict) -> dict | None:
    """The per-model persona and preference metrics the build recorded (None: no evaluation stage ran),
    keys in their documented order (the record stores them sorted)."""
    from character.evaluation.metrics import SUMMARY_KEYS

    summary = ((record.get("stages") or {}).get("eval") or {}).get("summary")
    if summary is None:
        return None
    out = {name: {k: summary[name].get(k) for k in SUMMARY_KEYS} for name in _models(summary)}
    clf = summary.get("classifier") or {}
    out["classifier"] = {"heldout_accuracy": clf.get("heldout_accuracy"), "n": clf.get("n", 0)}
    out["report"] = summary.get("report")
    stage = (record.get("stages") or {}).get("eval") or {}
    for section in ("coherence", "capability"):  # outcomes, or why they were skipped
        if stage.get(section) is not None:
            out[section] = stage[section]
    return out


def _models(summary: dict) -> list[str]:
    return [k for k in summary if k not in _SECTIONS]


def eval_markdown(summary: dict) -> list[str]:
    """The headline table: every rate with its n, every null with its reason."""
    lines = [
        "| model | in-persona rate | this persona | robust rate | prefill rate | pref. accuracy | margin | capability |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in _models(summary):
        m = summary[name]

        def cell(v, n, unit="n", fmt="{:.3f}"):
            return "-" if v is None else f"{fmt.format(v)} ({unit}={n})"

        lines.append(
            f"| {name} | {cell(m['in_persona_rate'], m['in_persona_n'])} | "
            f"{cell(m.get('specificity'), m.get('specificity_n'))} | "
            f"{cell(m['robust_in_persona_rate'], m['robust_n'])} | "
            f"{cell(m.get('prefill_in_persona_rate'), m.get('prefill_n'))} | "
            f"{cell(m['pref_accuracy'], m['pref_pairs'], 'pairs')} | "
            f"{cell(m['pref_margin'], m['pref_pairs'], 'pairs', '{:+.4f}')} | "
            f"{cell(m.get('capability_accuracy'), m.get('capability_n'))} |"
        )
    clf = summary.get("classifier") or {}
    if clf.get("heldout_accuracy") is not None:
        lines += ["", f"Persona classifier held-out accuracy {clf['heldout_accuracy']:.3f} (n={clf['n']})."]
    notes = sorted({n for name in _models(summary) for n in summary[name]["notes"]})
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return lines


def build_summary_markdown(record: dict, checkpoints: dict[str, str]) -> str:
    """Stages with durations and key numbers, then the checkpoint URIs, then evaluation if any."""
    stages = record.get("stages", {})
    lines = [
        f"# {record.get('persona', '?')} build `{record.get('build_id', '?')}`",
        "",
        "| stage | seconds | result |",
        "|---|---|---|",
    ]
    for name, st in stages.items():
        if name == "eval":
            continue
        key = {
            k: st[k] for k in ("rows", "steps", "questions", "reflections", "interactions", "method", "rank") if k in st
        }
        dropped = st.get("dropped")
        note = ", ".join(f"{k} {v}" for k, v in key.items())
        if dropped:
            note += f"; dropped {dropped}"
        lines.append(f"| {name} | {_fmt(st.get('seconds'))} | {note} |")
    lines += cost_markdown(record)
    lines += ["", "| checkpoint | URI |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in checkpoints.items()]
    summary = eval_summary(record)
    if summary:
        lines += ["", "## Evaluation", ""] + eval_markdown(summary)
    report = (stages.get("eval") or {}).get("report") or {}
    if report.get("markdown"):
        lines += ["", f"Evaluation report: `{report['markdown']}`"]
    return "\n".join(lines) + "\n"


def cost_summary(record: dict) -> dict | None:
    """The tokens the build counted per stage and model and their cost at the price table's rates, for the
    `--json` summary (None: nothing counted)."""
    from character.cost.budget import spent

    return spent(record)


def cost_row(record: dict) -> dict:
    """A nightly row's spend: the tokens the build counted (all kinds) and their cost in dollars."""
    cost = cost_summary(record) or {}
    tokens = (cost.get("total") or {}).get("tokens") or {}
    return {"tokens": sum(sum(t.values()) for t in tokens.values()), "cost_usd": (cost.get("total") or {}).get("cost")}


def _dollars(v) -> str:
    return "no price" if v is None else f"${v:.4f}" if v < 1 else f"${v:.2f}"


def cost_markdown(record: dict) -> list[str]:
    """Tokens and cost per stage and model (prefill / sampled / trained)."""
    cost = cost_summary(record)
    if not cost:
        return []
    lines = ["", "| stage | model | prefill | sampled | trained | cost |", "|---|---|---:|---:|---:|---:|"]
    for stage, st in cost["stages"].items():
        for model, t in st["tokens"].items():
            one = cost_of(st, model)
            lines.append(f"| {stage} | {model} | {t['prefill']} | {t['sample']} | {t['train']} | {_dollars(one)} |")
    total = cost["total"]
    lines.append(f"| total | | | | | {_dollars(total['cost'])} |")
    lines += [
        "",
        f"Prices: `{cost['prices']['table']}` of {cost['prices']['as_of']}"
        + (f"; no price for {', '.join(total['unpriced'])}." if total["unpriced"] else "."),
    ]
    return lines


def cost_of(stage: dict, model: str) -> float | None:
    from character.cost.prices import load_prices

    p = load_prices().price(model)
    return None if p is None else p.cost(stage["tokens"][model])


def evaluation_rows(result: dict) -> list[dict]:
    """One row per evaluated model (the base first) with its metrics and n, for a table artifact."""
    summary = result.get("eval") or {}
    return [
        {
            "model": name,
            **{k: _fmt(v) for k, v in summary[name].items() if k != "notes"},
            "notes": "; ".join(summary[name]["notes"]),
        }
        for name in _models(summary)
    ]


# -- nightly ---------------------------------------------------------------------------------------
def headline(summary: dict | None, checkpoint: str = "final") -> dict:
    """The final checkpoint's headline metrics, the prompted baseline's rates and the final model's coherence
    win rates (None where not computed or not evaluated)."""
    summary = summary or {}
    m, prompted = summary.get(checkpoint) or {}, summary.get("prompted") or {}
    comparisons = (summary.get("coherence") or {}).get("comparisons") or {}
    out = {k: m.get(k) for k in HEADLINE[:5]}
    out |= {f"prompted_{k}": prompted.get(k) for k in ("in_persona_rate", "robust_in_persona_rate")}
    out |= {f"coherence_win_{k}": (comparisons.get(k) or {}).get("win") for k in ("vs_base", "vs_prompted")}
    return out


def previous_nightly_record(workdir: str | Path, persona: str, build_id: str) -> dict | None:
    """The record of the persona's latest nightly build before `build_id` (nightly-YYYY-MM-DD)."""
    this = _NIGHTLY.match(build_id)
    if not this:
        return None
    earlier = [
        path
        for path in build_records(workdir, persona)
        if (m := _NIGHTLY.match(path.parent.name)) and m.group(1) < this.group(1)
    ]
    for path in reversed(earlier):
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return None


def change(now: float | None, before: float | None) -> float | None:
    return None if now is None or before is None else now - before
