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
    """The models Tinker serves: name, context length, trainable, sampleable, which can teach or judge
    (teacher: a chat model at least 4x the configured student's size; judge: a chat model of 30B or more),
    whether a paper-mode merge of its adapters is supported here, its price per million tokens, and the
    renderer a build would use for it ("refused": a family a build cannot use, never offered as a role)."""
    from character.backend.tinker import TinkerService, model_roles
    from character.backend.tinker_models import merge_supported, renderer_or_refusal
    from character.cost.prices import load_prices

    settings = settings_for(None)
    service = TinkerService(settings, timeout_s=timeout)
    models, prices = service.list_models(), load_prices()
    student = settings.base_model if settings.base_model != "tiny" else settings.tinker_base_model
    teacher = settings.teacher_model or settings.tinker_teacher_model
    flag = {True: "yes", False: "no", None: "?"}
    typer.echo(
        f"{'model':<48} {'context':>8}  train  sample  merge  {'$/M prefill/sample/train':<24}  "
        f"{'renderer':<26}  can serve as (student {student})"
    )
    for m in models:
        roles = ", ".join(model_roles(m, student)) or "-"
        roles += " (default student)" if m.model_name == student else ""
        roles += " (default teacher)" if m.model_name == teacher else ""
        p = prices.price(m.model_name)
        price = "-" if p is None else f"{p.prefill:g}/{p.sample:g}/{p.train:g}"
        renderer = renderer_or_refusal(m.model_name)[0] or "refused"
        typer.echo(
            f"{m.model_name:<48} {m.max_context_length or '?':>8}  {flag[m.trainable]:<5}  "
            f"{flag[m.sampleable]:<6}  {flag[merge_supported(m.model_name)]:<5}  {price:<24}  {renderer:<26}  {roles}"
        )
    missing = [
        f"{what} {name}"
        for what, name in (("student", student), ("teacher", teacher))
        if name not in {m.model_name for m in models}
    ]
    if models and missing:
        typer.echo(f"not served now: {', '.join(missing)} (set CHARACTER_TINKER_BASE_MODEL / _TEACHER_MODEL)")
    for what, name in (("student", student), ("teacher", teacher)):
        if name and (why := renderer_or_refusal(name)[1]):
            typer.echo(f"refused: {what} {why}")
