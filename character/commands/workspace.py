"""The settings every command starts from: the workspace folder (--workdir) over CHARACTER_* variables."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from character.errors import UserError

WORKDIR = typer.Option(None, help="workspace folder (env CHARACTER_WORKDIR)")


def settings_for(workdir: Optional[Path]):
    """Settings with --workdir applied; a bad CHARACTER_* variable is a one-line error naming it."""
    from pydantic import ValidationError

    from character.settings import Settings

    try:
        return Settings(**({"workdir": workdir} if workdir else {}))
    except ValidationError as e:  # a bad CHARACTER_* environment variable
        err = e.errors()[0]
        name = "CHARACTER_" + "_".join(str(x) for x in err["loc"]).upper()
        raise UserError(f"{name}={err.get('input')!r}: {err['msg']}") from None


def use_threads(settings) -> int:
    """Torch's CPU threads for a command that loads a model: CHARACTER_THREADS, else settings.default_threads()."""
    from character.settings import apply_threads, default_threads

    return apply_threads(settings.threads or default_threads())
