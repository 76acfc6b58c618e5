"""The Tinker API key: where it comes from, reading it, and keeping it out of every message.

The key is TINKER_API_KEY, or a Prefect Secret block named in settings; it is held as a SecretStr
so that no repr or log line shows it, and any text that may echo it passes through `redact`.
"""

from __future__ import annotations

import os

from pydantic import SecretStr

from character.backend.errors import redact  # noqa: F401 - public here too
from character.errors import UserError
from character.settings import Settings

NO_KEY = (
    "no Tinker API key: set TINKER_API_KEY, or CHARACTER_TINKER_SECRET_BLOCK to the name of a "
    "Prefect Secret block that holds it"
)


def api_key_source(settings: Settings) -> str | None:
    """Where the key will come from, without reading any secret store (for early validation)."""
    if os.environ.get("TINKER_API_KEY", "").strip():
        return "TINKER_API_KEY"
    if settings.tinker_secret_block:
        return f"Prefect Secret block {settings.tinker_secret_block!r}"
    return None


def resolve_api_key(settings: Settings) -> SecretStr:
    """The key itself, as a SecretStr so that no repr or log line shows it."""
    key = os.environ.get("TINKER_API_KEY", "").strip()
    if key:
        return SecretStr(key)
    if settings.tinker_secret_block:
        return SecretStr(_key_from_prefect(settings.tinker_secret_block))
    raise UserError(NO_KEY)


def _key_from_prefect(name: str) -> str:
    # Only this branch needs Prefect: the core must import and run without it.
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name).get()
    except Exception as e:  # noqa: BLE001 - any failure means "no key from this block"
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"could not read the Tinker key from Prefect Secret block {name!r} "
            f"({type(e).__name__}: {first}); check the block exists (`prefect block ls`)"
        ) from None
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"Prefect Secret block {name!r} does not hold a Tinker key (expected a non-empty string)")
    return value.strip()


def safe_cause(e: BaseException, secret: SecretStr | None) -> BaseException | None:
    """Chain the SDK error for debugging, unless its text, or that of any error behind it, holds the key (a
    server echoing it back): a traceback prints every error of the chain."""
    value = secret.get_secret_value() if secret is not None else ""
    seen: set[int] = set()
    cur: BaseException | None = e
    while value and cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if value in str(cur) or value in repr(getattr(cur, "body", None)) or value in repr(cur.args):
            return None
        cur = cur.__cause__ or cur.__context__
    return e
