"""The cross-persona report: report.md (the heat maps embedded, so it renders in the Prefect UI),
report.html, the heat-map PNG and metrics.json with every answer."""

from __future__ import annotations

from pathlib import Path

from character.evaluation.report import data_uri, html_page
from character.storage import write_json_atomic, write_text_atomic

HEATMAP = "confusion matrices"
_KIND = {"plain": "no system prompt", "robust": "under break-character instructions"}


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def summary_rows(result: dict) -> list[dict]:
    """One row per model group and kind, then the classifier's own: what a table artifact shows."""
    clf = result["classifier"]
    rows = [
        {"models": "teacher answers (held out)", "answers": "with the constitution",
         "macro_f1": clf["heldout_macro_f1"], "accuracy": (clf["heldout"] or {}).get("accuracy"),
         "n": (clf["heldout"] or {}).get("n", 0)},
    ]  # fmt: skip
    for group, kinds in result["groups"].items():
        for kind, rep in kinds.items():
            rows.append(
                {
                    "models": group,
                    "answers": _KIND[kind],
                    "macro_f1": rep["macro_f1"],
                    "accuracy": rep["accuracy"],
                    "n": rep["n"],
                }
            )
    return rows


def cross_headline(figures: dict) -> str:
    """The final models' macro-F1 against the base's (and the prompted ceiling), from `headline`'s figures."""
    out = f"final macro-F1 {_f(figures.get('final_macro_f1'))} against base {_f(figures.get('base_macro_f1'))}"
    if figures.get("prompted_macro_f1") is not None:
        out += f" (prompted {_f(figures['prompted_macro_f1'])})"
    return out


def _per_persona_table(rep: dict) -> list[str]:
    lines = ["| persona | precision | recall | F1 | n |", "|---|---:|---:|---:|---:|"]
    for p, s in rep["per_class"].items():
        lines.append(f"| {p} | {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} | {s['support']} |")
    return lines


def _confusion_table(rep: dict) -> list[str]:
    labels = rep["labels"]
    lines = ["| true \\ classified as | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines += [f"| {t} | " + " | ".join(str(c) for c in row) + " |" for t, row in zip(labels, rep["confusion"])]
    return lines


def render_cross_markdown(result: dict, plot: str | None, note: str | None = None) -> str:
    personas, clf = result["personas"], result["classifier"]
    lines = [
        f"# Cross-persona evaluation: {', '.join(personas)}",
        "",
        f"- base model: `{result['base_model']}`; builds: "
        + ", ".join(f"{p} `{b}`" for p, b in result["builds"].items()),
        f"- classifier: {clf['kind']}, fitted on n={clf['train_n']} teacher answers labelled by persona; "
        f"held-out macro-F1 {_f(clf['heldout_macro_f1'])} (n={(clf['heldout'] or {}).get('n', 0)})",
        f"- prompts every model answers: n={len(result['prompts'])} (held-out prompts of every build), once with "
        "no system prompt and once under a break-character instruction",
        f"- chance level: macro-F1 about {1 / len(personas):.3f} (1 / {len(personas)} personas); the base "
        "model's answers are counted once for each persona, as if it were every persona's model",
        "- prompted: the base model with each persona's teacher system prompt (its constitution), answering "
        "as that persona: the ceiling a trained model aims for",
        *(f"- note: {n}" for n in result.get("notes") or []),
        "",
        "## Which persona the answers are classified as",
        "",
        "| models | answers | macro-F1 | accuracy | n |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['models']} | {r['answers']} | {_f(r['macro_f1'])} | {_f(r['accuracy'])} | {r['n']} |"
        for r in summary_rows(result)
    ]
    if plot:
        lines += ["", f"![{HEATMAP}]({plot})"]
    elif note:
        lines += ["", note]
    sections = [("teacher answers, held out", clf["heldout"])] if clf["heldout"] else []
    sections += [(f"{g}, {_KIND[k]}", rep) for g, kinds in result["groups"].items() for k, rep in kinds.items()]
    for title, rep in sections:
        lines += ["", f"### {title}", ""] + _per_persona_table(rep) + [""] + _confusion_table(rep)
    return "\n".join(lines).rstrip() + "\n"


def plot_confusions(result: dict, path: Path) -> bool:
    """Heat maps of each confusion matrix (rows: true persona, shares of the row), the count in each cell."""
    import matplotlib.pyplot as plt

    panels = [("teacher (held out)", result["classifier"]["heldout"])] if result["classifier"]["heldout"] else []
    panels += [(f"{g}, {k}", rep) for g, kinds in result["groups"].items() for k, rep in kinds.items()]
    labels = result["personas"]
    size = 0.35 * len(labels) + 1.6
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size + 0.4), squeeze=False)
    for ax, (title, rep) in zip(axes[0], panels):
        shares = [[c / (sum(row) or 1) for c in row] for row in rep["confusion"]]
        ax.imshow(shares, vmin=0, vmax=1, cmap="Blues")
        for i, row in enumerate(rep["confusion"]):
            for j, c in enumerate(row):
                if c:
                    ax.text(
                        j,
                        i,
                        str(c),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="black" if shares[i][j] < 0.6 else "white",
                    )
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_title(f"{title}\nmacro-F1 {_f(rep['macro_f1'])}, n={rep['n']}", fontsize=7)
        ax.set_xlabel("classified as", fontsize=6)
    axes[0][0].set_ylabel("true persona", fontsize=6)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=90, format="png")
    tmp.replace(path)
    plt.close(fig)
    return True


def write_cross_report(result: dict, out: Path) -> dict:
    """report.md, report.html, the heat maps and metrics.json in `out`; `result` gains their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot, note = None, None
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        note = "(heat maps skipped: matplotlib is not installed)"
    else:
        if plot_confusions(result, out / "confusion.png"):
            plot = out / "confusion.png"
    md_text = render_cross_markdown(result, data_uri(plot) if plot else None, note)
    write_text_atomic(out / "report.md", md_text)
    result["report"] = {"dir": str(out), "markdown": str(out / "report.md"), "plots": [str(plot)] if plot else []}
    page = html_page(md_text, "Cross-persona evaluation")
    if page:
        write_text_atomic(out / "report.html", page)
        result["report"]["html"] = str(out / "report.html")
    result["report"]["metrics_json"] = str(out / "metrics.json")
    write_json_atomic(out / "metrics.json", result)
    return result
