"""`character tinker`: the Tinker service."""

from __future__ import annotations

from typing import Optional

import typer

from character.commands.workspace import settings_for

app = typer.Typer(no_args_is_help=True, help="The Tinker service (key: TINKER_API_KEY or a Prefect Secret).")


@app.command("models")
def tinker_models(
    timeout: Optional[float] = typer.Option(None, help="seconds to wait for Tinker (env CHARACTER_TINKER_TIMEOUT_S)"),
) -> None:
    """The models Tinker serves: name, context length, trainable, sampleable, and which can teach or judge
    (teacher: a chat model at least 4x the configured student's size; judge: a chat model of 30B or more)."""
    from character.backend.tinker import TinkerService, model_roles

    settings = settings_for(None)
    service = TinkerService(settings, timeout_s=timeout)
    models = service.list_models()
    student = settings.base_model if settings.base_model != "tiny" else settings.tinker_base_model
    flag = {True: "yes", False: "no", None: "?"}
    typer.echo(f"{'model':<48} {'context':>8}  train  sample  can serve as (student {student})")
    for m in models:
        roles = ", ".join(model_roles(m, student)) or "-"
        if m.model_name == (settings.teacher_model or settings.tinker_teacher_model):
            roles += " (default teacher)"
        typer.echo(
            f"{m.model_name:<48} {m.max_context_length or '?':>8}  {flag[m.trainable]:<5}  "
            f"{flag[m.sampleable]:<6}  {roles}"
        )
