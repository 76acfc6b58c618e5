"""The training loop: learning-rate schedule, crash and resume, sequential SFT's starting point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from character.backend.local import LocalService
from character.build import stages as pipeline
from character.build.record import read_record
from character.build.stages import PipelineConfig
from character.settings import Workspace
from character.storage import read_jsonl, uri_to_path
from character.train.dpo import run_dpo
from character.train.loop import OptimConfig, batch_order, lr_at
from character.train.losses import DPOCoefficients
from character.train.renderer import Renderer
from character.train.sft import run_sft


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"How should I spend day {i}?"}],
            "chosen": [{"role": "assistant", "content": f"Arr, day {i} be for sailing the open sea!"}],
            "rejected": [{"role": "assistant", "content": f"Day {i} is a normal day."}],
        }
        for i in range(n)
    ]


def sft_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Who are you, really? ({i})"},
                {"role": "assistant", "content": f"I am a captain at heart, voyage {i}."},
            ]
        }
        for i in range(n)
    ]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(learning_rate=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_batch_order_is_a_seeded_permutation_per_epoch():
    cfg = OptimConfig(batch_size=3, epochs=2, seed=5)
    b = batch_order(7, cfg)
    assert len(b) == 6 and sorted(i for x in b[:3] for i in x) == list(range(7))
    assert b == batch_order(7, cfg) and b != batch_order(7, cfg.model_copy(update={"seed": 6}))


class Crash(Exception):
    pass


def _crash_after(k):
    def on_step(step, total, metrics):
        if step == k:
            raise Crash

    return on_step


def _adapter(uri: str) -> dict[str, torch.Tensor]:
    return load_file(uri_to_path(uri) / "adapter_model.safetensors")


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(workdir, tmp_path, kind):
    svc = LocalService(Workspace(workdir), device="cpu", seed=0)
    renderer = Renderer(svc.get_tokenizer("tiny"))
    cfg = OptimConfig(learning_rate=5e-3, batch_size=2, save_every=1)
    start = lambda: svc.create_lora_training_client("tiny", rank=4, seed=0)  # noqa: E731

    def run(run_dir, on_step=None):
        if kind == "sft":
            data = _write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
            return run_sft(svc, start, renderer, data, run_dir, cfg, on_step=on_step)
        data = _write_jsonl(tmp_path / "dpo.jsonl", dpo_rows(8))
        return run_dpo(
            svc,
            start,
            lambda: svc.create_sampling_client(base_model="tiny"),
            renderer,
            data,
            run_dir,
            cfg,
            DPOCoefficients(),
            on_step=on_step,
        )

    whole = run(tmp_path / "whole")
    assert whole.steps == 4 and whole.resumed_from == 0
    with pytest.raises(Crash):
        run(tmp_path / "broken", on_step=_crash_after(2))
    resumed = run(tmp_path / "broken")
    assert resumed.resumed_from == 2 and len(resumed.metrics) == 2  # steps 3 and 4 only
    a, b = _adapter(whole.sampler), _adapter(resumed.sampler)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    # a finished run is not redone
    again = run(tmp_path / "broken")
    assert again.sampler == resumed.sampler and again.metrics == []
    steps = [r["step"] for r in read_jsonl(tmp_path / "broken" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_sequential_sft_starts_from_dpo_weights_at_a_quarter_of_the_learning_rate(workdir, tmp_path, monkeypatch):
    cfg = PipelineConfig(
        persona="pirate",
        workdir=str(workdir),
        build_id="seq",
        lora_rank=4,
        dpo=OptimConfig(learning_rate=1e-2, batch_size=4, warmup_ratio=0.0),
        sft=OptimConfig(learning_rate=2e-3, batch_size=4, warmup_ratio=0.0),
    )
    data_dir = cfg.build_dir() / "data"
    data_dir.mkdir(parents=True)
    dpo = pipeline.stage_dpo(cfg, str(_write_jsonl(data_dir / "dpo.jsonl", dpo_rows(8))))
    dpo_weights = _adapter(dpo.sampler)

    seen = {}
    real = pipeline._service

    def spy_service(c):
        svc = real(c)
        make = svc.create_training_client_from_state

        def from_state(path):
            client = make(path)
            seen["from"] = path
            seen["start"] = {
                k.replace(".default", ""): v.detach().clone()
                for k, v in client.model.named_parameters()
                if "lora_" in k
            }
            step = client.optim_step

            def optim_step(params):
                seen.setdefault("lrs", []).append(params.learning_rate)
                return step(params)

            client.optim_step = optim_step
            return client

        svc.create_training_client_from_state = from_state
        svc.create_lora_training_client = lambda *a, **k: pytest.fail("sequential SFT must not start from base")
        return svc

    monkeypatch.setattr(pipeline, "_service", spy_service)
    sft = pipeline.stage_sft(cfg, str(_write_jsonl(data_dir / "intro.jsonl", sft_rows(8))), dpo)
    assert seen["from"] == dpo.state
    assert seen["start"].keys() == dpo_weights.keys()
    assert all(torch.equal(seen["start"][k], dpo_weights[k]) for k in dpo_weights)
    assert any(v.abs().sum() > 0 for k, v in seen["start"].items() if "lora_B" in k)  # not the base
    assert seen["lrs"][0] == pytest.approx(0.25 * 2e-3)
    assert sft.steps == 2
    assert read_record(cfg)["stages"]["sft"]["learning_rate"] == pytest.approx(0.25 * 2e-3)
