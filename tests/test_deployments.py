"""prefect.yaml and the serve script: every deployment points at a real flow with valid parameters."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_prefect_yaml_deployments_load_and_validate():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"sequential", "paper", "nightly"}
    for d in deps.values():
        flow = _flow(d["entrypoint"])
        assert flow.name == d["name"]
        validated = flow.validate_parameters(d.get("parameters", {}))
        assert validated
    assert deps["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    for d in deps.values():  # a run past the limit waits (AwaitingConcurrencySlot) rather than runs
        limit = ConcurrencyLimitConfig.model_validate(d["concurrency_limit"])
        assert limit.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
        # one nightly at a time; builds of different personas fan out over the pool
        assert limit.limit == 1 if d["name"] == "nightly" else limit.limit >= 2
    assert deps["nightly"]["schedules"][0]["timezone"]
    paper_cfg = _flow(deps["paper"]["entrypoint"]).validate_parameters(deps["paper"]["parameters"])["config"]
    assert paper_cfg.merge is True and paper_cfg.mode == "paper"


def test_bad_parameters_are_refused_by_the_flow_signature():
    import pytest
    from prefect.exceptions import ParameterTypeError

    from flows.sequential import sequential

    with pytest.raises(ParameterTypeError):
        sequential.validate_parameters({"config": {"persona": "pirate", "scale": "enormous"}})
    with pytest.raises(ParameterTypeError):
        sequential.validate_parameters({"config": {"persona": "pirate", "merge": True}})  # merge needs paper mode


def test_serve_builds_all_three_deployments(monkeypatch):
    import prefect

    from deployments import serve

    seen = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments, **kw: seen.extend(deployments))
    serve.main(["--nightly-cron", "30 3 * * *", "--timezone", "Europe/Paris", "--personas", "pirate,poetic"])
    by_name = {d.name: d for d in seen}
    assert set(by_name) == {"sequential", "paper", "nightly"}
    nightly = by_name["nightly"]
    assert nightly.parameters["personas"] == ["pirate", "poetic"]
    sched = nightly.schedules[0].schedule
    assert sched.cron == "30 3 * * *" and sched.timezone == "Europe/Paris"
    assert all(d.concurrency_limit == 1 and d.concurrency_options.collision_strategy == "ENQUEUE" for d in seen)
