"""The cross-persona evaluation as a Prefect task: call the core, publish its table and report."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from character.evaluation.cross_persona import CrossOptions, evaluate_personas, headline
from character.evaluation.cross_report import summary_rows


@task(name="cross-persona-eval")
def cross_persona_eval(builds: list[str], options: CrossOptions) -> dict:
    """Which persona each build's models' answers are classified as; returns the headline figures."""
    result = evaluate_personas(builds, options)
    publish_cross_persona(result)
    return headline(result) | {"report": result["report"]["markdown"]}


def publish_cross_persona(result: dict) -> None:
    personas = ", ".join(result["personas"])
    create_table_artifact(
        key="cross-persona-evaluation",
        table=[{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in summary_rows(result)],
        description=f"which persona the answers are classified as ({personas}): macro-F1 per model group, "
        f"chance about {1 / len(result['personas']):.3f}",
    )
    report = result["report"]["markdown"]
    create_markdown_artifact(  # the heat map is a data URI: it renders in the UI
        key="cross-persona-evaluation-report",
        markdown=Path(report).read_text(),
        description=f"cross-persona evaluation report ({report})",
    )
    get_run_logger().info("cross-persona evaluation: %s", headline(result))
