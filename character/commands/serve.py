"""`character serve`: an OpenAI-compatible endpoint for a checkpoint (the server is character.serve)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from character.commands import interrupt
from character.commands.chat import _CKPT, _check_early
from character.commands.workspace import WORKDIR, settings_for, use_threads
from character.errors import UserError


def serve(
    checkpoint: str = _CKPT,
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, help="port to listen on (0: any free one)"),
    model_name: Optional[str] = typer.Option(None, help="the model id clients ask for (default: CHECKPOINT)"),
    log_requests: bool = typer.Option(False, "--log-requests", help="one line per request on stderr"),
    workdir: Optional[Path] = WORKDIR,
) -> None:
    """Serve a checkpoint at /v1/chat/completions and /v1/models, as the OpenAI API does; Ctrl-C stops."""
    _check_early(checkpoint)
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, not {port}")
    from character.chat import check_checkpoint, open_checkpoint
    from character.serve import ChatServer, Endpoint

    settings = settings_for(workdir)
    check_checkpoint(checkpoint, settings)
    try:  # the port first: a busy one is told before a model is loaded
        server = ChatServer(host, port, log=(lambda line: print(line, file=sys.stderr)) if log_requests else None)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        use_threads(settings)
        server.endpoint = Endpoint(open_checkpoint(checkpoint, settings), model_name or checkpoint)
        typer.echo(f"serving {model_name or checkpoint} at {server.url} (Ctrl-C stops)")
        server.serve_forever()
    except KeyboardInterrupt:
        if interrupt.received() not in (None, signal.SIGINT):  # SIGTERM stops it like any command
            raise
        interrupt.handled()  # Ctrl-C is how a server is stopped: quietly
    finally:
        server.server_close()
