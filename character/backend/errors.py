"""Which backend errors are worth retrying, and what a fatal one asks the user to fix.

Prefect's retry condition asks `is_transient`, nothing else. A fatal Tinker error is turned into
a `BackendFatalError` whose one-line message names what to fix (`describe_fatal`).
"""

from __future__ import annotations

import tinker
from tinker.types import RequestErrorCategory

from character.errors import UserError

_TRANSIENT = (
    tinker.APIConnectionError,  # includes APITimeoutError
    tinker.RateLimitError,
    tinker.InternalServerError,
    tinker.ConflictError,
)


class TransientBackendError(Exception):
    """A failure that may succeed if the same call is made again (used by our own backends)."""


class BackendFatalError(UserError):
    """A backend refused the work for a reason retrying cannot fix (bad key, model not served, ...)."""


def is_transient(exc: BaseException) -> bool:
    """True for a transient error, or one that merely wraps a transient cause (e.g. the SDK's RuntimeError
    "this TrainingClient is poisoned", raised from the failure that poisoned it). Errors we classify as
    fatal stay fatal whatever they were raised from."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TransientBackendError, *_TRANSIENT)):
            return True
        if isinstance(exc, tinker.RequestFailedError):
            return exc.category != RequestErrorCategory.User
        if isinstance(exc, (UserError, tinker.TinkerError)):
            return False
        exc = exc.__cause__ or exc.__context__
    return False


def _server_says(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_fatal(exc: BaseException, doing: str = "") -> str:
    """One line for a fatal SDK error: what failed and what to fix. Never includes request headers."""
    where = f" while {doing}" if doing else ""
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
    if isinstance(exc, tinker.NotFoundError):
        return (
            f"not found on Tinker (404){where}: the model is not served or the tinker:// path does not exist; "
            f"`character tinker models` lists served models ({_server_says(exc)})"
        )
    if isinstance(exc, (tinker.BadRequestError, tinker.UnprocessableEntityError)):
        said = _server_says(exc)
        if "model" in said.lower() and any(
            w in said.lower() for w in ("not found", "not supported", "unsupported", "unknown", "not available")
        ):
            return (
                f"the model is not served by Tinker ({exc.status_code}){where}: {said}; "
                "`character tinker models` lists served models"
            )
        return f"Tinker refused the request as invalid ({exc.status_code}){where}: {said}"
    if isinstance(exc, tinker.RequestFailedError):
        return f"Tinker failed the request because of its input{where}: {_server_says(exc)}"
    if isinstance(exc, tinker.APIStatusError):
        return f"Tinker answered {exc.status_code}{where}: {_server_says(exc)}"
    return f"{type(exc).__name__}{where}: {_server_says(exc)}"
