"""Ctrl-C and SIGTERM: a command stops at its current step and says, in one line, how to resume.

`install()` (at the start of `character.cli.main`) makes both signals raise KeyboardInterrupt in the
main thread, so SIGTERM from `timeout`, systemd or a container runtime unwinds exactly like Ctrl-C:
the build lock is released, Prefect marks the run Crashed, the temporary server is stopped. The CLI
then prints `stop_line()` and exits 128 + the signal (130, 143). A second signal while stopping
exits at once (`os._exit`), with the same line and status; the temporary server's watchdog then
stops the server. An interrupt that Python would drop (raised in a `__del__` or in an import's weakref
callback, where exceptions are ignored) is raised again. Commands name what they run with `describe`
(a build: `resumable`), else the line names the command and repeats it.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@dataclass
class _Stop:
    signals: list[int] = field(default_factory=list)  # those seen, in order; the first one decides
    what: str | None = None  # "build pirate/<id>", set by `describe`
    argv: list[str] | None = None  # the arguments that resume it
    stage: str | None = None  # the progress stage running now
    finishing: bool = False  # the command is over: a signal exits at once
    again: bool = False  # the next SIGINT is the first signal's KeyboardInterrupt, raised again
    previous_hook: Callable = sys.__unraisablehook__


_state = _Stop()


def _handler(signum: int, frame) -> None:
    if _state.again:
        _state.again = False
        raise KeyboardInterrupt
    _state.signals.append(signum)
    if len(_state.signals) > 1 or _state.finishing:  # already stopping, or nothing left to unwind
        _force_exit()
    raise KeyboardInterrupt


def _unraisable(hook_args) -> None:
    """A KeyboardInterrupt raised where Python ignores exceptions (a weakref callback during an import,
    a __del__) would be lost and the command would run on: raise it again in the main thread."""
    exc = hook_args.exc_value
    if type(exc).__name__ == "TerminationSignal":  # Prefect's SIGTERM handler took the signal, not ours
        _state.signals.append(signal.SIGTERM)
        if len(_state.signals) > 1 or _state.finishing:
            _force_exit()
    elif not (isinstance(exc, KeyboardInterrupt) and _state.signals):
        _state.previous_hook(hook_args)
        return
    _state.again = True
    _thread.start_new_thread(_raise_again, (threading.main_thread().ident,))


def _raise_again(main_thread: int) -> None:
    time.sleep(0.01)  # lands once the hook has returned (if not, the hook runs again)
    signal.pthread_kill(main_thread, signal.SIGINT)  # a real signal wakes the main thread if it waits


def _force_exit() -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        _say(stop_line(forced=True))
    os._exit(exit_status())


def _say(line: str) -> None:
    """On a terminal the line replaces a progress bar left open (and the `^C` echoed after it)."""
    lead = "\r\x1b[K" if getattr(sys.stderr, "isatty", lambda: False)() else ""
    sys.stderr.write(f"{lead}{line}\n")
    sys.stderr.flush()


def install() -> None:
    """Both signals raise KeyboardInterrupt in the main thread. (While a flow runs, Prefect's flow
    engine has its own SIGTERM handler: it marks the run Crashed, then sends SIGTERM again, to this one.)"""
    global _state
    if threading.current_thread() is not threading.main_thread():
        return
    hook = sys.unraisablehook if sys.unraisablehook is not _unraisable else _state.previous_hook
    _state = _Stop(previous_hook=hook)
    for signum in SIGNALS:
        signal.signal(signum, _handler)
    sys.unraisablehook = _unraisable


def finishing() -> None:
    """The command is over: a signal now exits at once (raised in exit hooks, it would print a traceback)."""
    _state.finishing = True


def received() -> int | None:
    """The signal that is stopping this command (the first one), if any."""
    return _state.signals[0] if _state.signals else None


def handled() -> None:
    """The command dealt with the interrupt itself (chat at its prompt): exit as usual."""
    _state.signals.clear()


def exit_status() -> int:
    return 128 + (received() or signal.SIGINT)


def exit() -> None:  # noqa: A001 - the command's end, as sys.exit is
    """The command has unwound: print the stop line and exit 128 + the signal. The exit hooks run,
    then the process ends without the interpreter's teardown, which with torch, transformers and
    Prefect loaded takes seconds on a busy machine (6 to 14 s measured on 2 busy cores) and frees
    nothing that outlives the process."""
    finishing()
    _say(stop_line())
    with contextlib.suppress(Exception):
        run_hooks = getattr(atexit, "_run_exitfuncs", None)
        if run_hooks is not None:
            run_hooks()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(exit_status())


def describe(what: str, argv: list[str] | None = None) -> None:
    """Name what this command runs, and the arguments (after the program) that resume it."""
    _state.what, _state.argv = what, argv


@contextlib.contextmanager
def resumable(cfg, command: str) -> Iterator[None]:
    """A build: the stop line names it, the stage it was in, and its command with `--build-id`."""
    from character import progress

    describe(f"{command} {cfg.constitution().name}/{cfg.build_id}", with_build_id(sys.argv[1:], cfg.build_id))

    def track(ev: progress.Event) -> None:
        if ev.message is None:
            _state.stage = None if ev.finished else ev.stage

    with progress.listening(track):
        yield


def with_build_id(args: list[str], build_id: str) -> list[str]:
    """`args` with `--build-id` set to `build_id` (added unless given)."""
    if any(a == "--build-id" or a.startswith("--build-id=") for a in args):
        return list(args)
    return [*args, "--build-id", build_id]


def program() -> str:
    """How the user started this program: `character` if that is what PATH finds, else its path,
    or `python -m character.cli`."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "character":
        found = shutil.which("character")
        same = found is not None and os.path.realpath(found) == os.path.realpath(argv0)
        return "character" if same else argv0
    return f"{shlex.quote(sys.executable)} -m character.cli"


def stop_line(forced: bool = False) -> str:
    """`stopped: <what> [during <stage>] (<signal>); resume with: <command>`, one line."""
    args = _state.argv if _state.argv is not None else sys.argv[1:]
    what = _state.what or (args[0] if args else "character")
    if _state.stage:
        what += f" during {_state.stage}"
    how = _NAMES.get(received() or signal.SIGINT, "a signal")
    if forced and _state.signals:
        how = f"{_NAMES.get(_state.signals[-1], 'a signal')}, at once"
    verb = "resume with" if _state.what else "run again with"
    return f"stopped: {what} ({how}); {verb}: {program()} {shlex.join(args)}"
