"""The nightly flow's builds as flow runs of their own on the work pool (used when the nightly runs
from a deployment): every idle worker takes one, the server's limits (`flows.build_slots`) keep two
runs of one build apart, the build deployment's concurrency limit caps how many build at once, and
the nightly waits for them, bounded."""

from __future__ import annotations

import time
from uuid import UUID

from character.build.record import read_record
from character.config import PipelineConfig
from character.errors import UserError

_ACTIVE = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED")
_POLL_S = 2.0


def build_tag(cfg: PipelineConfig) -> str:
    return f"character-build:{cfg.persona}:{cfg.build_id}"


def _active_run(client, deployment_id: UUID, tag: str) -> UUID | None:
    """A run of this build already on its way (say, from a nightly started before this one)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[tag]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(_ACTIVE))),
        ),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        limit=1,
    )
    return runs[0].id if runs else None


def _submit(configs: dict[str, PipelineConfig], deployment: str) -> dict[str, UUID]:
    """Each persona's build run: the one already active for its build, else a new one."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    runs: dict[str, UUID] = {}
    with get_client(sync_client=True) as client:
        try:
            dep_id = client.read_deployment_by_name(deployment).id
        except ObjectNotFound:
            raise UserError(
                f"the nightly builds each persona with the deployment '{deployment}', which this Prefect "
                "server does not have: deploy prefect.yaml (prefect deploy --all) or serve the flows"
            ) from None
        for persona, cfg in configs.items():
            tag = build_tag(cfg)
            runs[persona] = _active_run(client, dep_id, tag) or (
                run_deployment(
                    deployment,
                    parameters={"config": cfg.model_dump(mode="json")},
                    timeout=0,
                    tags=[tag],
                    flow_run_name=f"{persona}-{cfg.build_id}",
                ).id
            )
    return runs


def _checkpoints(cfg: PipelineConfig) -> dict[str, str]:
    stages = read_record(cfg).get("stages", {})
    out = {k: v["sampler"] for k, v in stages.items() if isinstance(v, dict) and "sampler" in v}
    final = out.get("merged") or out.get("sft")
    return out | ({"final": final} if final else {})


def _wait(runs: dict[str, UUID], configs: dict[str, PipelineConfig], wait_s: float) -> dict[str, dict]:
    """Every run's outcome once it is final, or where it stands when `wait_s` has passed."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + wait_s
    outcomes: dict[str, dict] = {}
    with get_client(sync_client=True) as client:
        pending = dict(runs)
        while pending:
            for persona, run_id in list(pending.items()):
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    ok = state.is_completed()
                    outcomes[persona] = {
                        "state": "Completed" if ok else state.type.value.title(),
                        "checkpoints": _checkpoints(configs[persona]) if ok else {},
                        "message": "" if ok else (state.message or "")[:300],
                        "flow_run": str(run_id),
                    }
                    del pending[persona]
                elif time.monotonic() > deadline:
                    where = state.name if state is not None else "not started"
                    outcomes[persona] = {
                        "state": "Failed",
                        "checkpoints": {},
                        "message": f"flow run {run_id} still {where} after {wait_s:g} s",
                        "flow_run": str(run_id),
                    }
                    del pending[persona]
            if pending:
                time.sleep(_POLL_S)
    return outcomes


def build_runs(configs: dict[str, PipelineConfig], mode: str, wait_s: float) -> dict[str, dict]:
    """Each persona built by a flow run of the `mode/mode` deployment."""
    if not configs:
        return {}
    runs = _submit(configs, f"{mode}/{mode}")
    return _wait(runs, configs, wait_s)
