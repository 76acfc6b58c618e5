"""One writer per build: an exclusive lock held for the whole run of a build.

The lock is `flock` on the build's lock file (`BuildPaths.lock`). The kernel drops it when its owner
exits, however it exits (`kill -9` included), so a dead owner never blocks the next run and no
stale-lock guessing is needed. The file exists only while a run holds it (a killed run leaves it,
unlocked). The file records the owner's pid, host and start time only so that a refused run can say
who holds the build. A second run of a held build fails at once (a `UserError`: `error:` and exit
code 2 on the command line) before it writes anything.

Within one process the lock is re-entrant: the CLI takes it before Prefect starts, and the flow it
runs takes it again (deployment runs, which have no CLI around them, take it there first).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from character.build.paths import BuildPaths
from character.errors import UserError

_held: dict[Path, list] = {}  # lock path -> [fd, depth, folders created], for this process
_guard = threading.Lock()


def _owner(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _acquire(path: Path, label: str) -> None:
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # removed again if left empty
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _owner(fd)
            os.close(fd)
            holder = f"pid {who.get('pid', '?')} on {who.get('host', '?')}"
            since = f" since {who['started'][:19]}Z" if who.get("started") else ""
            raise UserError(
                f"build {label} is held by {holder}{since}: another run is writing it; "
                "wait for that run to finish, or use another --build-id"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have removed the file between our open and our lock: retry
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now(timezone.utc).isoformat()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[path] = [fd, 1, made]


def _release(path: Path, fd: int, made: list[Path]) -> None:
    """Remove the lock file while still holding it (a waiting opener then retries on a fresh file),
    and the folders taking the lock created if nothing else was written there."""
    with contextlib.suppress(OSError):
        path.unlink()
    for d in made:
        with contextlib.suppress(OSError):
            d.rmdir()  # only succeeds when empty
    os.close(fd)  # closing the only descriptor releases the flock


@contextlib.contextmanager
def build_lock(build_dir: Path, label: str) -> Iterator[Path]:
    """Hold the build's lock for the block; raises UserError at once if another process holds it."""
    path = BuildPaths(Path(build_dir)).lock.resolve()
    with _guard:
        if path in _held:
            _held[path][1] += 1
        else:
            _acquire(path, label)
    try:
        yield path
    finally:
        with _guard:
            entry = _held[path]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[path]
                _release(path, entry[0], entry[2])


def holds(build_dir: Path) -> bool:
    """Whether this process holds the build's lock (for checks and tests)."""
    return BuildPaths(Path(build_dir)).lock.resolve() in _held
