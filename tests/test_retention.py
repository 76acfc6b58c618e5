"""Retention: a training run keeps only its newest resumable states, and never the only one it could
resume from."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from character.backend.local import LocalService
from character.settings import Workspace
from character.storage import read_jsonl, uri_to_path
from character.train import loop as training
from character.train.loop import OptimConfig
from character.train.renderer import Renderer
from character.train.sft import run_sft
from tests.test_training import _write_jsonl, sft_rows


class Crash(Exception):
    pass


def _states_on_disk(run: training.TrainResult) -> list[str]:
    return sorted(p.name for p in uri_to_path(run.state).parent.iterdir() if not p.name.startswith("."))


@pytest.fixture
def sft(workdir, tmp_path):
    svc = LocalService(Workspace(workdir), device="cpu", seed=0)
    renderer = Renderer(svc.get_tokenizer("tiny"))
    data = _write_jsonl(tmp_path / "sft.jsonl", sft_rows(6))

    def run(run_dir, keep: int):
        cfg = OptimConfig(learning_rate=5e-3, batch_size=2, save_every=1, keep_states=keep)
        return run_sft(
            svc, lambda: svc.create_lora_training_client("tiny", rank=4, seed=0), renderer, data, run_dir, cfg
        )

    return run


@pytest.mark.slow
def test_only_the_newest_states_are_kept_and_a_crash_before_recording_keeps_the_last_recorded(
    sft, tmp_path, monkeypatch
):
    whole = sft(tmp_path / "whole", keep=2)
    assert whole.steps == 3
    assert _states_on_disk(whole) == ["step-000002", "step-000003"]  # the final state is the newest
    assert whole.state.endswith("step-000003")

    # A crash between writing step 3's state and recording it: step 2 is still the newest recorded
    # state, so it must still exist, and the run resumes from it.
    real = training.append_jsonl

    def crash_before_recording(path, row):
        if isinstance(row, dict) and str(row.get("state", "")).endswith("step-000003"):
            raise Crash
        return real(path, row)

    monkeypatch.setattr(training, "append_jsonl", crash_before_recording)
    with pytest.raises(Crash):
        sft(tmp_path / "broken", keep=1)
    log = read_jsonl(tmp_path / "broken" / "checkpoints.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    assert uri_to_path(log[-1]["state"]).is_dir() and not uri_to_path(log[0]["state"]).exists()
    monkeypatch.setattr(training, "append_jsonl", real)
    resumed = sft(tmp_path / "broken", keep=1)
    assert resumed.resumed_from == 2 and _states_on_disk(resumed) == ["step-000003"]
    a, b = (load_file(uri_to_path(r.sampler) / "adapter_model.safetensors") for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # pruning cost nothing


def test_prune_states_leaves_tinker_states_and_missing_folders_alone(tmp_path):
    folders = [tmp_path / f"step-{i}" for i in range(3)]
    for f in folders:
        f.mkdir()
    rows = [{"step": i, "state": f.as_uri()} for i, f in enumerate(folders)]
    rows.insert(0, {"step": 0, "state": "tinker://run/weights/step-0"})
    _write_jsonl(tmp_path / "checkpoints.jsonl", rows + [{"step": 2, "state": folders[-1].as_uri(), "final": True}])
    removed = training.prune_states(tmp_path / "checkpoints.jsonl", keep=2)
    assert removed == [folders[0].as_uri()]
    assert [f.exists() for f in folders] == [False, True, True]
    assert training.prune_states(tmp_path / "checkpoints.jsonl", keep=2) == []  # idempotent
