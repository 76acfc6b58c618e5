"""The evaluation report: report.md (self-contained: plots embedded as data URIs, so it renders in
the Prefect UI as well as on disk), report.html for a browser, and the plots as PNG files.

The text is character.evaluation.report_markdown's, the plots character.evaluation.report_plots'. Plots
need matplotlib; without it the report is written without them and says so.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from character.evaluation.report_markdown import REVEALED_PLOT, metrics_table, render_markdown
from character.evaluation.report_sections import COHERENCE_PLOT
from character.storage import write_text_atomic


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def html_page(md_text: str, title: str) -> str | None:
    try:
        import markdown  # installed with Prefect (via apprise); optional here
    except ImportError:
        return None
    body = markdown.markdown(md_text, extensions=["tables"])
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:70em;margin:2em auto;"
        "padding:0 1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em}"
        "blockquote{border-left:3px solid #ccc;margin:.3em 0 1em;padding:.2em 1em;color:#333}"
        "img{max-width:100%}</style></head><body>" + body + "</body></html>\n"
    )


def write_report(result: dict, out: Path, training_dirs: dict[str, Path] | None = None) -> dict:
    """Write report.md (+ report.html, PNG plots) into `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    note = None
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
    except ImportError:
        note = "(plots skipped: matplotlib is not installed)"
    else:
        from character.evaluation.report_plots import plot_coherence, plot_metrics, plot_revealed, plot_training

        if plot_metrics(result, out / "eval_metrics.png"):
            files["evaluation metrics"] = out / "eval_metrics.png"
        if training_dirs and plot_training(training_dirs, out / "training_curves.png"):
            files["training curves"] = out / "training_curves.png"
        if plot_revealed(result, out / "revealed_preferences.png"):
            files[REVEALED_PLOT] = out / "revealed_preferences.png"
        if plot_coherence(result, out / "coherence.png"):
            files[COHERENCE_PLOT] = out / "coherence.png"
    md_text = render_markdown(result, {t: data_uri(p) for t, p in files.items()}, note)
    md = out / "report.md"
    write_text_atomic(md, md_text)
    paths = {
        "dir": str(out),
        "markdown": str(md),
        "plots": [str(p) for p in files.values()],
        "table": metrics_table(result),
    }
    page = html_page(md_text, f"Evaluation: {result['persona']}")
    if page:
        write_text_atomic(out / "report.html", page)
        paths["html"] = str(out / "report.html")
    return paths
