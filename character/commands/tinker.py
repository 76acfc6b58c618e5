"""`character tinker`: the Tinker service."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from character.commands.workspace import settings_for
from character.errors import UserError

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


@app.command("loopback")
def tinker_loopback(
    port: int = typer.Option(8765, help="port on 127.0.0.1 (0: any free port)"),
    state: Path = typer.Option(
        ..., help="folder for the service's state: checkpoints and registry, kept across restarts"
    ),
    fault_rate: float = typer.Option(0.0, help="share of HTTP exchanges that fail (5xx, 429, 408, 410, resets)"),
    fault_seed: int = typer.Option(0, help="which exchanges fail"),
    stall_rate: float = typer.Option(0.0, help="share of result polls that stall (never answer in time)"),
    stall_seconds: float = typer.Option(600.0, help="how long a stalled poll is held before its connection is reset"),
    echo_key: bool = typer.Option(False, help="echo the API key in error bodies, as a careless service might"),
    model: list[str] = typer.Option(["tiny"], help="a model name to serve (repeatable); all run the embedded tiny"),
) -> None:
    """A loopback Tinker service on 127.0.0.1 for rehearsing a Tinker build offline: the real SDK talks to it,
    the local backend computes on the embedded tiny model. Runs until interrupted."""
    from character.loopback.faults import WireFaults
    from character.loopback.server import Loopback
    from character.settings import Workspace

    if not (0 <= fault_rate < 1 and 0 <= stall_rate < 1):
        raise UserError("--fault-rate and --stall-rate must be in [0, 1)")
    if not 0 <= port < 65536:
        raise UserError(f"--port {port}: not a port number")
    settings = settings_for(None)
    try:
        lb = Loopback(
            state,
            Workspace(settings.workdir).models,
            port=port,
            faults=WireFaults(fault_rate, fault_seed, stall_rate),
            echo_key=echo_key,
            served=tuple(model),
            stall_s=stall_seconds,
        )
    except OSError as e:
        raise UserError(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}") from None
    typer.echo(f"Tinker loopback at {lb.url} serving {', '.join(model)}; state in {state}")
    typer.echo(f"  export TINKER_BASE_URL={lb.url} TINKER_API_KEY=tml-loopback HF_HUB_OFFLINE=1", err=False)
    try:
        lb.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        lb.stop()
        if fault_rate or stall_rate:
            counts = " ".join(f"{k}={v}" for k, v in sorted(lb.faults.injected.items())) or "none"
            typer.echo(f"faults injected: {counts} in {lb.faults.exchanges} exchanges")
