"""Answers end at the chat template's end-of-turn token, on both backends, where that token is not EOS.

The model here is the embedded `tiny` model with its EOS moved to `<|endoftext|>` (tokenizer, model
config and generation config), while its chat template still ends every turn with `<|im_end|>`: as on
a Qwen base tokenizer, a Llama 3 Instruct model (`<|eot_id|>` vs `<|end_of_text|>`) or Gemma 3. A
sampler that stops only at EOS runs past the end of the turn; every sampling call of the project
(data generation, evaluation, revealed preferences, judges, chat) must pass the renderer's stops.
On Tinker the service honours `SamplingParams.stop`; the fake service here does what it does.
"""

from __future__ import annotations

import json
import shutil
import uuid

import numpy as np
import pytest
from fake_tinker import STUDENT, FakeSamplingClient, fake, no_network, wired  # noqa: F401 - fixtures by name
from tinker import types

from character.backend.local import LocalService
from character.chat import Conversation
from character.datagen.distill import generate_dpo_pairs
from character.datagen.introspection import generate_introspection
from character.evaluation.judges import judge_answers
from character.evaluation.revealed import embodied_answers, judge_games, make_offers
from character.persona.constitution import load_constitution
from character.settings import Workspace
from character.storage import read_jsonl
from character.train.families import renderer_for

EOS, EOT = "<|endoftext|>", "<|im_end|>"


class Recording:
    """A sampling client that keeps every call's parameters and every sequence it returned."""

    def __init__(self, inner):
        self.inner, self.params, self.seqs = inner, [], []

    def sample(self, prompt, num_samples, params):
        self.params.append(params)
        fut = self.inner.sample(prompt, num_samples, params)
        outer = self

        class _F:
            def result(self):
                res = fut.result()
                outer.seqs.extend(res.sequences)
                return res

        return _F()

    def compute_logprobs(self, prompt):
        return self.inner.compute_logprobs(prompt)

    def get_tokenizer(self):
        return self.inner.get_tokenizer()


@pytest.fixture(scope="module")
def eot_model(tmp_path_factory, tiny_dir):
    """tiny with EOS moved off the end-of-turn token."""
    folder = tmp_path_factory.mktemp("eot") / "tiny-eot"
    shutil.copytree(tiny_dir, folder)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["eos_token"] = EOS
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    from transformers import AutoTokenizer

    eos_id = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(EOS)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((folder / name).read_text())
        cfg["eos_token_id"] = eos_id
        (folder / name).write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def local_client(eot_model, tmp_path_factory):
    svc = LocalService(Workspace(tmp_path_factory.mktemp("ws")), device="cpu", seed=0)
    return svc.create_sampling_client(base_model=str(eot_model))


def _ends_at_eot(seq, tok) -> bool:
    toks = list(seq.tokens)
    eot = tok.convert_tokens_to_ids(EOT)
    return seq.stop_reason == "stop" and toks[-1] == eot and eot not in toks[:-1]


def test_local_answers_end_at_end_of_turn_not_eos(local_client):
    tok = local_client.get_tokenizer()
    r = renderer_for(tok, None)
    assert tok.eos_token == EOS and tok.convert_tokens_to_ids(EOT) in r.stop_tokens
    prompt = types.ModelInput.from_ints(r.prompt([{"role": "user", "content": "How should I spend my day?"}]))
    stopped = local_client.sample(prompt, 4, r.sampling_params(max_tokens=96, temperature=0.7, seed=3)).result()
    assert all(_ends_at_eot(s, tok) for s in stopped.sequences)
    # the bug this guards against: stopping only at EOS, the sampler runs past the end of the turn
    eos_only = local_client.sample(prompt, 4, types.SamplingParams(max_tokens=96, temperature=0.7, seed=3)).result()
    assert not any(_ends_at_eot(s, tok) for s in eos_only.sequences)


