"""Starting Prefect's ephemeral API early, while the CLI loads the model libraries.

With no PREFECT_API_URL, the first flow run of a process starts a temporary API server in a
subprocess and waits for it: about 10 s on a 2-core machine, most of a smoke build's overhead.
Started on a thread before torch and transformers are imported, that wait overlaps the imports
the stages need anyway. Prefect reuses the same server (one instance per process); if anything
here is unavailable the flow simply starts the server itself, as before.

Prefect stops that server at exit, but not when the CLI is killed (`kill -9`, OOM): a small
watchdog process then stops it, so no server outlives the command that started it.
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


def watch_server(server_pid: int) -> subprocess.Popen | None:
    """Stop `server_pid` when this process dies, however it dies (Linux: reads /proc)."""
    if not sys.platform.startswith("linux"):
        return None
    proc = subprocess.Popen([sys.executable, "-S", "-c", WATCHDOG, str(os.getpid()), str(server_pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # a Ctrl-C to the CLI's group must not stop it first
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
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED
    except ImportError:  # a Prefect without this internal: let the flow start it
        return lambda: None
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None
    server = SubprocessASGIServer()  # the instance Prefect's client looks up
    failure: list[BaseException] = []

    def start() -> None:
        try:
            with one_start_per_home(Path(PREFECT_HOME.value())):
                server.start()
            if server.server_process is not None:
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
