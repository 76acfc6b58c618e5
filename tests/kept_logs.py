"""Everything a run logs, kept for a test to search (for a secret, say): every record at DEBUG and up that
reaches the root, `prefect` or `character` logger while the block runs, formatted "name LEVEL message"."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def kept_logs() -> Iterator[list[str]]:
    """Yields the list the records are appended to; the loggers' handlers and levels are put back after."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(), logging.getLogger("prefect"), logging.getLogger("character")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
