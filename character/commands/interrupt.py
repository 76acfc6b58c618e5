"""Ctrl-C and SIGTERM: a command stops at its current step and says, in one line, how to resume.

`install()` (at the start of `character.cli.main`) makes both signals raise KeyboardInterrupt in the
main thread, so SIGTERM from `timeout`, systemd or a container runtime unwinds exactly like Ctrl-C:
the build lock is released, Prefect marks the run Crashed, the temporary server is stopped. The CLI
then prints `stop_line()` and exits 128 + the signal (130, 143). A second signal while stopping
exits at once (`os._exit`), with the same line and status; the temporary server's watchdog then
stops the server. Commands name what they run with `describe` (a build: `resumable`), else the line
names the command and repeats it.
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
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

_received: list[int] = []  # the signals seen, in order
_what: dict[str, object] = {"what": None, "argv": None, "stage": None, "finishing": False}


def _handler(signum: int, frame) -> None:
    if _what.pop("again", None):  # not a new signal: the first one's KeyboardInterrupt, raised again
        raise KeyboardInterrupt
    _received.append(signum)
    if len(_received) > 1 or _what["finishing"]:  # already stopping, or nothing left to unwind
        _force_exit()
    raise KeyboardInterrupt


def _raise_again(main: int) -> None:
    time.sleep(0.01)
    signal.pthread_kill(main, signal.SIGINT)  # _handler, in the main thread (waking it if it waits)


def _unraisable(hook_args) -> None:
    """A KeyboardInterrupt raised where Python ignores exceptions (a weakref callback during an import,
    a __del__) would be lost, and the command would run on: raise it again in the main thread."""
    exc = hook_args.exc_value
    prefects = type(exc).__name__ == "TerminationSignal"  # Prefect's SIGTERM handler raised it, not ours
    if prefects:
        _received.append(signal.SIGTERM)
        if len(_received) > 1:
            _force_exit()
    if (prefects or isinstance(exc, KeyboardInterrupt) and _received) and not _what["finishing"]:
        _what["again"] = True
        _thread.start_new_thread(
            _raise_again, (threading.main_thread().ident,)
        )  # lands after this hook has returned (else: here again)
        return
    sys.__unraisablehook__(hook_args)


def _force_exit() -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.write(stop_line(forced=True) + "\n")
        sys.stderr.flush()
    os._exit(exit_status())


def exit() -> None:  # noqa: A001 - the command's end, as sys.exit is
    """The command has unwound: print the stop line and exit 128 + the signal. The exit hooks run,
    then the process ends without the interpreter's teardown, which with torch, transformers and
    Prefect loaded takes seconds on a busy machine (measured: 6 to 9 s on 2 cores) and frees
    nothing that outlives the process."""
    finishing()
    print(stop_line(), file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        run_hooks = getattr(atexit, "_run_exitfuncs", None)
        if run_hooks is not None:
            run_hooks()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(exit_status())


def install() -> None:
    """Both signals raise KeyboardInterrupt in the main thread (Prefect's flow engine swaps in its own
    SIGTERM handler while a flow runs; on SIGTERM it marks the run Crashed and re-sends it to this one)."""
    for signum in SIGNALS:
        signal.signal(signum, _handler)
    sys.unraisablehook = _unraisable


def finishing() -> None:
    """The command is over: a signal now exits at once (raised in exit hooks, it would print a traceback)."""
    _what["finishing"] = True


def received() -> int | None:
    """The signal that is stopping this command (the first one), if any."""
    return _received[0] if _received else None


def handled() -> None:
    """The command dealt with the interrupt itself (chat at its prompt): exit as usual."""
    _received.clear()


def exit_status() -> int:
    return 128 + (received() or signal.SIGINT)


def describe(what: str, argv: list[str] | None = None) -> None:
    """Name what this command runs, and the arguments (after the program) that resume it."""
    _what.update(what=what, argv=argv)


@contextlib.contextmanager
def resumable(cfg, command: str) -> Iterator[None]:
    """A build: the stop line names it, the stage it was in, and its command with `--build-id`."""
    from character import progress

    describe(f"{command} {cfg.constitution().name}/{cfg.build_id}", with_build_id(sys.argv[1:], cfg.build_id))

    def track(ev: progress.Event) -> None:
        if ev.message is None:
            _what["stage"] = None if ev.finished else ev.stage

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
    args = _what["argv"] if _what["argv"] is not None else sys.argv[1:]
    what = _what["what"] or (args[0] if args else "character")
    if _what["stage"]:
        what += f" during {_what['stage']}"
    how = _NAMES.get(received() or signal.SIGINT, "signal")
    if forced:
        how = f"{_NAMES.get(_received[-1], 'signal') if _received else how}, at once"
    verb = "resume with" if _what["what"] else "run again with"
    return f"stopped: {what} ({how}); {verb}: {program()} {shlex.join(args)}"
