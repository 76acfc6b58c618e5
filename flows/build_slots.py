"""Server-held build slots: what keeps builds apart across machines when they run from deployments.

Every build run from a deployment holds a Prefect global concurrency limit while it runs,
`character-build-<persona>-<build id>` (limit 1), so a second run of the same build fails at once
(on the server's refusal, however long the server takes to give it) with a message naming the
limit even when it starts on another machine with its own disk (the
file lock in `character.build.lock` only sees one filesystem). How many builds run at once across
the pool is the build deployments' own `concurrency_limit` (prefect.yaml). Runs from the command
line, with no deployment, hold only the file lock.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from typing import Iterator

from character.config import PipelineConfig
from character.errors import UserError


def from_deployment() -> bool:
    from prefect.runtime import deployment

    return deployment.id is not None


def build_limit(config: PipelineConfig) -> str:
    """The name of the build's own limit (Prefect refuses '/' and a few other characters in names)."""
    key = f"{config.persona}-{config.build_id or 'latest'}"
    return "character-build-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", key)


def _ensure_single(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass


def _locked(error: BaseException) -> bool:
    """Whether an acquisition failed because the server said the limit is full (423 Locked)."""
    import httpx

    cause = error.__cause__
    return isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423


@contextmanager
def held(config: PipelineConfig, answer_s: float | None = None) -> Iterator[None]:
    """Hold the build's slot for the body; refused at once if another run holds it.

    "Held" is the server's answer (423 Locked, not retried), never a timer: on a busy machine the
    server can take seconds to answer (its SQLite writes queue behind every other run's), and a slow
    answer is not a holder. The answer itself is waited for up to `answer_s` (the
    `build_slot_timeout_s` setting, CHARACTER_BUILD_SLOT_TIMEOUT_S), and a run refused for that says so.
    """
    if not from_deployment():
        yield
        return
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    from character.settings import Settings

    answer_s = Settings().build_slot_timeout_s if answer_s is None else answer_s
    name = build_limit(config)
    _ensure_single(name)
    with ExitStack() as stack:
        try:  # entered apart from the body, so that a TimeoutError of the build itself is not taken for this one
            stack.enter_context(concurrency(name, timeout_seconds=answer_s, max_retries=0, strict=True))
        except ConcurrencySlotAcquisitionError as e:
            if not _locked(e):
                raise
            raise UserError(
                f"build {config.persona}/{config.build_id} is held by another flow run "
                f"(server concurrency limit {name}); wait for that run to finish, or use another build id"
            ) from None
        except TimeoutError:
            raise UserError(
                f"build {config.persona}/{config.build_id}: the Prefect server did not answer the request for "
                f"its slot (server concurrency limit {name}) within {answer_s:g} s (CHARACTER_BUILD_SLOT_TIMEOUT_S); "
                "the server is overloaded or unreachable: run the build again, or raise that setting"
            ) from None
        yield
