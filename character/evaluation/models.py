"""Which service evaluates which model: local folders on a LocalService, `tinker://` checkpoints and
models Tinker serves on a TinkerService (remote: no weights are downloaded, no local GPU is used).

Checkpoints of one evaluation share one service, because the base model is their reference: all
`tinker://` (the base is then a model Tinker serves) or all local. Judges are separate models and may
live on either side: `tiny` or a local folder runs here, a Tinker model name or `tinker://` path there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from character.errors import UserError
from character.settings import Settings, Workspace

Side = Literal["local", "tinker"]


def is_remote(uri: str) -> bool:
    return uri.startswith("tinker://")


def checkpoints_side(sources: list[str]) -> Side:
    """'tinker' when every checkpoint is a tinker:// path, 'local' when none is; a mix is refused."""
    remote = [s for s in sources if is_remote(s)]
    if remote and len(remote) < len(sources):
        local = next(s for s in sources if not is_remote(s))
        raise UserError(
            f"cannot evaluate tinker:// checkpoints ({remote[0]}) together with local ones ({local}): "
            "their base model is the reference and lives on one side; evaluate them in separate calls"
        )
    return "tinker" if remote else "local"


def model_side(spec: str, option: str) -> Side:
    """Where a judge model runs: 'tiny' or an existing folder here; a tinker:// path or an `org/name`
    model name on Tinker."""
    if spec == "tiny" or Path(spec).expanduser().is_dir() or spec.startswith("file://"):
        if spec.startswith("file://"):
            from character.storage import uri_to_path

            if not uri_to_path(spec).is_dir():
                raise UserError(f"{option} {spec}: folder not found")
        return "local"
    if is_remote(spec):
        return "tinker"
    if "/" in spec and not spec.startswith(("/", ".", "~")):
        return "tinker"
    raise UserError(
        f"{option} {spec}: not 'tiny', a local model or adapter folder, a tinker:// path, or a model "
        "Tinker serves (e.g. Qwen/Qwen3-30B-A3B-Instruct-2507; `character tinker models` lists them)"
    )


def tinker_service(settings: Settings | None = None):
    """A TinkerService built as the pipeline builds it (fault injection included when configured)."""
    from character.backend.faults import with_faults
    from character.backend.tinker import TinkerService

    settings = settings or Settings()
    return with_faults(TinkerService(settings), settings.fault_rate, settings.fault_seed)


def check_tinker_key(settings: Settings | None = None) -> None:
    from character.backend.tinker import NO_KEY, api_key_source

    if api_key_source(settings or Settings()) is None:
        raise UserError(NO_KEY)


class Services:
    """The evaluation's main service and, made on first use, a service of the other side for judges."""

    def __init__(
        self, main, side: Side, ws: Workspace, device: str = "auto", seed: int = 0, settings: Settings | None = None
    ):
        self.main, self.side, self.ws, self.device, self.seed = main, side, ws, device, seed
        self.settings = settings or Settings()
        self._other = None

    def on(self, side: Side):
        if side == self.side:
            return self.main
        if self._other is None:
            if side == "tinker":
                self._other = tinker_service(self.settings)
            else:
                from character.backend.local import LocalService

                self._other = LocalService(self.ws, device=self.device, seed=self.seed)
        return self._other

    def judge(self, spec: str, option: str) -> Callable[[], object]:
        """A maker of the judge's sampling client (the model is loaded or opened only when it is needed)."""
        side = model_side(spec, option)
        if side == "tinker":
            check_tinker_key(self.settings)  # before any model is evaluated

        def make():
            svc = self.on(side)
            if spec == "tiny" or (side == "tinker" and not is_remote(spec)):
                return svc.create_sampling_client(base_model=spec)
            return svc.create_sampling_client(model_path=spec)

        return make


def remote_base_model(svc, uri: str) -> str:
    """The base model a tinker:// checkpoint was trained from, as the service records it."""
    rest = getattr(svc, "rest_client", None)  # the fault-injecting wrapper passes it through
    if rest is None:
        raise UserError(f"checkpoint {uri}: its base model is not known here; pass --base-model")
    info = rest().get_weights_info_by_tinker_path(uri).result()
    if not getattr(info, "base_model", None):
        raise UserError(f"checkpoint {uri}: Tinker does not say its base model; pass --base-model")
    return info.base_model
