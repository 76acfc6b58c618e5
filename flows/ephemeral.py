"""Starting Prefect's ephemeral API early, while the CLI loads the model libraries.

With no PREFECT_API_URL, the first flow run of a process starts a temporary API server in a
subprocess and waits for it: about 10 s on a 2-core machine, most of a smoke build's overhead.
Started on a thread before torch and transformers are imported, that wait overlaps the imports
the stages need anyway. Prefect reuses the same server (one instance per process); if anything
here is unavailable the flow simply starts the server itself, as before.

The server runs in its own session (process group): Ctrl-C in a terminal, or `timeout`/systemd
signalling the CLI's group, reaches the CLI only, which then marks its flow run Crashed through the
still-running server and stops the server itself (`finish_ephemeral_api`). Prefect stops it at exit
too, but not when the CLI is killed (`kill -9`, OOM): a small watchdog process then stops it, so no
server outlives the command that started it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

# Runs as `python -c WATCHDOG <parent pid> <server pid>`: waits for the parent to die, then stops
# the server (only if that pid is still a uvicorn process, in case the pid was reused).
WATCHDOG = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(0.5)
def alive():
    try:
        with open(f"/proc/{server}/cmdline", "rb") as f:
            return b"uvicorn" in f.read()
    except OSError:
        return False
if alive():
    os.kill(server, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        if not alive():
            break
    else:
        os.kill(server, signal.SIGKILL)
"""


_watchdogs: list[subprocess.Popen] = []  # kept referenced for the life of the process


class _OwnSession:
    """`subprocess` as Prefect's server module sees it, but Popen starts a new session: a signal to
    the CLI's process group must not stop the server before the CLI has recorded how its run ended."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    class Popen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "start_new_session": True})


def watch_server(server_pid: int) -> subprocess.Popen | None:
    """Stop `server_pid` when this process dies, however it dies (Linux: reads /proc)."""
    if not sys.platform.startswith("linux"):
        return None
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", WATCHDOG, str(os.getpid()), str(server_pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # a Ctrl-C to the CLI's group must not stop it first
    _watchdogs.append(proc)
    return proc


@contextlib.contextmanager
def one_start_per_home(home: Path):
    """Servers starting at once on one PREFECT_HOME race on its SQLite migration (one prints an
    OperationalError traceback): let them start one after the other. Only the start is serialized."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".character-server-start.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def start_ephemeral_api_early() -> Callable[[], None]:
    """Begin starting the ephemeral API if this process will need one; returns `wait()`."""
    try:
        from prefect.server.api import server as server_module
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED
    except ImportError:  # a Prefect without this internal: let the flow start it
        return lambda: None
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None
    if getattr(server_module, "subprocess", None) is subprocess:
        server_module.subprocess = _OwnSession()  # its only Popen is the server's
    server = SubprocessASGIServer()  # the instance Prefect's client looks up
    failure: list[BaseException] = []
    launch = getattr(server, "_run_uvicorn_command", None)
    if callable(launch):  # watch each server process from the moment it exists, not once it answers

        def launch_watched():
            proc = launch()
            watch_server(proc.pid)
            return proc

        server._run_uvicorn_command = launch_watched

    def start() -> None:
        try:
            with one_start_per_home(Path(PREFECT_HOME.value())):
                server.start()
            if not callable(launch) and server.server_process is not None:
                watch_server(server.server_process.pid)
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            failure.append(e)

    thread = threading.Thread(target=start, name="prefect-ephemeral-api", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failure:
            raise failure[0]

    return wait


def finish_ephemeral_api(timeout: float = 30.0) -> None:
    """Deliver the logs and events still queued, then stop the temporary server, while the process
    is still whole. Left to Prefect's exit hooks, a short run (a rerun where every stage is
    skipped) had the server stopped while events were still being sent: ~150 lines of
    CancelledError tracebacks after the result. Waits at most about `timeout` seconds per queue."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:  # pragma: no cover - a Prefect without these internals: its exit hooks do it
        return
    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout)
        except Exception:  # noqa: BLE001 - delivery is best effort; the run's result is already known
            pass
    server = SubprocessASGIServer()  # the instance the flow used, if any
    if server.running:
        server.stop()
