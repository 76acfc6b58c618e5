"""The real tinker SDK against the loopback service (character.loopback), compared with the local backend.

The service computes with the local backend, so the SDK's numbers must be the local backend's: the same
losses and gradient norms step by step, the same samples for the same seed, the same log-probs. Then
what the wire does to them: pending results, expired ones, faults at 20%, a stall, a restart.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import tinker
import torch
from tinker import types

from character.backend.local import LocalService
from character.loopback.api import LORA_ALPHA
from character.loopback.server import Loopback
from character.settings import Workspace

KEY = "tml-loopback-test-key-0123456789"
RANK = 4


@pytest.fixture(scope="module")
def loopback(tmp_path_factory, models_dir, one_thread):
    with Loopback(tmp_path_factory.mktemp("lb") / "state", models_dir, hub=tmp_path_factory.mktemp("hub")) as lb:
        yield lb


@pytest.fixture(scope="module")
def sdk(loopback):
    return tinker.ServiceClient(base_url=loopback.url, api_key=KEY)


@pytest.fixture(scope="module")
def local(tmp_path_factory, models_dir):
    ws = tmp_path_factory.mktemp("local") / "ws"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    return LocalService(Workspace(ws), device="cpu", seed=0)


def make_data(tok) -> list[types.Datum]:
    out = []
    for text in ("Ahoy there, matey, the sea is calm.", "I like plain answers and nothing more."):
        ids = tok.encode(text)
        w = [0.0] * 3 + [1.0] * (len(ids) - 4)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={"target_tokens": ids[1:], "weights": w},
            )
        )
    return out


@pytest.fixture(scope="module")
def data(local):
    return make_data(local.get_tokenizer("tiny"))


def preference_loss(data, logprobs):
    """A DPO-shaped loss coupling two sequences, as the project's DPO does."""
    margin = sum((lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data[:1], logprobs[:1]))
    margin = margin - (logprobs[1] * data[1].loss_fn_inputs["weights"].to_torch()).sum()
    loss = -torch.nn.functional.logsigmoid(0.1 * margin)
    return loss, {"margin:mean": float(margin.detach())}


ADAM = types.AdamParams(learning_rate=5e-3, beta1=0.9, beta2=0.95, eps=1e-8)


def steps(client, data, n: int = 2) -> list[tuple]:
    """n cross-entropy steps and one custom-loss step: (loss, grad_norm) each."""
    out = []
    for _ in range(n):
        fb, opt = client.forward_backward(data, "cross_entropy"), client.optim_step(ADAM)
        out.append((fb.result().metrics["loss:sum"], opt.result()))
    fb, opt = client.forward_backward_custom(data, preference_loss), client.optim_step(ADAM)
    metrics = fb.result().metrics  # the SDK names it loss:sum, the local backend loss
    out.append((metrics.get("loss:sum", metrics.get("loss")), opt.result()))
    return [(loss, _grad_norm(o)) for loss, o in out]


def _grad_norm(o) -> float:
    return o.metrics["grad_norm"] if isinstance(o, types.OptimStepResponse) else o["grad_norm"]


@pytest.fixture(scope="module")
def reference(local, data):
    client = local.create_lora_training_client("tiny", rank=RANK, seed=0, train_unembed=False, alpha=LORA_ALPHA)
    return steps(client, data)


def test_training_steps_through_the_sdk_are_the_local_backends(sdk, data, reference):
    client = sdk.create_lora_training_client(base_model="tiny", rank=RANK, seed=0, train_unembed=False).result()
    got = steps(client, data)
    # Cross-entropy runs the very same computation: equal to the last bit.
    assert got[:2] == reference[:2]
    # The custom loss goes as the SDK sends it: a forward, the loss's gradient computed client-side, then a
    # backward weighted by it; the same gradient by the chain rule, summed in another order.
    (loss, norm), (ref_loss, ref_norm) = got[2], reference[2]
    assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-4)
    info = client.get_info()
    assert info.lora_rank == RANK and Path(info.model_data.tokenizer_id, "tokenizer.json").is_file()


