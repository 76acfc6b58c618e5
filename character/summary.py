"""Human-readable summaries of a build: the markdown and tables the Prefect UI shows."""

from __future__ import annotations


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def build_summary_markdown(record: dict, checkpoints: dict[str, str]) -> str:
    """Stages with durations and key numbers, then the checkpoint URIs, then evaluation if any."""
    stages = record.get("stages", {})
    lines = [f"# {record.get('persona', '?')} build `{record.get('build_id', '?')}`", "",
             "| stage | seconds | result |", "|---|---|---|"]
    for name, st in stages.items():
        if name == "eval":
            continue
        key = {k: st[k] for k in ("rows", "steps", "questions", "reflections", "interactions", "method", "rank")
               if k in st}
        dropped = st.get("dropped")
        note = ", ".join(f"{k} {v}" for k, v in key.items())
        if dropped:
            note += f"; dropped {dropped}"
        lines.append(f"| {name} | {_fmt(st.get('seconds'))} | {note} |")
    lines += ["", "| checkpoint | URI |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in checkpoints.items()]
    report = (stages.get("eval") or {}).get("report") or {}
    if report.get("markdown"):
        lines += ["", f"Evaluation report: `{report['markdown']}`"]
    return "\n".join(lines) + "\n"


def evaluation_rows(result: dict) -> list[dict]:
    """One row per evaluated model (the base first) with its metrics, for a table artifact."""
    rows = []
    for label, metrics in result.get("checkpoints", {}).items():
        rows.append({"model": label, **{k: _fmt(v) for k, v in metrics.items() if not isinstance(v, (dict, list))}})
    return rows
