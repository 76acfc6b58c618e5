"""Signalling a command's process group from a test, at the moment it says it has reached."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def signalled(args: list[str], env: dict, steps: list[tuple[bytes, int]]) -> tuple[int, float, bytes, bytes]:
    """Run `python -c *args` in a process group of its own; for each (line, sig) of `steps`, wait for its next
    line on stdout, which must be `line`, then send `sig` to the group. Returns its exit status, the seconds
    from the last signal to its exit (10 at the most), its stdout and its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
    )
    try:
        for line, sig in steps:
            assert proc.stdout.readline() == line
            os.killpg(proc.pid, sig)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, took, out, err
