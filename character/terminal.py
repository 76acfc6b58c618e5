"""The command line's two streams: stdout carries only a command's result, everything else goes to stderr.

`character pipeline --json | jq` must see one JSON line, whatever Prefect, the libraries or the
ephemeral server's subprocess print while the build runs: during the run both sys.stdout and file
descriptor 1 (inherited by subprocesses) point at stderr, and the result is written to the real stdout
afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

# Third-party progress bars (transformers' "Writing model shards", the hub's downloads, datasets' maps) would
# draw over our own; they are off unless the user asks for them. Set before those libraries are imported.
QUIET_LIBRARIES = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_libraries() -> None:
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """For the block, whatever is written to stdout (by Python code or by a child process) goes to stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (a closed stdout): only Python's stream is moved
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    old = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = old
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
