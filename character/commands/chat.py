"""`character chat` and `character sample`: talk to a checkpoint, or take answers to one prompt."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from character.commands import interrupt
from character.commands.workspace import WORKDIR, settings_for, use_threads
from character.errors import UserError

_CKPT = typer.Argument(..., help="a local adapter or model folder, a tinker:// path, 'base' or 'tiny'")
_SYSTEM = typer.Option(None, help="system prompt for the conversation")
_TEMPERATURE = typer.Option(0.7, help="sampling temperature (0: greedy)")
_MAX_NEW_TOKENS = typer.Option(512, help="length limit of each answer, in tokens")


def _check_early(checkpoint: str) -> None:
    """A local checkpoint that is not there is refused before the model libraries load (seconds)."""
    if not checkpoint.startswith("tinker://") and checkpoint not in ("base", "tiny"):
        from character.storage import checkpoint_folder

        checkpoint_folder(checkpoint)


def _conversation(checkpoint: str, settings, system: str | None, temperature: float, max_new_tokens: int):
    """The checkpoint opened (a model loaded here, or a Tinker sampler) as a conversation."""
    from character.chat import Conversation, open_checkpoint

    return Conversation(
        open_checkpoint(checkpoint, settings),
        system=system,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=settings.seed,
    )


def chat(
    checkpoint: str = _CKPT,
    system: Optional[str] = _SYSTEM,
    temperature: float = _TEMPERATURE,
    max_new_tokens: int = _MAX_NEW_TOKENS,
    workdir: Optional[Path] = WORKDIR,
) -> None:
    """Talk to a checkpoint. /reset forgets the conversation, /exit leaves; a script can be piped in."""
    _check_early(checkpoint)
    from character.chat import check_checkpoint, run_script

    settings = settings_for(workdir)
    check_checkpoint(checkpoint, settings)  # key / folder, before any model is loaded
    use_threads(settings)
    conv = _conversation(checkpoint, settings, system, temperature, max_new_tokens)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"chatting with {checkpoint} (/reset forgets, /exit leaves)")

    def prompt() -> None:
        print("> ", end="", flush=True)

    try:
        run_script(conv, sys.stdin, typer.echo, prompt if interactive else None)
    except EOFError:
        typer.echo("")
    except KeyboardInterrupt:
        if interrupt.received() not in (None, signal.SIGINT):  # SIGTERM stops it like any command
            raise
        interrupt.handled()  # Ctrl-C leaves quietly, as /exit does
        typer.echo("")


def sample(
    checkpoint: str = _CKPT,
    prompt: str = typer.Option(..., help="the user message"),
    n: int = typer.Option(1, "-n", help="how many answers"),
    system: Optional[str] = _SYSTEM,
    temperature: float = _TEMPERATURE,
    max_new_tokens: int = _MAX_NEW_TOKENS,
    as_json: bool = typer.Option(False, "--json", help="one JSON line: checkpoint, prompt and answers"),
    workdir: Optional[Path] = WORKDIR,
) -> None:
    """Answers to one prompt from a checkpoint."""
    _check_early(checkpoint)
    if n < 1:
        raise UserError(f"-n must be at least 1, not {n}")
    from character.chat import check_checkpoint

    settings = settings_for(workdir)
    check_checkpoint(checkpoint, settings)
    use_threads(settings)
    conv = _conversation(checkpoint, settings, system, temperature, max_new_tokens)
    answers = conv.sample(prompt, n)
    if as_json:
        typer.echo(json.dumps({"checkpoint": checkpoint, "system": system, "prompt": prompt, "answers": answers}))
    else:
        for i, a in enumerate(answers):
            typer.echo(("" if i == 0 else "---\n") + a)