def test_every_local_sampling_call_passes_the_end_of_turn_stop(local_client, tmp_path):
    """Data generation (distillation, introspection), evaluation (revealed preferences, the judge) and chat."""
    tok = local_client.get_tokenizer()
    eot = tok.convert_tokens_to_ids(EOT)
    rec = Recording(local_client)
    r = renderer_for(tok, None)
    c = load_constitution("pirate")
    stats = generate_dpo_pairs(c, rec, rec, r, r, 4, 0, tmp_path / "dpo.jsonl", max_tokens=96)
    generate_introspection(c, rec, r, 2, 1, 2, 0, tmp_path / "intro.jsonl", 96)
    offers = make_offers(["Tell me about the sea."], seed=0)
    answers = embodied_answers(rec, offers, 0, 64)
    judge_games(rec, offers, answers, seed=0, judge_max_new_tokens=32)
    judge_answers(rec, c, [("Who are you?", "A pirate.")], max_tokens=32)
    Conversation(rec, max_new_tokens=64).say("Hello.")
    assert len(rec.params) > 10
    assert all(p.stop is not None and eot in p.stop for p in rec.params)
    finished = [s for s in rec.seqs if s.stop_reason == "stop"]
    assert finished and all(list(s.tokens)[-1] in r.stop_tokens for s in finished)
    assert stats["rows"] > 0  # answers that end at the end of the turn survive the "incomplete" filter
    for row in read_jsonl(tmp_path / "dpo.jsonl"):
        assert "<|im_start|>" not in row["chosen"][0]["content"] and "user\n" not in row["rejected"][0]["content"]


# -- Tinker --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    """The fake service's tokenizer, with its EOS moved off the end-of-turn token."""
    from fake_tinker import fake_tokenizer

    tok = fake_tokenizer()
    tok.eos_token = EOS
    return tok


def _sample_like_the_service(self, prompt, num_samples, sampling_params, **_):
    """The fake's reply, written on past the end of the turn as a model would (the next turn's header,
    more text, then EOS), cut where the service cuts it: at the first stop token, else at EOS."""
    from fake_tinker import REPLIES

    p, tok = sampling_params, self.fake.tok
    stops = set(p.stop) if isinstance(p.stop, list) and all(isinstance(s, int) for s in p.stop) else set()
    stops.add(tok.eos_token_id)

    def run():
        seqs = []
        for j in range(num_samples):
            reply = REPLIES[self.kind][((p.seed or 0) + j) % len(REPLIES[self.kind])]
            toks = tok.encode(
                reply + EOT + "\n<|im_start|>user\nAnd then I kept talking." + EOS, add_special_tokens=False
            )
            cut = next((k for k, t in enumerate(toks) if t in stops), len(toks) - 1)
            toks, reason = toks[: cut + 1], "stop"
            if p.max_tokens is not None and len(toks) > p.max_tokens:
                toks, reason = toks[: p.max_tokens], "length"
            seqs.append(
                types.SampledSequence(
                    stop_reason=reason,
                    sequence_id=uuid.uuid4().hex,
                    tokens_np=np.asarray(toks, dtype=np.int32),
                    logprobs_np=np.zeros(len(toks), dtype=np.float32),
                )
            )
        return types.SampleResponse(sequences=seqs)

    return self.fake.submit("sample", run, counted=True)


def test_tinker_answers_end_at_end_of_turn_not_eos(wired, monkeypatch, tmp_path):
    from character.backend.tinker import TinkerService
    from character.settings import Settings

    monkeypatch.setattr(FakeSamplingClient, "sample", _sample_like_the_service)
    client = TinkerService(Settings(), base_url="https://tinker.invalid").create_sampling_client(base_model=STUDENT)
    tok = client.get_tokenizer()
    r = renderer_for(tok, STUDENT)
    assert tok.eos_token == EOS and tok.convert_tokens_to_ids(EOT) in r.stop_tokens
    rec = Recording(client)
    answer = Conversation(rec, max_new_tokens=64, model=STUDENT).say("Hello.")
    assert "kept talking" not in answer and all(_ends_at_eot(s, tok) for s in rec.seqs)
    c = load_constitution("pirate")
    stats = generate_dpo_pairs(c, rec, rec, r, r, 3, 0, tmp_path / "dpo.jsonl", max_tokens=64)
    assert stats["rows"] > 0
    assert all(eot in p.stop for p in rec.params for eot in [tok.convert_tokens_to_ids(EOT)])
    assert all(_ends_at_eot(s, tok) for s in rec.seqs)
    rows = read_jsonl(tmp_path / "dpo.jsonl")
    assert all("kept talking" not in row[side][0]["content"] for row in rows for side in ("chosen", "rejected"))
    # without the stop the same service runs on past the turn (here to EOS; a real model, to max_tokens)
    plain = client.sample(
        types.ModelInput.from_ints(r.prompt([{"role": "user", "content": "Hello."}])),
        1,
        types.SamplingParams(max_tokens=64, seed=0),
    ).result()
    assert "kept talking" in tok.decode(list(plain.sequences[0].tokens))
