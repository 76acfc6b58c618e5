"""Server-held build slots: what keeps builds apart across machines when they run from deployments.

Every build run from a deployment holds a Prefect global concurrency limit while it runs,
`character-build-<persona>-<build id>` (limit 1), so a second run of the same build fails at once
with a message naming the limit even when it starts on another machine with its own disk (the
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


@contextmanager
def held(config: PipelineConfig, wait_s: float = 2.0) -> Iterator[None]:
    """Hold the build's slot, refused after `wait_s` if another run holds it."""
    if not from_deployment():
        yield
        return
    from prefect.concurrency.sync import concurrency

    name = build_limit(config)
    _ensure_single(name)
    with ExitStack() as stack:
        try:  # entered apart from the body, so that a TimeoutError of the build itself is not taken for this one
            stack.enter_context(concurrency(name, timeout_seconds=wait_s, strict=True))
        except TimeoutError:
            raise UserError(
                f"build {config.persona}/{config.build_id} is held by another flow run "
                f"(server concurrency limit {name}); wait for that run to finish, or use another build id"
            ) from None
        yield
