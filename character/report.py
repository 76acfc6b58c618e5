"""The evaluation report: a markdown file with the metrics table, plots and side-by-side answers.

Plots need matplotlib; without it the report is written without them and says so.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from character.storage import read_jsonl, write_text_atomic

# (key, column title, format) in table order.
COLUMNS = [
    ("dpo_accuracy", "pref. accuracy", "{:.3f}"),
    ("dpo_margin", "reward margin", "{:+.4f}"),
    ("dpo_reward_chosen", "reward chosen", "{:+.4f}"),
    ("dpo_reward_rejected", "reward rejected", "{:+.4f}"),
    ("introspection_nll", "introspection NLL", "{:.4f}"),
    ("judge_score", "judge (1-10)", "{:.2f}"),
]


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def _cell(text: str) -> str:
    """Markdown table cells hold one line: escape pipes, turn newlines into <br>."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def metrics_table(result: dict) -> list[dict]:
    """One flat row per model: what a Prefect table artifact or a CSV wants."""
    rows = []
    for label, m in result["checkpoints"].items():
        rows.append({"model": label, "kind": m.get("kind"), **{k: m.get(k) for k, _, _ in COLUMNS}})
    return rows


def render_markdown(result: dict, plots: list[str], plot_note: str | None) -> str:
    labels = list(result["checkpoints"])
    cols = [c for c in COLUMNS if any(result["checkpoints"][lb].get(c[0]) is not None for lb in labels)]
    d = result["data"]
    lines = [f"# Evaluation: {result['persona']}", ""]
    lines.append(f"- base model (DPO reference): `{result['base_model']}`; beta {result['beta']}")
    held = {True: "held out", False: "**training data, not held out**", None: "file given"}
    if d.get("dpo"):
        lines.append(f"- DPO pairs: {d['dpo_pairs']} from `{d['dpo']}` ({held[d.get('dpo_held_out')]})")
    if d.get("introspection"):
        lines.append(f"- introspection: {d['introspection_rows']} conversations from `{d['introspection']}` "
                     f"({held[d.get('introspection_held_out')]})")
    if d.get("judge_model"):
        lines.append(f"- judge: `{d['judge_model']}` (raw judge answers are in metrics.json)")
    lines += ["", "## Metrics", ""]
    lines.append("| model | kind | " + " | ".join(t for _, t, _ in cols) + " |")
    lines.append("|---|---|" + "---:|" * len(cols))
    for lb in labels:
        m = result["checkpoints"][lb]
        lines.append(f"| {_cell(lb)} | {m.get('kind', '')} | "
                     + " | ".join(_fmt(m.get(k), f) for k, _, f in cols) + " |")
    lines.append("")
    lines.append("Reward margin: mean over pairs of beta x [(log p - log p_base)(chosen) - (same)(rejected)]; "
                 "accuracy: share of pairs with a positive margin. NLL: mean per assistant token.")
    if plots or plot_note:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
        if plot_note:
            lines.append(plot_note)
    lines += ["", "## Generations", "", "| prompt | " + " | ".join(_cell(lb) for lb in labels) + " |",
              "|---|" + "---|" * len(labels)]
    for g in result["generations"]:
        cells = []
        for lb in labels:
            a = g["answers"][lb]
            text = _cell(a["text"])
            if "judge_score" in a:
                text += f"<br>*judge: {_fmt(a['judge_score'], '{:g}')}*"
            cells.append(text)
        lines.append(f"| {_cell(g['prompt'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)


def _plot_bars(result: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    labels = list(result["checkpoints"])
    cols = [c for c in COLUMNS if c[0] != "dpo_reward_chosen" and c[0] != "dpo_reward_rejected"
            and any(result["checkpoints"][lb].get(c[0]) is not None for lb in labels)]
    if not cols:
        return False
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2), squeeze=False)
    for ax, (key, title, _) in zip(axes[0], cols):
        vals = [result["checkpoints"][lb].get(key) for lb in labels]
        xs = [i for i, v in enumerate(vals) if v is not None]
        ax.bar(xs, [vals[i] for i in xs], color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="black", linewidth=0.5)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def _plot_training(training: dict[str, Path], path: Path) -> bool:
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
                ax.plot(steps, ys, label=key, linewidth=1)
        ax.set_title(f"{name} training", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def write_report(result: dict, out: Path, training_dirs: dict[str, Path] | None = None) -> dict:
    """Write report.md (and PNG plots when matplotlib is available) into `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    note = None
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
    except ImportError:
        note = "(plots skipped: matplotlib is not installed)"
    else:
        if _plot_bars(result, out / "eval_metrics.png"):
            plots.append(str(out / "eval_metrics.png"))
        if training_dirs and _plot_training(training_dirs, out / "training_curves.png"):
            plots.append(str(out / "training_curves.png"))
    md = out / "report.md"
    write_text_atomic(md, render_markdown(result, plots, note))
    return {"dir": str(out), "markdown": str(md), "plots": plots, "table": metrics_table(result)}
