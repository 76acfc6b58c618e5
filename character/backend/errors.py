"""Which backend errors are worth retrying, and how any of them reads as one line.

Prefect's retry condition asks `is_transient`, nothing else. The Tinker backend turns every error
an SDK call or future raises into one of ours (`character.backend.tinker_clients`): a
`TransientBackendError` or a `BackendFatalError`, each one line (`describe_transient`,
`describe_fatal`), with the key redacted.

What reaches `.result()` in the Tinker SDK (0.38, read from its source): the SDK retries HTTP
faults itself (for ever while polling a result on 5xx, 408 and "try again"; for minutes at
submission), so a caller sees `RequestFailedError` (a failed request, with a category), a
`ValueError` wrapping a 4xx or an unreadable answer, `RetryableException` (HTTP 410: the result
expired; the SDK's own sampling retries treat it as retryable), the "poisoned" `RuntimeError`
chained to the failure that poisoned the training client, the HTTP error classes once submission
retries are spent, and `TimeoutError` when a bounded wait runs out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import tinker
from pydantic import SecretStr
from tinker.lib.retryable_exception import RetryableException
from tinker.types import RequestErrorCategory

from character.errors import UserError

_TRANSIENT = (
    tinker.APIConnectionError,  # includes APITimeoutError
    tinker.RateLimitError,
    tinker.InternalServerError,
    tinker.ConflictError,
    RetryableException,  # HTTP 410 on a result: the request may have run, its result is gone
    TimeoutError,  # a bounded wait ran out (concurrent.futures.TimeoutError is this class)
)
_CANCELLED = (asyncio.CancelledError, concurrent.futures.CancelledError)
_TRANSIENT_STATUS = (408, 409, 410, 429)


class TransientBackendError(Exception):
    """A failure that may succeed if the same call is made again (used by our own backends)."""


class ResultTimeout(TransientBackendError):
    """No result within the configured bound: the service stalled, or is far slower than it should be."""


class BackendFatalError(UserError):
    """A backend refused the work for a reason retrying cannot fix (bad key, model not served, ...)."""


def is_poisoned(exc: BaseException) -> bool:
    """The SDK's RuntimeError for a request on a training client an earlier custom-loss failure poisoned."""
    return isinstance(exc, RuntimeError) and "poisoned" in str(exc)


def is_transient(exc: BaseException) -> bool:
    """True for a transient error, or one that merely wraps a transient cause (e.g. the SDK's RuntimeError
    "this TrainingClient is poisoned", raised from the failure that poisoned it; a client poisoned by a
    cancelled request counts as transient too). Errors we classify as fatal stay fatal whatever they were
    raised from; a `ValueError` wrapping a 4xx is fatal through its cause."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TransientBackendError, *_TRANSIENT)):
            return True
        if isinstance(exc, tinker.RequestFailedError):
            return exc.category != RequestErrorCategory.User
        if isinstance(exc, tinker.APIStatusError):
            return exc.status_code in _TRANSIENT_STATUS or exc.status_code >= 500
        if isinstance(exc, (UserError, tinker.TinkerError)):
            return False
        if is_poisoned(exc) and isinstance(exc.__cause__, _CANCELLED):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def redact(text: str, secret: SecretStr | None) -> str:
    if secret is None:
        return text
    value = secret.get_secret_value()
    return text.replace(value, "***") if value else text


def _server_says(exc: BaseException, secret: SecretStr | None = None, limit: int = 200) -> str:
    # Redacted before it is cut, so that no part of a key survives the cut.
    text = redact(" ".join(str(getattr(exc, "message", None) or exc).split()), secret)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sdk_error(exc: BaseException) -> BaseException:
    """The error that says what happened: the HTTP error a `ValueError` wraps, the failure behind a poisoned
    client; else `exc` itself."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, tinker.TinkerError):
            return cur
        cur = cur.__cause__
    return exc


def describe_transient(exc: BaseException, doing: str = "", secret: SecretStr | None = None) -> str:
    """One line for a transient failure: what failed, and the service's words (redacted)."""
    where = f" while {doing}" if doing else ""
    if isinstance(exc, TimeoutError):
        return f"no result from Tinker{where} within the bound (CHARACTER_TINKER_RESULT_TIMEOUT_S)"
    if is_poisoned(exc):
        cause = exc.__cause__
        why = f" after {_describe_cause(cause, secret)}" if cause is not None else ""
        return f"Tinker training client poisoned{where}{why}"
    said = _server_says(exc, secret)
    status = getattr(exc, "status_code", None)
    code = f" {status}" if isinstance(status, int) else ""
    if isinstance(exc, tinker.RequestFailedError):
        code = f" ({exc.category.value})"
    return f"Tinker failed transiently{where}: {type(exc).__name__}{code}: {said}"


def _describe_cause(cause: BaseException, secret: SecretStr | None) -> str:
    if isinstance(cause, _CANCELLED):
        return "a cancelled request"
    inner = _sdk_error(cause)
    return f"a failed request ({type(inner).__name__}: {_server_says(inner, secret, 120)})"


def describe_fatal(exc: BaseException, doing: str = "", secret: SecretStr | None = None) -> str:
    """One line for a fatal error, whatever its shape: what failed and what to fix. Never includes request
    headers; the key, when given, never appears."""
    where = f" while {doing}" if doing else ""
    if is_poisoned(exc) and exc.__cause__ is not None:
        return f"Tinker training client poisoned{where} after {_describe_cause(exc.__cause__, secret)}"
    exc = _sdk_error(exc)
    if isinstance(exc, tinker.AuthenticationError):
        return (
            f"Tinker rejected the API key (401){where}: set TINKER_API_KEY, or the Prefect Secret block "
            "named by CHARACTER_TINKER_SECRET_BLOCK, to a valid key"
        )
    if isinstance(exc, tinker.BillingError):
        return (
            f"Tinker refused the work for billing reasons (402){where}: set up or top up billing in the Tinker console"
        )
    if isinstance(exc, tinker.PermissionDeniedError):
        return (
            f"the Tinker API key may not do this (403){where}: check the key's organization/project "
            "and that the checkpoint belongs to it"
        )
    said = _server_says(exc, secret)
    if isinstance(exc, tinker.NotFoundError):
        return (
            f"not found on Tinker (404){where}: the model is not served or the tinker:// path does not exist; "
            f"`character tinker models` lists served models ({said})"
        )
    if isinstance(exc, (tinker.BadRequestError, tinker.UnprocessableEntityError)):
        if "model" in said.lower() and any(
            w in said.lower() for w in ("not found", "not supported", "unsupported", "unknown", "not available")
        ):
            return (
                f"the model is not served by Tinker ({exc.status_code}){where}: {said}; "
                "`character tinker models` lists served models"
            )
        return f"Tinker refused the request as invalid ({exc.status_code}){where}: {said}"
    if isinstance(exc, tinker.RequestFailedError):
        return f"Tinker failed the request because of its input{where}: {said}"
    if isinstance(exc, tinker.APIStatusError):
        return f"Tinker answered {exc.status_code}{where}: {said}"
    return f"{type(exc).__name__}{where}: {said}"
