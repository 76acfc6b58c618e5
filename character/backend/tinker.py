"""Tinker backend: the Tinker SDK behind the same interface as the local backend.

The SDK's ServiceClient is built lazily, on the first call that needs the service, after two
checks that make failures quick and clear: the key must be there (TINKER_API_KEY, or a Prefect
Secret block named in settings), and the service must answer within `tinker_timeout_s` (left
alone, the SDK retries an unreachable URL silently for minutes).

Training clients hand back the SDK's own futures, wrapped (`tinker_clients`) so that every wait is
bounded by `result_timeout_s` and every error reads as one redacted line, transient or fatal;
nothing waits at submission, so the loop submits forward/backward and the optimizer step before
waiting on either. Sampling keeps at most `max_in_flight` requests outstanding across all sampling
clients of a service.

Tinker fixes LoRA alpha itself (`TINKER_LORA_ALPHA`, the value its exported adapter_config.json
records): an alpha asked for is not sent, and one that differs is warned about, because the same
learning rate then moves the model differently than on the local backend (README, "Learning rates
across backends").

This module holds the service and its reachability check; the key is in `tinker_key`, the
wrapped clients in `tinker_clients`, the checks on model names in `tinker_models`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable
from urllib.parse import urlparse

import tinker
from pydantic import SecretStr
from tinker import types

from character.backend.errors import BackendFatalError, describe_fatal, is_transient
from character.backend.tinker_clients import (
    CheckedFuture,
    TinkerRestClient,
    TinkerSamplingClient,
    TinkerTrainingClient,
    submit_checked,
)
from character.backend.tinker_key import NO_KEY, api_key_source, resolve_api_key, safe_cause
from character.backend.tinker_models import check_ready, is_chat_model, model_roles, model_size_b
from character.errors import UserError
from character.settings import Settings

# The Tinker backend's public names, wherever they are defined: callers import them from here.
__all__ = [
    "NO_KEY",
    "TINKER_LORA_ALPHA",
    "CheckedFuture",
    "TinkerSamplingClient",
    "TinkerService",
    "TinkerTrainingClient",
    "TinkerUnreachable",
    "api_key_source",
    "check_ready",
    "display_url",
    "is_chat_model",
    "model_roles",
    "model_size_b",
    "preflight",
    "resolve_api_key",
    "resolve_base_url",
]

log = logging.getLogger(__name__)

# The LoRA alpha Tinker trains with whatever the client asks for (its exports' adapter_config.json records
# it; tinker-cookbook assumes the same). The update is scaled by alpha / rank.
TINKER_LORA_ALPHA = 32

_PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


class TinkerUnreachable(BackendFatalError):
    """Tinker did not answer within the configured time; nothing was spent."""


def default_client_factory(*, base_url: str, api_key: str):
    return tinker.ServiceClient(base_url=base_url, api_key=api_key)


def default_rest_factory(*, base_url: str, api_key: str):
    return tinker.RestClient(base_url=base_url, api_key=api_key)


# -- reachability --------------------------------------------------------------------------------
def resolve_base_url(base_url: str | None = None) -> str:
    from tinker.lib.base_url import resolve_base_url as sdk_resolve

    return sdk_resolve(base_url)


def display_url(url: str) -> str:
    """The URL without any user:password part, for messages."""
    p = urlparse(url)
    host = f"[{p.hostname}]" if p.hostname and ":" in p.hostname else (p.hostname or "")
    netloc = f"{host}:{p.port}" if p.port else host
    return p._replace(netloc=netloc).geturl()


def _tcp_check(url: str, timeout: float) -> None:
    p = urlparse(url)
    if not p.hostname:
        raise UserError(f"Tinker base URL {display_url(url)!r} has no host; check TINKER_BASE_URL")
    port = p.port or (443 if p.scheme == "https" else 80)
    socket.create_connection((p.hostname, port), timeout=timeout).close()


def preflight(base_url: str, api_key: SecretStr, timeout_s: float, rest_factory: Callable[..., Any]):
    """(rest client, server capabilities), or a clear error within `timeout_s`.

    A TCP connect first (a closed port or unknown host fails at once), then one SDK call that
    needs the key. Both run on a daemon thread joined with the deadline, so neither DNS nor the
    SDK's own retrying can hold us past it.
    """
    where = display_url(base_url)
    out: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s

    def probe() -> None:
        try:
            if not any(os.environ.get(v) for v in _PROXY_VARS):  # through a proxy only the SDK call can tell
                _tcp_check(base_url, timeout_s)
            rest = rest_factory(base_url=base_url, api_key=api_key.get_secret_value())
            left = max(0.01, deadline - time.monotonic())
            out["result"] = (rest, rest.get_server_capabilities().result(timeout=left))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            out["error"] = e

    thread = threading.Thread(target=probe, name="tinker-preflight", daemon=True)
    thread.start()
    thread.join(timeout_s)
    err = out.get("error")
    silent = (
        f"Tinker at {where} did not answer within {timeout_s:g} s: check TINKER_BASE_URL, the network, "
        "and the account (e.g. billing); CHARACTER_TINKER_TIMEOUT_S sets this limit"
    )
    if thread.is_alive() or isinstance(err, TimeoutError):
        raise TinkerUnreachable(silent)
    if isinstance(err, socket.gaierror):
        raise TinkerUnreachable(f"cannot resolve the Tinker host in {where}: check TINKER_BASE_URL and DNS")
    if isinstance(err, OSError):
        reason = err.strerror or type(err).__name__
        raise TinkerUnreachable(
            f"cannot connect to Tinker at {where} ({reason}): check TINKER_BASE_URL and the network"
        )
    if err is not None and is_transient(err):
        raise TinkerUnreachable(
            f"Tinker at {where} is not answering properly ({type(err).__name__}): "
            "check TINKER_BASE_URL and the network, or retry later"
        )
    if isinstance(err, tinker.TinkerError):
        raise BackendFatalError(describe_fatal(err, f"checking the service at {where}", api_key)) from safe_cause(
            err, api_key
        )
    if isinstance(err, UserError):
        raise err
    if err is not None:  # not an SDK error, but it may still quote what the service said
        raise BackendFatalError(describe_fatal(err, f"checking the service at {where}", api_key)) from safe_cause(
            err, api_key
        )
    return out["result"]


def parse_checkpoint_path(path: str, want: str, doing: str) -> types.ParsedCheckpointTinkerPath:
    """A tinker:// checkpoint path, parsed; a malformed one (or, with want="training", one that is not a
    training state) is a UserError naming what it was for (`doing`)."""
    try:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(path)
    except ValueError:
        raise UserError(f"{path!r}: not a Tinker checkpoint path (tinker://<run>/weights/<name>) for {doing}") from None
    if want == "training" and parsed.checkpoint_type != "training":
        raise UserError(
            f"{path}: {doing} needs a training state (tinker://<run>/weights/<name>), "
            f"not a {parsed.checkpoint_type} checkpoint"
        )
    return parsed


class TinkerService:
    """The ServiceClient protocol over `tinker.ServiceClient`.

    `client_factory(base_url=, api_key=)` and `rest_factory(base_url=, api_key=)` build the SDK's
    ServiceClient and RestClient; tests pass fakes. Nothing touches the network before the first
    call that needs the service.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        base_url: str | None = None,
        timeout_s: float | None = None,
        result_timeout_s: float | None = None,
        max_in_flight: int | None = None,
        client_factory: Callable[..., Any] | None = None,
        rest_factory: Callable[..., Any] | None = None,
    ):
        self.settings = settings or Settings()
        self.base_url = resolve_base_url(base_url)
        self.timeout_s = timeout_s if timeout_s is not None else self.settings.tinker_timeout_s
        # the bound on every wait for a result (a stalled service must not hang a build)
        self.result_timeout_s = (
            result_timeout_s if result_timeout_s is not None else self.settings.tinker_result_timeout_s
        )
        self.max_in_flight = max_in_flight or self.settings.tinker_max_in_flight
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._client_factory = client_factory
        self._rest_factory = rest_factory
        self._lock = threading.RLock()
        self._key: SecretStr | None = None
        self._rest = None
        self._models: dict[str, Any] | None = None
        self._sdk = None
        self._base_samplers: dict[str, TinkerSamplingClient] = {}

    def __repr__(self) -> str:
        return f"TinkerService(base_url={display_url(self.base_url)!r}, connected={self._sdk is not None})"

    # -- connection ---------------------------------------------------------------------------
    def _probe(self) -> None:
        """Key, then reachability, once per service; both fail fast with a clear message."""
        with self._lock:
            if self._rest is not None:
                return
            key = resolve_api_key(self.settings)
            rest, caps = preflight(self.base_url, key, self.timeout_s, self._rest_factory or default_rest_factory)
            self._key, self._rest = key, rest
            self._models = {m.model_name: m for m in (caps.supported_models or []) if m.model_name}
            log.info("Tinker at %s answers; %d models served", display_url(self.base_url), len(self._models))

    def _client(self):
        with self._lock:
            if self._sdk is None:
                self._probe()
                factory = self._client_factory or default_client_factory
                self._sdk = factory(base_url=self.base_url, api_key=self._key.get_secret_value())
            return self._sdk

    def _wait(self, submit: Callable[[], Any], doing: str):
        """Submit a client creation and wait for it, bounded; its errors read as one redacted line."""
        return submit_checked(submit, doing, self._key, self.result_timeout_s).result()

    def rest_client(self) -> TinkerRestClient:
        """The SDK RestClient (checkpoint info, export URLs), after the same checks; its waits bounded."""
        self._probe()
        return TinkerRestClient(self._rest, self._key, self.result_timeout_s)

    def list_models(self) -> list[Any]:
        """What the service offers (`SupportedModel`: name, context length, trainable, sampleable)."""
        self._probe()
        return [self._models[k] for k in sorted(self._models)]

    def _check_model(self, name: str, use: str) -> None:
        if not self._models:  # the service did not list its models: let it answer for itself
            return
        m = self._models.get(name)
        if m is None:
            served = ", ".join(sorted(self._models)[:8])
            raise BackendFatalError(
                f"model {name!r} is not served by Tinker at {display_url(self.base_url)} "
                f"(served: {served}, ...; `character tinker models` lists them all)"
            )
        if use == "training" and m.trainable is False:
            raise BackendFatalError(
                f"model {name!r} can be sampled on Tinker but not trained; choose a trainable one "
                "(`character tinker models`)"
            )
        if use == "sampling" and m.sampleable is False:
            raise BackendFatalError(f"model {name!r} has no sampling capacity on Tinker now; choose another model")

    # -- ServiceClient protocol -----------------------------------------------------------------
    def _trainer(self, client, what: str) -> TinkerTrainingClient:
        return TinkerTrainingClient(client, self._key, what, self.result_timeout_s, lora_alpha=TINKER_LORA_ALPHA)

    def _sampler(self, client, what: str) -> TinkerSamplingClient:
        return TinkerSamplingClient(client, self._slots, self._key, what, self.result_timeout_s)

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = False,
        alpha: int | None = None,
    ) -> TinkerTrainingClient:
        """`alpha` is not sent: Tinker fixes LoRA alpha itself (`TINKER_LORA_ALPHA`; the client's `lora_alpha`
        says so). One that differs is warned about: the same learning rate is then a different update."""
        if not (train_mlp or train_attn or train_unembed):
            raise UserError("LoRA has nothing to train: enable attention, MLP or unembedding layers")
        if alpha is not None and alpha != TINKER_LORA_ALPHA:
            log.warning(
                "LoRA alpha %d is not used on Tinker, which trains with alpha %d (scale %.3g at rank %d, not %.3g); "
                "the same learning rate moves the model about %.3g times as far as locally (README: "
                "'Learning rates across backends')",
                alpha,
                TINKER_LORA_ALPHA,
                TINKER_LORA_ALPHA / rank,
                rank,
                alpha / rank,
                TINKER_LORA_ALPHA / alpha,
            )
        sdk = self._client()
        self._check_model(base_model, "training")
        client = self._wait(
            lambda: sdk.create_lora_training_client(
                base_model=base_model,
                rank=rank,
                seed=seed,
                train_mlp=train_mlp,
                train_attn=train_attn,
                train_unembed=train_unembed,
            ),
            f"creating a LoRA training client on {base_model!r}",
        )
        return self._trainer(client, f"LoRA on {base_model}")

    def create_training_client_from_state(self, path: str) -> TinkerTrainingClient:
        """Weights only, fresh optimizer: a new run that starts where `path` left off (sequential SFT)."""
        parse_checkpoint_path(path, "training", "starting from a saved state")
        sdk = self._client()
        client = self._wait(lambda: sdk.create_training_client_from_state(path), f"loading weights from {path}")
        return self._trainer(client, f"from {path}")

    def create_training_client_from_state_with_optimizer(self, path: str) -> TinkerTrainingClient:
        """Weights and optimizer state: resumes an interrupted run exactly."""
        parse_checkpoint_path(path, "training", "resuming training")
        sdk = self._client()
        client = self._wait(lambda: sdk.create_training_client_from_state_with_optimizer(path), f"resuming from {path}")
        return self._trainer(client, f"resumed from {path}")

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, seed: int | None = None
    ) -> TinkerSamplingClient:
        """`seed` is accepted for interface parity; on Tinker each request carries its own seed."""
        if (model_path is None) == (base_model is None):
            raise ValueError("give exactly one of model_path and base_model")
        if model_path is not None:
            parse_checkpoint_path(model_path, "any", "sampling")
            sdk = self._client()
            client = self._wait(
                lambda: sdk.create_sampling_client(model_path=model_path), f"sampling from {model_path}"
            )
            return self._sampler(client, model_path)
        with self._lock:  # one sampling session per base model is enough
            if base_model not in self._base_samplers:
                sdk = self._client()
                self._check_model(base_model, "sampling")
                client = self._wait(
                    lambda: sdk.create_sampling_client(base_model=base_model), f"sampling {base_model!r}"
                )
                self._base_samplers[base_model] = self._sampler(client, base_model)
            return self._base_samplers[base_model]

    def get_tokenizer(self, base_model: str):
        # The SDK knows which tokenizer each served model uses (some are not the model's own repo).
        return self.create_sampling_client(base_model=base_model).get_tokenizer()
