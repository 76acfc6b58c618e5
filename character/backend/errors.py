"""Which backend errors are worth retrying. Prefect's retry condition asks this, nothing else."""

from __future__ import annotations

import tinker
from tinker.types import RequestErrorCategory

_TRANSIENT = (
    tinker.APIConnectionError,  # includes APITimeoutError
    tinker.RateLimitError,
    tinker.InternalServerError,
    tinker.ConflictError,
)


class TransientBackendError(Exception):
    """A failure that may succeed if the same call is made again (used by our own backends)."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (TransientBackendError, *_TRANSIENT)):
        return True
    if isinstance(exc, tinker.RequestFailedError):
        return exc.category != RequestErrorCategory.User
    return False
