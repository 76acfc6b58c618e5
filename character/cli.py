"""The `character` command line. Bad input: one line `error: ...` on stderr, exit code 2.

The commands are in character.commands, one module per group; this module assembles them and turns
every error of bad input into that one line.
"""

from __future__ import annotations

import os
import sys

import typer

from character.commands import build, chat, evaluation, interrupt, personas, plan, serve, tinker, tiny, weights
from character.errors import UserError
from character.terminal import quiet_libraries

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train language models to have a chosen character (Open Character Training).",
)
app.add_typer(personas.app, name="personas")
app.command()(build.pipeline)
app.command("plan")(plan.plan)
app.add_typer(build.checkpoints_app, name="checkpoints")
app.command()(build.generate)
app.add_typer(tinker.app, name="tinker")
app.add_typer(tiny.app, name="tiny")
app.command()(weights.merge)
app.command()(weights.fold)
app.command("eval")(evaluation.eval_command)
app.command()(chat.chat)
app.command()(chat.sample)
app.command()(serve.serve)


def _click_exceptions():
    try:  # recent typer vendors its own click
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions
    return exceptions


def _fail(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


# Prefect settings the command line needs, unless the user set them: analytics off (on a busy
# machine its SQLite writes race the API's and print tracebacks), and a start-up wait that a
# 2-core machine can meet (Prefect's default 20 s is not always enough).
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def main() -> None:
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)  # before anything imports prefect
    quiet_libraries()  # and no third-party progress bars, before transformers is imported
    exc = _click_exceptions()
    try:
        interrupt.install()  # Ctrl-C and SIGTERM unwind the command, which then ends with one line below
        code = app(standalone_mode=False)
    except KeyboardInterrupt:  # typer turns it into exit code 130 (older ones: Abort, below)
        code = 130
    except UserError as e:
        _fail(str(e))
    except exc.NoArgsIsHelpError as e:  # `character` or a command group alone: its help
        e.show()
        sys.exit(e.exit_code)
    except exc.ClickException as e:  # a bad option or argument: one line, like any other bad input
        _fail(f"{e.format_message()} (see --help)")
    except typer.Abort:
        if not interrupt.received():
            print("Aborted!", file=sys.stderr)
            sys.exit(1)
    interrupt.finishing()  # from here on a signal exits at once: nothing is left to unwind
    if interrupt.received():
        interrupt.exit()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
