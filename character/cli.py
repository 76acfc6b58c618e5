"""The `character` command line. Bad input: one line `error: ...` on stderr, exit code 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from character.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train language models to have a chosen character (Open Character Training).")
personas_app = typer.Typer(no_args_is_help=True, help="List, show and validate constitutions.")
app.add_typer(personas_app, name="personas")


def _settings(workdir: Optional[Path]):
    from character.settings import Settings

    return Settings(**({"workdir": workdir} if workdir else {}))


@personas_app.command("list")
def personas_list() -> None:
    """The shipped personas."""
    from character.constitution import load_constitution, shipped_personas

    for name in shipped_personas():
        c = load_constitution(name)
        typer.echo(f"{name:<16} {len(c.traits)} traits  {c.traits[0].trait}")


@personas_app.command("show")
def personas_show(name: str = typer.Argument(..., help="persona name or constitution file")) -> None:
    """A constitution's traits and example questions."""
    from character.constitution import load_constitution

    c = load_constitution(name)
    typer.echo(f"# {c.name} ({c.source}, {len(c.traits)} traits)")
    for i, t in enumerate(c.traits, 1):
        typer.echo(f"{i}. {t.trait}")
        for q in t.questions:
            typer.echo(f"     - {q}")


@personas_app.command("validate")
def personas_validate(path: Path = typer.Argument(..., help="constitution .json file")) -> None:
    """Check a constitution file; errors name the entry and the field."""
    from character.constitution import load_constitution

    if not path.is_file():
        raise UserError(f"{path}: constitution file not found")
    c = load_constitution(str(path))
    typer.echo(f"ok: {path}: {len(c.traits)} traits, {len(c.questions)} questions")


@app.command()
def pipeline(
    persona: str = typer.Argument(..., help="shipped persona name or path to a constitution .json"),
    scale: str = typer.Option("smoke", help="smoke | mini | half | full"),
    backend: Optional[str] = typer.Option(None, help="local (default) | tinker"),
    base_model: Optional[str] = typer.Option(None, help="'tiny' (built in) or a local Hugging Face model folder"),
    teacher_model: Optional[str] = typer.Option(None, help="teacher for distillation; defaults to the base model"),
    workdir: Optional[Path] = typer.Option(None, help="workspace folder (env CHARACTER_WORKDIR)"),
    build_id: Optional[str] = typer.Option(None, help="name of this build (default: a timestamp)"),
    seed: Optional[int] = typer.Option(None),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line describing the result"),
) -> None:
    """Run the whole pipeline for one persona as a Prefect flow (sequential mode)."""
    from pydantic import ValidationError

    from character.pipeline import PipelineConfig, validate

    settings = _settings(workdir)
    try:
        cfg = PipelineConfig.from_settings(
            settings, persona=persona, scale=scale, backend=backend, base_model=base_model,
            teacher_model=teacher_model, build_id=build_id, seed=seed,
            workdir=str(Path(settings.workdir).expanduser().resolve()),
        )
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']}") from None
    validate(cfg)  # before Prefect starts or any model loads

    # The ephemeral Prefect server can take longer than the default 20 s to start on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from flows.sequential import sequential

    result = sequential(cfg)
    for stage, uri in result.checkpoints.items():
        typer.echo(f"{stage:>6}: {uri}")
    if as_json:
        typer.echo(json.dumps(result.model_dump(include={"persona", "mode", "base_model", "workdir",
                                                         "checkpoints"})))


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
