"""Making one backend call again after a transient failure.

Retries live at two levels. Here, per call: a sampling request, a forward/backward, an optimizer
step or a save that failed transiently is made again, alone, so a flaky service costs one call,
not a stage. Above, per stage: the Prefect tasks retry a stage that still failed (or failed where
nothing retries per call, e.g. creating a client); a stage resumes from what it saved.

A transient error is taken to mean the call had no effect, so making it again is exact. Calls are
awaited in the order they were submitted, so a call that failed is made again before any later
call's result is used.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from character.backend.errors import is_transient

ATTEMPTS = 5
BACKOFF_S = 1.0  # wait before the 2nd attempt; doubles after each failure


def retry_transient(call: Callable[[], Any], attempts: int = ATTEMPTS) -> Any:
    """`call()`, made again on a transient error (up to `attempts` times in all); fatal errors raise at once."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - classification decides
            if not is_transient(e) or attempt == attempts - 1:
                raise
            time.sleep(BACKOFF_S * 2**attempt)


class Call:
    """A backend call submitted now and awaited later. A transient failure, at submission or when the
    result is awaited, makes the call again (submit and wait, this call only)."""

    def __init__(self, submit: Callable[[], Any]):
        self._submit = submit
        try:
            self._future = submit()
        except Exception as e:  # noqa: BLE001
            if not is_transient(e):
                raise
            self._future = None  # submitted again when the result is needed

    def result(self) -> Any:
        if not hasattr(self, "_value"):
            self._value = self._wait()
        return self._value

    def _wait(self) -> Any:
        if self._future is not None:
            try:
                return self._future.result()
            except Exception as e:  # noqa: BLE001
                if not is_transient(e):
                    raise
        return retry_transient(lambda: self._submit().result())
