"""`character tiny`: the embedded model's shipped copy and its rebuild from the recipe."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from character.errors import UserError

app = typer.Typer(no_args_is_help=True, help="The embedded model `tiny`: check or rebuild its shipped copy.")


@app.command("check")
def tiny_check() -> None:
    """Whether the shipped model belongs to the current recipe (exit code 1 if not: a first run then
    builds it from the recipe instead of copying it)."""
    from character.backend.tiny import SHIPPED, recipe_digest, shipped_digest

    want, have = recipe_digest(), shipped_digest()
    if have == want:
        typer.echo(f"shipped tiny model matches the recipe (digest {want}): {SHIPPED}")
        return
    typer.echo(f"shipped tiny model is {'missing' if have is None else f'from recipe {have}'}; the recipe is {want}")
    typer.echo("rebuild it: character tiny build --ship")
    raise typer.Exit(1)


@app.command("build")
def tiny_build(
    out: Optional[Path] = typer.Option(None, help="folder to build into (default: the model cache)"),
    ship: bool = typer.Option(False, "--ship", help="also copy the result into the package's shipped folder"),
    device: str = typer.Option("cpu", help="cpu or cuda (a GPU builds a larger recipe in seconds)"),
) -> None:
    """Build the tiny model from its recipe (deterministic on a given thread count), whatever is cached
    or shipped."""
    from character.backend.tiny import build_tiny_model, recipe_digest
    from character.backend.tiny import ship as ship_model
    from character.settings import model_cache

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device!r}: use cpu or cuda")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device here")
    target = out or model_cache() / f"tiny-{recipe_digest()}"
    start = time.monotonic()
    build_tiny_model(target, device=device)
    typer.echo(f"built {target} in {time.monotonic() - start:.0f} s")
    if ship:
        typer.echo(f"shipped: {ship_model(target)}")
