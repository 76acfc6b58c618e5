"""The text of the evaluation report (report.md; character.evaluation.report writes it). Every table
cell carries its n; a metric that could not be computed says why. Model text is escaped so that it
shows exactly the characters written.
"""

from __future__ import annotations

import math
import re

from character.evaluation.report_sections import (
    COHERENCE_PLOT,
    capability_section,
    coherence_section,
    not_computed,
    prefill_section,
    trained_vs_prompted,
)
from character.evaluation.specificity import PLAIN

MAX_SHOWN_PROMPTS = 12  # generations shown in the report; metrics.json holds all of them
REVEALED_PLOT = "revealed preferences: Elo change from base"
MAX_REVEALED_TRAITS = 12  # traits in the revealed-preference table and plot when the constitution names none


def _num(value, fmt: str) -> str | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return fmt.format(value)


def _with_n(value, n, fmt="{:.3f}", unit="n") -> str:
    v = _num(value, fmt)
    return "not computed" if v is None else f"{v} ({unit}={n})"


def _cell(text: str) -> str:
    """Markdown table cells hold one line: escape pipes, turn newlines into <br>."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")
_LINE_START = re.compile(r"^(\s*)([-+=]|\d+[.)])")


def _quote(text: str) -> str:
    """Model text as a markdown blockquote that shows exactly the characters written."""
    if not text.strip():
        return "> *(empty answer)*"
    lines = []
    for line in text.replace("\r", "").split("\n"):
        line = _LINE_START.sub(lambda m: m.group(1) + "\\" + m.group(2), _MD_SPECIAL.sub(r"\\\1", line))
        lines.append(f"> {line}  " if line.strip() else ">")
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Model or user text inside a line of markdown: escaped, on one line."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def metrics_table(result: dict) -> list[dict]:
    """One flat row per model with its n: what a Prefect table artifact or a CSV wants."""
    rows = []
    for label, m in result["eval"].items():
        if label in ("classifier", "report"):
            continue
        rows.append({"model": label, **{k: v for k, v in m.items() if k != "notes"}, "notes": "; ".join(m["notes"])})
    return rows


def model_labels(result: dict) -> list[str]:
    return [k for k in result["eval"] if k not in ("classifier", "report")]


def final_model(result: dict) -> str | None:
    """The checkpoint labelled "final", else the last one evaluated."""
    labels = [lb for lb in model_labels(result) if lb not in ("base", "prompted")]
    return "final" if "final" in labels else (labels[-1] if labels else None)


def nll_change(result: dict, label: str) -> float | None:
    """A model's introspection NLL minus the base's, if both were computed."""
    base = result["checkpoints"].get("base", {}).get("introspection_nll")
    own = result["checkpoints"].get(label, {}).get("introspection_nll")
    return None if base is None or own is None else own - base


def render_markdown(result: dict, plots: dict[str, str], plot_note: str | None) -> str:
    """`plots`: title -> data URI (or path) of each figure."""
    labels = model_labels(result)
    lines = [f"# Evaluation: {result['persona']}", ""] + _inputs_section(result)
    lines += _metrics_section(result, labels)
    lines += trained_vs_prompted(result, final_model(result))
    lines += prefill_section(result)
    lines += coherence_section(result, plots.get(COHERENCE_PLOT))
    lines += capability_section(result)
    notes = _notes(result)
    if notes:
        lines += ["", "## Not computed, and caveats", ""]
        lines += [f"- {n}" for n in notes]
    lines += _revealed_section(result.get("revealed"), plots.get(REVEALED_PLOT))
    others = {t: src for t, src in plots.items() if t not in (REVEALED_PLOT, COHERENCE_PLOT)}
    if others or plot_note:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({src})" for title, src in others.items()]
        if plot_note:
            lines.append(plot_note)
    lines += _generations_section(result["generations"], labels)
    return "\n".join(lines).rstrip() + "\n"


_HELD = {True: "held out", False: "**training data, not held out**", None: "file given"}


def _inputs_section(result: dict) -> list[str]:
    """What was evaluated on what: the build, the reference, each data file with its n and standing."""
    d, clf = result["data"], result["classifier"]
    lines = []
    if result.get("build"):
        lines.append(f"- build: `{result['build']}`")
    lines.append(f"- base model (DPO reference): `{result['base_model']}`; beta {result['beta']}")
    if d.get("dpo_pairs"):
        where = f" from `{d['dpo']}`" if d.get("dpo") else ""
        lines.append(f"- preference pairs: n={d['dpo_pairs']}{where} ({_HELD[d.get('dpo_held_out')]})")
    else:
        lines.append("- preference pairs: none")
    lines.append(
        f"- prompts answered by every model: n={d['prompts']} (each once with no system prompt, once "
        "under a break-character instruction)"
    )
    acc = _num(clf["heldout_accuracy"], "{:.3f}")
    acc = "not computed" if acc is None else f"{acc} on n={clf['n']} held-out answers"
    lines.append(
        f"- persona classifier: {clf['kind']}, fitted on n={clf['train_n']} answers"
        + (f" from `{d['train']}`" if d.get("train") else "")
        + f"; accuracy {acc}"
        + (f" ({clf['note']})" if clf.get("note") else "")
    )
    if d.get("introspection"):
        lines.append(
            f"- introspection: n={d['introspection_rows']} conversations from `{d['introspection']}` "
            f"({_HELD[d.get('introspection_held_out')]})"
        )
    if d.get("judge_model"):
        lines.append(f"- judge: `{d['judge_model']}` (its raw answers are in metrics.json)")
    return lines


def _metrics_section(result: dict, labels: list[str]) -> list[str]:
    """The table of every model's metrics, and what each column means."""
    ck, d = result["checkpoints"], result["data"]
    # Optional columns only when they hold something: a wide table scrolls sideways in the Prefect UI.
    has_nll = any(ck.get(lb, {}).get("introspection_nll") is not None for lb in labels)
    has_judge = bool(d.get("judge_model"))
    spec = result.get("specificity") or {}
    lines = [
        "",
        "## Persona adherence and preferences",
        "",
        "| model | in-persona rate | this persona (specificity) | robust in-persona rate | pref. accuracy | reward margin |"
        + (" introspection NLL (change vs base) |" if has_nll else "")
        + (" judge (1-10) |" if has_judge else ""),
        "|---|---:|---:|---:|---:|---:|" + "---:|" * (has_nll + has_judge),
    ]
    lines += [_metrics_row(result, lb, has_nll, has_judge) for lb in labels]
    lines += [
        "",
        "In-persona rate: share of the model's answers (no system prompt) that the persona classifier "
        "calls in character. This persona (specificity): share of the same answers that a classifier over "
        "the shipped personas' teacher answers and the student's plain answers assigns to this persona"
        + (
            f" ({sum(c != PLAIN for c in spec['classes'])} personas, chance among them {spec['chance']:.3f}; "
            "a plain model scores near 0)"
            if spec.get("status") == "computed"
            else ""
        )
        + ": it rises only with this persona's own content, not with the shape of any persona. "
        "Robust: the same under an instruction to drop the character. "
        "Pref. accuracy: share of held-out pairs whose implied reward "
        "beta x (log p - log p_base) is higher for the in-character answer; margin: its mean difference."
        + (
            " NLL: mean per assistant token (lower after SFT on the model's own introspection by construction)."
            if has_nll
            else ""
        ),
    ]
    return lines


