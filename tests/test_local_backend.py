"""The local backend at its interface: training state round trips, sampling, log-probs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tinker import types

from character.backend.local import LocalService
from character.settings import Workspace
from character.storage import uri_to_path
from character.train.renderer import Renderer, to_datum


@pytest.fixture
def service(workdir):
    return LocalService(Workspace(workdir), device="cpu", seed=0)


def _data(service, n=4):
    r = Renderer(service.get_tokenizer("tiny"))
    out = []
    for i in range(n):
        t, w = r.training_tokens(
            [
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": f"I answer number {i} plainly."},
            ]
        )
        out.append(to_datum(t, w))
    return out


def _lora(client) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in client.model.named_parameters() if "lora_" in k}


def _step(client, data, lr=1e-2):
    client.forward_backward(data, "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.98, eps=1e-8)).result()


def test_save_restore_round_trip_is_exact(service):
    data = _data(service)
    a = service.create_lora_training_client("tiny", rank=8)
    _step(a, data)
    _step(a, data)
    uri = a.save_state("two").result().path
    assert uri.startswith("file://") and "/weights/two" in uri
    b = service.create_training_client_from_state_with_optimizer(uri)
    wa, wb = _lora(a), _lora(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(sa["state"][i][key]), torch.as_tensor(sb["state"][i][key]))
    assert b.steps == 2
    # the restored client continues exactly as the original would have
    _step(a, data)
    _step(b, data)
    wa, wb = _lora(a), _lora(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_from_state_without_optimizer_keeps_weights_and_resets_optimizer(service):
    data = _data(service)
    a = service.create_lora_training_client("tiny", rank=8)
    _step(a, data)
    uri = a.save_state("one").result().path
    b = service.create_training_client_from_state(uri)
    assert all(torch.equal(x, y) for x, y in zip(_lora(a).values(), _lora(b).values()))
    assert b.optimizer.state_dict()["state"] == {}
    assert b.steps == 0 and b.run_dir != a.run_dir


def test_lora_b_starts_at_zero_and_training_moves_it(service):
    a = service.create_lora_training_client("tiny", rank=8)
    assert all(v.abs().sum() == 0 for k, v in _lora(a).items() if "lora_B" in k)
    _step(a, _data(service))
    assert any(v.abs().sum() > 0 for k, v in _lora(a).items() if "lora_B" in k)


def test_cross_entropy_is_the_weighted_sum_of_reference_logprobs(service):
    data = _data(service, 2)
    ref = service.create_sampling_client(base_model="tiny")
    client = service.create_lora_training_client("tiny", rank=8)  # B = 0: same function as the base
    out = client.forward_backward(data, "cross_entropy").result()
    expected = 0.0
    for d in data:
        seq = d.model_input.to_ints() + d.loss_fn_inputs["target_tokens"].tolist()[-1:]
        lp = ref.compute_logprobs(types.ModelInput.from_ints(seq)).result()
        assert lp[0] is None
        expected += -sum(x * w for x, w in zip(lp[1:], d.loss_fn_inputs["weights"].tolist()))
        got = out.loss_fn_outputs[data.index(d)]["logprobs"].tolist()
        assert got == pytest.approx(lp[1:], abs=1e-5)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)


def test_sampler_checkpoint_is_a_peft_adapter(service, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a = service.create_lora_training_client("tiny", rank=8)
    _step(a, _data(service))
    uri = a.save_weights_for_sampler("s").result().path
    folder = uri_to_path(uri)
    assert (folder / "adapter_config.json").is_file() and not (folder / "optimizer.pt").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), folder)
    saved = load_file(folder / "adapter_model.safetensors")
    live = {k.replace(".default", ""): v for k, v in _lora(a).items()}
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    assert model is not None


def test_sampling_is_seeded_per_request_not_per_batch(service):
    sc = service.create_sampling_client(base_model="tiny")
    r = Renderer(sc.get_tokenizer())
    prompts = [r.prompt([{"role": "user", "content": q}]) for q in ("Hi there.", "How do tides work?", "Why?")]
    params = lambda s: types.SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=s)  # noqa: E731
    together = [sc.sample(types.ModelInput.from_ints(p), 2, params(i)) for i, p in enumerate(prompts)]
    together = [[list(s.tokens) for s in f.result().sequences] for f in together]
    alone = [
        [list(s.tokens) for s in sc.sample(types.ModelInput.from_ints(prompts[1]), 2, params(1)).result().sequences]
    ]
    assert alone[0] == together[1]
    assert together[1][0] != together[1][1]  # the two samples of one request differ


def test_greedy_sampling_matches_transformers_generate(service, tiny_dir):
    from transformers import AutoModelForCausalLM

    sc = service.create_sampling_client(base_model="tiny")
    r = Renderer(sc.get_tokenizer())
    prompt = r.prompt([{"role": "user", "content": "Tell me about courage."}])
    seq = (
        sc.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=30, temperature=0.0, stop=[]))
        .result()
        .sequences[0]
    )
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None, min_new_tokens=30)[
        0, len(prompt) :
    ].tolist()
    assert list(seq.tokens) == ref
    assert seq.stop_reason == "length" and len(seq.tokens) == 30


def test_stop_tokens_and_strings(service):
    sc = service.create_sampling_client(base_model="tiny")
    tok = sc.get_tokenizer()
    prompt = types.ModelInput.from_ints(Renderer(tok).prompt([{"role": "user", "content": "Hello."}]))
    seq = sc.sample(prompt, 1, types.SamplingParams(max_tokens=200, temperature=0.7, seed=1)).result().sequences[0]
    assert seq.stop_reason == "stop" and seq.tokens[-1] == tok.eos_token_id
    assert tok.eos_token_id not in seq.tokens[:-1]
    by_string = sc.sample(prompt, 1, types.SamplingParams(max_tokens=200, temperature=0.7, seed=1, stop=[" "]))
    s2 = by_string.result().sequences[0]
    assert s2.stop_reason == "stop" and " " in tok.decode(s2.tokens) and " " not in tok.decode(s2.tokens[:-1])
    assert len(s2.tokens) < len(seq.tokens)


def test_length_chunks_group_similar_lengths_and_cover_every_index():
    from character.backend.generation import length_chunks

    lengths = [300, 20, 290, 25, 150, 160, 22, 310]
    chunks = length_chunks(lengths, min_tokens=1)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:  # within a chunk, padding stays under 20% of the longest
        assert min(lengths[i] for i in c) >= 0.8 * max(lengths[i] for i in c)
    small = [n // 10 for n in lengths]  # under min_tokens padded: one chunk, longest first
    assert length_chunks(small) == [sorted(range(8), key=lambda i: -small[i])]


def test_chunked_logprobs_equal_one_sequence_at_a_time(base, one_thread):
    import random

    from character.backend.generation import length_chunks, token_logprobs

    rng = random.Random(0)
    lengths = (900, 5, 850, 300, 40, 41, 700, 180, 7, 250, 64)
    assert len(length_chunks(list(lengths))) >= 3  # the batch really is split
    seqs = [[rng.randrange(3, 1000) for _ in range(n)] for n in lengths]
    chunked = token_logprobs(base, seqs, pad_id=0)
    for s, got in zip(seqs, chunked):
        alone = token_logprobs(base, [s], pad_id=0)[0]
        assert got.shape == (len(s) - 1,)
        assert torch.allclose(got, alone, atol=1e-5), float((got - alone).abs().max())


def test_vectorized_sampler_draws_from_the_softmax_with_top_k_and_top_p():
    from character.backend.generation import SampleRequest, _pick_rows

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    n = 4000

    def draws(temperature=1.0, top_p=1.0, top_k=0):
        reqs = [SampleRequest([1], i, 1, temperature, top_p, top_k, frozenset(), ()) for i in range(n)]
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        picks = _pick_rows(logits.expand(n, -1).clone(), list(range(n)), reqs, gens)
        toks = torch.tensor([picks[i][0] for i in range(n)])
        return torch.bincount(toks, minlength=5).float() / n, picks

    freq, picks = draws()
    assert torch.allclose(freq, torch.softmax(logits, -1), atol=0.03), freq
    t, lp = picks[0]
    assert lp == pytest.approx(float(torch.log_softmax(logits, -1)[t]), abs=1e-6)
    freq, _ = draws(top_k=2)  # only the two best, renormalized
    want = torch.cat([torch.softmax(logits[:2], -1), torch.zeros(3)])
    assert torch.allclose(freq, want, atol=0.03) and freq[2:].sum() == 0, freq
    freq, _ = draws(top_p=0.5)  # the top token alone holds more than half the mass
    assert freq[0] == 1.0
    freq, _ = draws(temperature=0.0)
    assert freq[0] == 1.0