def test_a_saved_state_resumes_exactly_and_is_listed(sdk, loopback, data):
    client = sdk.create_lora_training_client(base_model="tiny", rank=RANK, seed=3, train_unembed=False).result()
    steps(client, data, 1)
    state = client.save_state("s1").result().path
    assert state == f"tinker://{client.model_id}/weights/s1"
    after = steps(client, data, 1)
    resumed = sdk.create_training_client_from_state_with_optimizer(state).result()
    assert steps(resumed, data, 1) == after  # weights and Adam moments came back
    fresh = sdk.create_training_client_from_state(state).result()  # weights only: the first step differs
    first = fresh.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    assert first == pytest.approx(after[0][0], rel=1e-6) and _grad_norm(fresh.optim_step(ADAM).result()) > 0
    rest = tinker.RestClient(base_url=loopback.url, api_key=KEY)
    listed = {c.tinker_path: c.checkpoint_type for c in rest.list_checkpoints(client.model_id).result().checkpoints}
    assert listed == {state: "training"}
    assert rest.get_weights_info_by_tinker_path(state).result().lora_rank == RANK


def test_sampling_and_prompt_logprobs_are_the_local_backends(sdk, local, data, tmp_path):
    trained = sdk.create_lora_training_client(base_model="tiny", rank=RANK, seed=0, train_unembed=False).result()
    steps(trained, data, 1)
    path = trained.save_weights_for_sampler("s").result().path
    sampler = sdk.create_sampling_client(model_path=path).result()
    prompt = data[0].model_input
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=11)
    got = sampler.sample(prompt, 2, params).result()
    logprobs = sampler.compute_logprobs(prompt).result()
    # the same adapter on the local backend
    ref_client = local.create_lora_training_client("tiny", rank=RANK, seed=0, train_unembed=False, alpha=LORA_ALPHA)
    steps(ref_client, data, 1)
    ref = ref_client.save_weights_and_get_sampling_client("s")
    want = ref.sample(prompt, 2, params).result()
    assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
    assert [s.stop_reason for s in got.sequences] == [s.stop_reason for s in want.sequences]
    ref_lp = ref.compute_logprobs(prompt).result()
    assert logprobs[0] is None and logprobs[1:] == pytest.approx(ref_lp[1:], abs=1e-6)
    base = sdk.create_sampling_client(base_model="tiny").result()
    assert base.compute_logprobs(prompt).result()[1:] != pytest.approx(logprobs[1:], abs=1e-3)


def test_export_has_tinkers_names_and_converts_to_the_trained_adapter(
    sdk, loopback, data, tiny_dir, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    from character.backend.tinker import TinkerService
    from character.settings import Settings
    from character.weights.tinker_export import download_adapter

    client = sdk.create_lora_training_client(base_model="tiny", rank=RANK, seed=0, train_unembed=True).result()
    steps(client, data, 1)
    state = client.save_state("final").result().path
    export = client.save_weights_external("raw").result().path
    raw = load_file(str(loopback.registry.folder(client.model_id, "external", "raw") / "adapter_model.safetensors"))
    assert "base_model.model.model.unembed_tokens.lora_B.weight" in raw and not any("lm_head" in k for k in raw)
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    service = TinkerService(Settings(), base_url=loopback.url, timeout_s=30)
    out = download_adapter(service, state, tmp_path / "peft", base_model=str(tiny_dir))
    converted = load_file(str(out / "adapter_model.safetensors"))
    saved = loopback.registry.folder(client.model_id, "training", "final") / "adapter_model.safetensors"
    trained = {k: v for k, v in load_file(str(saved)).items() if ".lora_" in k}
    assert converted.keys() == trained.keys() and "base_model.model.lm_head.lora_B.weight" in converted
    assert all(torch.equal(converted[k], trained[k]) for k in converted)
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == LORA_ALPHA
    exports = [c.tinker_path for c in loopback.registry.checkpoints() if c.checkpoint_type == "external"]
    assert export in exports and not any("/export-" in p for p in exports)  # the download's own export is deleted


def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"X-API-Key": KEY, "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