def _metrics_row(result: dict, lb: str, has_nll: bool, has_judge: bool) -> str:
    m, c = result["eval"][lb], result["checkpoints"].get(lb, {})
    nll = _num(c.get("introspection_nll"), "{:.4f}")
    if nll is not None:
        change = nll_change(result, lb)
        nll += f" ({change:+.4f})" if change is not None and lb != "base" else ""
        nll += f" (tokens={c.get('introspection_tokens')})"
    judge = "-"
    if "judge_parsed" in c:
        judge = (
            f"{c['judge_score']:.2f} ({c['judge_parsed']} of {c['judge_n']} parsed)"
            if c.get("judge_score") is not None
            else f"none parsed (0 of {c['judge_n']})"
        )
    return (
        f"| {_cell(lb)} | {_with_n(m['in_persona_rate'], m['in_persona_n'])} | "
        f"{_with_n(m.get('specificity'), m.get('specificity_n', 0))} | "
        f"{_with_n(m['robust_in_persona_rate'], m['robust_n'])} | "
        f"{_with_n(m['pref_accuracy'], m['pref_pairs'], unit='pairs')} | "
        f"{_with_n(m['pref_margin'], m['pref_pairs'], '{:+.4f}', unit='pairs')} |"
        + (f" {nll or '-'} |" if has_nll else "")
        + (f" {judge} |" if has_judge else "")
    )


def _generations_section(gens: list[dict], labels: list[str]) -> list[str]:
    """The first prompts' answers, every model's side by side, plain and under the break-character attack."""
    lines = ["", "## Generations", ""]
    if not gens:
        lines.append("No prompts were answered.")
    if len(gens) > MAX_SHOWN_PROMPTS:
        lines.append(f"The first {MAX_SHOWN_PROMPTS} of {len(gens)} prompts; metrics.json holds every answer.")
    for i, g in enumerate(gens[:MAX_SHOWN_PROMPTS], 1):
        lines += ["", f"### {i}. {_inline(g['prompt'])}", ""]
        for lb in labels:
            lines += [f"**{lb}**{_verdict(g['answers'][lb])}", "", _quote(g["answers"][lb]["text"]), ""]
        attack = g.get("attack") or []
        if attack and g.get("robust"):
            system, user = attack[0]["content"], attack[-1]["content"].split("\n\n")[-1]
            lines += [
                f'*Under a break-character instruction* (system: "{_inline(system)}"; appended to the '
                f'message: "{_inline(user)}")',
                "",
            ]
            for lb in labels:
                lines += [f"**{lb}**{_verdict(g['robust'][lb])}", "", _quote(g["robust"][lb]["text"]), ""]
        if g.get("prefill"):
            pre = g["prefill"]
            lines += [
                f'*After the base model\'s first answer (above) and the follow-up "{_inline(pre["follow_up"])}"*',
                "",
            ]
            for lb in labels:
                lines += [f"**{lb}**{_verdict(pre['answers'][lb])}", "", _quote(pre["answers"][lb]["text"]), ""]
    return lines


