"""Making one backend call again after a transient failure.

Retries live at three levels. Here, per call: a sampling or log-prob request (which changes no
state) or a client creation that failed transiently is made again, alone, so a flaky service costs
one call, not a stage. Training calls are never made again on the same client (on Tinker a failed
call may leave later calls run without it, and a failed custom loss poisons the client): the
training loop (`character.train.loop`) resumes on a fresh client from the last saved state instead.
Above both, the Prefect tasks retry a stage that still failed; a stage resumes from what it saved.

A transient error is taken to mean the call had no effect, so making it again is exact. A result that
does not come within the backend's bound (Tinker: CHARACTER_TINKER_RESULT_TIMEOUT_S) is such an error.
Each retry is logged on one line; a backend's errors are already redacted (no key in them).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from character.backend.errors import is_transient

log = logging.getLogger(__name__)

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
            log.info(
                "transient failure, trying again (attempt %d of %d): %s: %s",
                attempt + 2,
                attempts,
                type(e).__name__,
                " ".join(str(e).split()),
            )
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
