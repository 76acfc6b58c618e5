"""`character personas`: list, show and validate constitutions."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from character.errors import UserError


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


app = typer.Typer(no_args_is_help=True, help="List, show and validate constitutions.")


@app.command("list")
def personas_list() -> None:
    """The shipped personas."""
    from character.persona.constitution import load_constitution, shipped_personas

    for name in shipped_personas():
        c = load_constitution(name)
        typer.echo(f"{name:<16} {_count(len(c.traits), 'trait')}  {c.traits[0].trait}")


@app.command("show")
def personas_show(name: str = typer.Argument(..., help="persona name or constitution file")) -> None:
    """A constitution's traits and example questions."""
    from character.persona.constitution import load_constitution

    c = load_constitution(name)
    typer.echo(f"# {c.name} ({c.source}, {_count(len(c.traits), 'trait')})")
    for i, t in enumerate(c.traits, 1):
        typer.echo(f"{i}. {t.trait}")
        for q in t.questions:
            typer.echo(f"     - {q}")


@app.command("validate")
def personas_validate(path: Path = typer.Argument(..., help="constitution .json file")) -> None:
    """Check a constitution file: every problem (up to 20), each naming the entry (from 1) and the field."""
    from character.persona.constitution import check_constitution

    if not path.is_file():
        raise UserError(f"{path}: constitution file not found")
    c, problems = check_constitution(str(path))
    if problems:
        for p in problems:
            print(f"error: {' '.join(p.split())}", file=sys.stderr)
        sys.exit(2)
    typer.echo(f"ok: {path}: {_count(len(c.traits), 'trait')}, {_count(len(c.questions), 'question')}")