def revealed_traits(rev: dict) -> tuple[list[str], str]:
    """The traits the report shows (the constitution's, else the largest movers) and how they were chosen."""
    if rev.get("constitution_traits"):
        return list(rev["constitution_traits"]), "the listed traits the constitution speaks of"
    changes = rev["changes"].get(rev.get("final") or "", {})
    top = sorted(changes, key=lambda t: -abs(changes[t]))[:MAX_REVEALED_TRAITS]
    return top, f"no listed trait matches the constitution's words: the {len(top)} that moved most"


def _delta(x: float) -> str:
    return f"{int(round(x)):+d}"  # never "-0"


def _revealed_section(rev: dict | None, plot: str | None) -> list[str]:
    lines = ["", "## Revealed preferences", ""]
    if (why := not_computed(rev)) is not None:
        return lines + [why]
    models, final = rev["models"], rev.get("final")
    lines.append(
        f"Each model played {rev['games_per_model']} games: it answered a held-out prompt while offered two "
        f"of {rev['traits']} traits (drawn at random, the same draws for every model) to let one shape its "
        f"reply without naming it, and the judge `{rev['judge_model']}` named the trait the reply shows. "
        "Elo per trait (start 1000, K=32, mean over 32 orders of the games)."
    )
    lines.append("")
    for lb, m in models.items():
        lines.append(
            f"- {lb}: {m['judged']} of {m['games']} games judged"
            + (f" ({m['unparsed']} verdicts unreadable, left out)" if m["unparsed"] else "")
        )
    if final is None:
        return lines + ["", "No trained checkpoint: no change to show."]
    traits, why = revealed_traits(rev)
    base, fin, change = models["base"], models[final], rev["changes"][final]
    lines += [
        "",
        f"Traits shown: {why}.",
        "",
        f"| trait | base Elo | {_cell(final)} Elo | change | {_cell(final)}: shown / offered |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in traits:
        cnt = fin["counts"].get(t, {"shown": 0, "offered": 0})
        lines.append(
            f"| {t} | {base['ratings'][t]:.0f} | {fin['ratings'][t]:.0f} | {_delta(change[t])} | "
            f"{cnt['shown']} / {cnt['offered']} |"
        )
    ranked = sorted(change, key=lambda t: change[t])
    lines += [
        "",
        "Largest rises overall: "
        + ", ".join(f"{t} ({_delta(change[t])})" for t in ranked[::-1][:5])
        + "; largest falls: "
        + ", ".join(f"{t} ({_delta(change[t])})" for t in ranked[:5])
        + ".",
    ]
    if plot:
        lines += ["", f"![{REVEALED_PLOT}]({plot})"]
    return lines


def _verdict(entry: dict) -> str:
    parts = []
    p = entry.get("in_persona_p")
    if p is not None:
        parts.append(f"{'in persona' if p > 0.5 else 'not in persona'}, p={p:.2f}")
    if "judge_score" in entry:
        s = entry["judge_score"]
        parts.append(f"judge {s:g}" if s is not None else "judge: unparsed")
    return f" ({'; '.join(parts)})" if parts else ""


def _notes(result: dict) -> list[str]:
    """Every model's notes, shared ones once; a judge that parsed nothing is said plainly."""
    labels = model_labels(result)
    out: list[str] = []
    for lb in labels:
        for n in result["eval"][lb]["notes"]:
            shared = all(n in result["eval"][o]["notes"] for o in labels)
            text = n if shared else f"{lb}: {n}"
            if text not in out:
                out.append(text)
    ck = result["checkpoints"]
    if result["data"].get("judge_model"):
        parsed = sum(ck[lb].get("judge_parsed", 0) for lb in labels)
        total = sum(ck[lb].get("judge_n", 0) for lb in labels)
        if parsed == 0:
            out.append(
                f"**the judge `{result['data']['judge_model']}` gave no answer that could be parsed as a "
                f"score (0 of {total}): no judge scores**"
            )
        elif parsed < total:
            out.append(f"the judge's answers could be parsed for {parsed} of {total} answers")
    return out
