"""The evaluation report's plots as PNG files (matplotlib, imported only when a plot is drawn). Every
bar carries its n; a missing value is marked, not left blank.
"""

from __future__ import annotations

import os
from pathlib import Path

from character.evaluation.report_markdown import model_labels, nll_change, revealed_traits
from character.storage import read_jsonl

_SHARE = (0, 1.1)  # y range of rates and accuracies: room above 1 for the value labels


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=90, format="png")
    os.replace(tmp, path)


def _bars(ax, labels, values, ns, title, unit="n", ylim=None, fmt="{:.2f}"):
    """Bars with their values written on them; a missing value is marked, not left blank."""
    xs = range(len(labels))
    present = [(x, v) for x, v in zip(xs, values) if v is not None]
    ax.bar([x for x, _ in present], [v for _, v in present], color="tab:blue")
    for x, v in zip(xs, values):
        y = v if v is not None else 0
        ax.annotate(
            fmt.format(v) if v is not None else "not\ncomputed",
            (x, y),
            ha="center",
            va="bottom" if y >= 0 else "top",
            fontsize=7,
            xytext=(0, 2 if y >= 0 else -2),
            textcoords="offset points",
        )
    ax.set_xticks(list(xs), [f"{lb}\n{unit}={n}" for lb, n in zip(labels, ns)], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    if ylim:
        ax.set_ylim(*ylim)
    else:  # leave room for the value labels, and show the zero line
        lo, hi = min([0.0] + [v for _, v in present]), max([0.0] + [v for _, v in present])
        pad = (hi - lo) * 0.35 or 1.0
        ax.set_ylim(lo - (pad if lo < 0 else 0), hi + pad)


def _metric_panels(result: dict, labels: list[str]) -> list[tuple]:
    """(title, values, ns, unit, y limits) of each bar panel; NLL and judge panels only when computed."""
    ev, ck = result["eval"], result["checkpoints"]
    panels = [
        (
            "in-persona rate",
            [ev[lb]["in_persona_rate"] for lb in labels],
            [ev[lb]["in_persona_n"] for lb in labels],
            "n",
            _SHARE,
        ),
        (
            "robust in-persona rate",
            [ev[lb]["robust_in_persona_rate"] for lb in labels],
            [ev[lb]["robust_n"] for lb in labels],
            "n",
            _SHARE,
        ),
        (
            "held-out pref. accuracy",
            [ev[lb]["pref_accuracy"] for lb in labels],
            [ev[lb]["pref_pairs"] for lb in labels],
            "pairs",
            _SHARE,
        ),
        (
            "reward margin",
            [ev[lb]["pref_margin"] for lb in labels],
            [ev[lb]["pref_pairs"] for lb in labels],
            "pairs",
            None,
        ),
    ]
    for key, n_key, title in (
        ("specificity", "specificity_n", "this persona (specificity)"),
        ("prefill_in_persona_rate", "prefill_n", "prefill (multi-turn) in-persona rate"),
        ("capability_accuracy", "capability_n", "capability accuracy"),
    ):
        if any(ev[lb].get(n_key) for lb in labels):
            panels.append(
                (title, [ev[lb].get(key) for lb in labels], [ev[lb].get(n_key, 0) for lb in labels], "n", _SHARE)
            )
    changes = [nll_change(result, lb) for lb in labels[1:]]
    if any(c is not None for c in changes):  # the change, not the level: a small drop is invisible on bars from 0
        tokens = [ck[lb].get("introspection_tokens") for lb in labels[1:]]
        panels.append(("introspection NLL change vs base", changes, tokens, "tokens", None))
    if any("judge_parsed" in ck[lb] for lb in labels):
        scores = [ck[lb].get("judge_score") for lb in labels]
        panels.append(
            ("judge score (1-10)", scores, [ck[lb].get("judge_parsed", 0) for lb in labels], "parsed", (0, 11))
        )
    return panels


def plot_metrics(result: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    labels = model_labels(result)
    panels = _metric_panels(result, labels)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.3), squeeze=False)
    for ax, (title, values, ns, unit, ylim) in zip(axes[0], panels):
        shown = labels[1:] if title.startswith("introspection") else labels
        _bars(ax, shown, values, ns, title, unit, ylim, "{:+.3f}" if ylim is None else "{:.2f}")
        if title == "capability accuracy" and (result.get("capability") or {}).get("chance"):
            ax.axhline(result["capability"]["chance"], color="tab:red", linestyle="--", linewidth=0.8)
            ax.annotate("chance", (len(shown) - 0.5, result["capability"]["chance"]), fontsize=6, color="tab:red")
        if title.startswith("this persona") and (result.get("specificity") or {}).get("chance"):
            ax.axhline(result["specificity"]["chance"], color="tab:red", linestyle="--", linewidth=0.8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_revealed(result: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    rev = result.get("revealed") or {}
    if rev.get("status") != "computed" or not rev.get("final"):
        return False
    traits, _ = revealed_traits(rev)
    if not traits:
        return False
    change = rev["changes"][rev["final"]]
    values = [change[t] for t in traits]
    fig, ax = plt.subplots(figsize=(6.0, 0.3 * len(traits) + 1.2))
    ax.barh(range(len(traits)), values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
    ax.set_yticks(range(len(traits)), traits, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.5)
    games = rev["models"][rev["final"]]["judged"]
    ax.set_title(f"Elo change, base -> {rev['final']} (games judged: {games})", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_coherence(result: dict, path: Path) -> bool:
    """Stacked win / tie / loss bars per comparison, over the verdicts both orders agreed on."""
    import matplotlib.pyplot as plt

    coh = result.get("coherence") or {}
    rows = (
        [(k, c) for k, c in (coh.get("comparisons") or {}).items() if c["n"]] if coh.get("status") == "computed" else []
    )
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.0, 0.5 * len(rows) + 1.3))
    for y, (key, c) in enumerate(rows):
        left = 0.0
        for part, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
            ax.barh(y, c[part], left=left, color=color, label=part if y == 0 else None)
            left += c[part]
    labels = [f"{coh['final']} {k.replace('_', ' ')}\nn={c['n']}, discarded {c['discarded']}" for k, c in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_title(f"coherence, judge {coh['judge_model']} (verdicts agreed in both orders)", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_training(training: dict[str, Path], path: Path) -> bool:
    import matplotlib.pyplot as plt

    runs = {name: read_jsonl(p) for name, p in training.items()}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], runs.items()):
        steps = [r.get("step") for r in rows]
        for key in ("loss", "dpo_loss", "loss:sum", "nll", "reward_accuracy"):
            ys = [r.get(key) for r in rows]
            if all(isinstance(y, (int, float)) for y in ys):
                # markers: a one-step run is a single point, which a bare line does not draw
                ax.plot(steps, ys, label=key, linewidth=1, marker="o", markersize=3)
        ax.set_title(f"{name} training (steps={len(rows)})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True
