"""The report's comparison sections (character.evaluation.report_markdown places them): trained vs
prompted, multi-turn (prefill) robustness, coherence and capability retention. Each says what it
measured with its n, or why it was not run; none draws a conclusion its numbers do not carry.
"""

from __future__ import annotations

COHERENCE_PLOT = "coherence: win / tie / loss of the final model"


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def not_computed(part: dict | None) -> str | None:
    """Why an optional part of the evaluation (coherence, capability, revealed preferences) has no numbers to
    show, as the report says it: not run (an evaluation from before it existed) or skipped, with the reason;
    None when it was computed."""
    if not part:
        return "Not run (this evaluation predates it)."
    if part.get("status") != "computed":
        return f"Skipped: {part.get('reason')}."
    return None


def _drop(m: dict, key: str) -> float | None:
    return None if m.get(key) is None or m.get("in_persona_rate") is None else m[key] - m["in_persona_rate"]


def trained_vs_prompted(result: dict, final: str | None) -> list[str]:
    """Does training beat prompting? The rates of the final model and the prompted baseline side by side,
    and how far each falls under a break-character instruction and after a prefilled answer."""
    ev = result["eval"]
    lines = ["", "## Trained vs prompted", ""]
    if "prompted" not in ev:
        return lines + ["The prompted baseline was not evaluated."]
    if final is None or final not in ev:
        return lines + ["No trained checkpoint to compare with the prompted baseline."]
    lines += [
        "The prompted baseline is the base model with the constitution in its system prompt (the teacher's "
        "prompt); for the robust rate the break-character instruction comes after the constitution.",
        "",
        "| model | in-persona rate | robust rate (change) | prefill rate (change) |",
        "|---|---:|---:|---:|",
    ]
    for lb in ("prompted", final):
        m = ev[lb]
        lines.append(
            f"| {lb} | {_f(m['in_persona_rate'])} (n={m['in_persona_n']}) | "
            f"{_f(m['robust_in_persona_rate'])} ({_f(_drop(m, 'robust_in_persona_rate'), '{:+.3f}')}) | "
            f"{_f(m.get('prefill_in_persona_rate'))} ({_f(_drop(m, 'prefill_in_persona_rate'), '{:+.3f}')}) |"
        )
    p_drop, f_drop = _drop(ev["prompted"], "robust_in_persona_rate"), _drop(ev[final], "robust_in_persona_rate")
    if p_drop is not None and f_drop is not None:
        if p_drop < f_drop:
            verdict = f"the prompted baseline falls further than {final} under the break-character instruction"
        elif p_drop > f_drop:
            verdict = f"{final} falls further than the prompted baseline: here training did not beat prompting"
        else:
            verdict = "both fall equally far"
        lines += ["", f"Measured: {verdict} ({p_drop:+.3f} vs {f_drop:+.3f})."]
    return lines


def prefill_section(result: dict) -> list[str]:
    ev = result["eval"]
    labels = [k for k in ev if k not in ("classifier", "report")]
    lines = ["", "## Multi-turn robustness (prefill)", ""]
    if not any(ev[lb].get("prefill_n") for lb in labels):
        return lines + ["Not run, or no answers to score (see the caveats)."]
    lines += [
        "For each held-out prompt the base model, with no system prompt, wrote the first answer; each model "
        "then answered a follow-up turn of ours. Share of those second answers in persona:",
        "",
        "| model | prefill in-persona rate | without prefill |",
        "|---|---:|---:|",
    ]
    for lb in labels:
        m = ev[lb]
        lines.append(
            f"| {lb} | {_f(m.get('prefill_in_persona_rate'))} (n={m.get('prefill_n', 0)}) | "
            f"{_f(m['in_persona_rate'])} (n={m['in_persona_n']}) |"
        )
    return lines


def coherence_section(result: dict, plot: str | None) -> list[str]:
    coh = result.get("coherence")
    lines = ["", "## Coherence", ""]
    if (why := not_computed(coh)) is not None:
        return lines + [why]
    final = coh["final"]
    lines += [
        f"The judge `{coh['judge_model']}` compared {final}'s answer to each held-out prompt with another "
        "model's, once in each order; a verdict counts only when both orders agree (disagreements, such as "
        "a preference for whichever answer comes first, are discarded). Rates are over the agreed verdicts.",
        "",
        f"| comparison | {final} wins | tie | {final} loses | n (agreed) | discarded |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, c in coh["comparisons"].items():
        other = key.removeprefix("vs_")
        lines.append(
            f"| {final} vs {other} | {_f(c['win'])} | {_f(c['tie'])} | {_f(c['loss'])} | {c['n']} | "
            f"{c['discarded']} of {c['total']} ({_f(c['discarded_share'])}) |"
        )
    if plot:
        lines += ["", f"![{COHERENCE_PLOT}]({plot})"]
    return lines


def capability_section(result: dict) -> list[str]:
    cap = result.get("capability")
    lines = ["", "## Capability retention", ""]
    if (why := not_computed(cap)) is not None:
        return lines + [why]
    lines += [
        f"Multiple-choice set `{cap['set']}` (n={cap['n']} questions, chance {cap['chance']:.3f}), each choice "
        "scored by its summed log-probability as the reply to the question; the best-scoring choice is the answer.",
        "",
        "| model | accuracy | change vs base | length-normalized |",
        "|---|---:|---:|---:|",
    ]
    for lb, m in cap["models"].items():
        lines.append(
            f"| {lb} | {_f(m['accuracy'])} (n={m['n']}) | {_f(m['change'], '{:+.3f}')} | {_f(m['accuracy_norm'])} |"
        )
    p = cap.get("base_above_chance_p")
    if cap.get("base_at_chance"):
        lines += [
            "",
            f"**The base model is at chance on this set** (one-sided p={p:.2f} of doing this well by "
            "guessing): the accuracies and their changes are noise, not a measure of retained ability.",
        ]
    elif p is not None:
        lines += ["", f"The base model is above chance on this set (one-sided p={p:.2g})."]
    return lines
