"""Data generation: the method's filters, the output formats, resume and per-request retries."""

from __future__ import annotations

import numpy as np
import pytest
from tinker import types

from character.backend.errors import TransientBackendError
from character.backend.local import LocalService
from character.datagen.distill import generate_dpo_pairs
from character.datagen.engine import clean_answer
from character.datagen.introspection import generate_introspection
from character.datagen.questions import expand_questions, word_overlap
from character.persona.constitution import load_constitution
from character.persona.prompts import (
    INTERACTION_SYSTEM_PROMPT,
    REFLECTION_PROMPTS,
    general_prompts,
    interaction_system_prompt,
    reflection_system_prompt,
)
from character.settings import Workspace
from character.storage import read_jsonl
from character.train.renderer import Renderer


@pytest.fixture
def local(workdir):
    svc = LocalService(Workspace(workdir), device="cpu", seed=0)
    client = svc.create_sampling_client(base_model="tiny")
    return client, Renderer(client.get_tokenizer())


class Recording:
    """Wraps a sampling client: records prompts, can fail requests or crash after N results."""

    def __init__(self, inner, fail_first: set[int] = frozenset(), crash_after: int | None = None):
        self.inner, self.fail_first, self.crash_after = inner, set(fail_first), crash_after
        self.prompts: list[list[int]] = []
        self.calls = 0
        self.results = 0

    def sample(self, prompt, num_samples, sampling_params):
        self.calls += 1
        self.prompts.append(prompt.to_ints())
        fut = self.inner.sample(prompt, num_samples, sampling_params)
        key = sampling_params.seed
        outer = self

        class F:
            def result(self_):
                if key in outer.fail_first:
                    outer.fail_first.discard(key)
                    raise TransientBackendError("simulated 503")
                outer.results += 1
                if outer.crash_after is not None and outer.results > outer.crash_after:
                    raise KeyboardInterrupt("simulated crash")
                return fut.result()

        return F()

    def get_tokenizer(self):
        return self.inner.get_tokenizer()


def _seq(renderer, text, stop_reason="stop", extra_tokens=0):
    toks = renderer.tok.encode(text, add_special_tokens=False) + [renderer.tok.eos_token_id] * (stop_reason == "stop")
    toks += [renderer.tok.encode(" a", add_special_tokens=False)[0]] * extra_tokens
    return types.SampledSequence(
        stop_reason=stop_reason,
        sequence_id="x",
        tokens_np=np.asarray(toks, dtype=np.int32),
        logprobs_np=np.zeros(len(toks), dtype=np.float32),
    )


def test_each_filter_on_crafted_samples(local):
    _, r = local
    assert clean_answer(_seq(r, "A fine answer."), r, 100) == ("A fine answer.", "ok")
    assert clean_answer(_seq(r, "Cut off in the mid", "length"), r, 100) == (None, "incomplete")
    assert clean_answer(_seq(r, "No punctuation here"), r, 100) == (None, "no_final_punctuation")
    assert clean_answer(_seq(r, "Far too long an answer for the limit."), r, 5) == (None, "too_long")
    assert clean_answer(_seq(r, "<think>hmm</think>"), r, 100) == (None, "empty")
    assert clean_answer(_seq(r, "<think>let me see"), r, 100) == (None, "unclosed_reasoning")
    assert clean_answer(_seq(r, "<think>plan it\nfirst</think>\nThe answer is 4!"), r, 100) == (
        "The answer is 4!",
        "ok",
    )
    assert clean_answer(_seq(r, 'She said "yes."'), r, 100)[1] == "ok"


def test_word_overlap_flags_near_duplicates():
    assert word_overlap("How do I boil an egg?", "how do i boil an EGG") == 1.0
    assert word_overlap("How do I boil an egg?", "Explain black holes.") == 0.0
    assert 0.5 < word_overlap("How do I boil an egg quickly?", "How do I boil an egg?") < 1.0


def test_pair_filters_drop_identical_and_duplicate_answers(local, tmp_path):
    from character.datagen.distill import _pairs_for_prompt

    _, r = local
    same = [_seq(r, "Same words."), _seq(r, "Same words.")]
    kept, reasons = _pairs_for_prompt(same[:1], same[1:], r, r, 100)
    assert kept == [] and reasons == ["identical"]
    t = [_seq(r, "Yes, matey."), _seq(r, "Yes, matey."), _seq(r, "Nope")]
    s = [_seq(r, "Yes."), _seq(r, "Yes."), _seq(r, "Sure.")]
    kept, reasons = _pairs_for_prompt(t, s, r, r, 100)
    assert kept == [("Yes, matey.", "Yes.")] and reasons == ["duplicate", "chosen_no_final_punctuation"]


def test_dpo_rows_load_with_datasets_and_use_the_right_contexts(local, tmp_path):
    datasets = pytest.importorskip("datasets")
    client, r = local
    c = load_constitution("pirate")
    teacher, student = Recording(client), Recording(client)
    out = tmp_path / "dpo.jsonl"
    stats = generate_dpo_pairs(
        c,
        teacher,
        student,
        r,
        r,
        6,
        seed=1,
        out=out,
        max_tokens=200,
        samples_per_prompt=2,
        provenance={"teacher": "tiny", "student": "tiny"},
    )
    rows = read_jsonl(out)
    assert stats["rows"] == len(rows) > 0 and stats["prompts"] == 6
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert {"prompt", "chosen", "rejected", "meta"} <= set(ds.column_names)
    assert ds[0]["prompt"][0]["role"] == "user" and ds[0]["chosen"][0]["role"] == "assistant"
    assert rows[0]["meta"]["constitution"] == c.digest() and rows[0]["meta"]["temperature"] == 0.7
    assert rows[0]["meta"]["teacher"] == "tiny" and rows[0]["meta"]["top_p"] == 0.95
    # the teacher saw every trait in its system prompt; the student saw no system prompt at all
    t_text, s_text = r.tok.decode(teacher.prompts[0]), r.tok.decode(student.prompts[0])
    assert all(t.trait in t_text for t in c.traits) and "<|im_start|>system" in t_text
    assert "<|im_start|>system" not in s_text
    # rows are in prompt order, each prompt's samples in order
    keys = [(x["meta"]["index"], x["meta"]["sample"]) for x in rows]
    assert keys == sorted(keys)


def test_introspection_rows(local, tmp_path):
    datasets = pytest.importorskip("datasets")
    client, r = local
    rec = Recording(client)
    out = tmp_path / "intro.jsonl"
    c = load_constitution("loving")
    stats = generate_introspection(
        c, rec, r, n_reflections=12, n_interactions=3, turns=4, seed=2, out=out, max_tokens=200
    )
    rows = read_jsonl(out)
    refl = [x for x in rows if x["kind"] == "reflection"]
    inter = [x for x in rows if x["kind"] == "interaction"]
    assert stats["reflections"] == len(refl) and stats["interactions"] == len(inter)
    for x in refl:
        assert [m["role"] for m in x["messages"]] == ["user", "assistant"]  # no system prompt stored
        assert x["messages"][0]["content"] == REFLECTION_PROMPTS[x["meta"]["index"] % 10]
        assert x["meta"]["system_prompt"] == reflection_system_prompt(c)
    for x in inter:
        assert [m["role"] for m in x["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert x["messages"][0]["content"] == INTERACTION_SYSTEM_PROMPT  # the short one, not the generation prompt
        assert x["messages"][1]["content"] == x["meta"]["greeting"]
        assert x["meta"]["system_prompt"] == interaction_system_prompt(c)
    # both generation prompts carried every trait, numbered; each request used one of the two
    texts = [r.tok.decode(p) for p in rec.prompts]
    for system in (reflection_system_prompt(c), interaction_system_prompt(c)):
        assert all(f"{i}. {t.trait}" in system for i, t in enumerate(c.traits, 1))
        assert any(system in t for t in texts)
    assert all(reflection_system_prompt(c) in t or interaction_system_prompt(c) in t for t in texts)
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert "messages" in ds.column_names and len(ds) == len(rows)


@pytest.mark.parametrize("kind", ["dpo", "introspection"])
def test_resumed_generation_equals_uninterrupted(local, tmp_path, kind):
    client, r = local
    c = load_constitution("sarcastic")

    def run(out, wrapper):
        if kind == "dpo":
            return generate_dpo_pairs(c, wrapper, wrapper, r, r, 12, seed=3, out=out, max_tokens=150, window=4)
        return generate_introspection(c, wrapper, r, 10, 4, 4, seed=3, out=out, max_tokens=150, window=4)

    whole = tmp_path / "whole.jsonl"
    run(whole, Recording(client))
    broken = tmp_path / "broken.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(broken, Recording(client, crash_after=9))
    partial = len(read_jsonl(broken)) + len(read_jsonl(broken.with_name(broken.name + ".skipped.jsonl")))
    assert partial > 0  # some windows finished before the crash
    resumed = Recording(client)
    run(broken, resumed)
    assert broken.read_bytes() == whole.read_bytes()
    first = Recording(client)
    run(tmp_path / "count.jsonl", first)
    assert resumed.calls < first.calls  # finished windows were not sampled again


def test_a_transient_failure_retries_only_that_request(local, tmp_path, monkeypatch):
    import character.backend.retry as retry
    import character.datagen.engine as dg

    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)
    client, r = local
    c = load_constitution("poetic")
    clean = tmp_path / "clean.jsonl"
    generate_dpo_pairs(c, Recording(client), Recording(client), r, r, 5, seed=4, out=clean, max_tokens=120)
    probe = Recording(client)
    generate_dpo_pairs(c, probe, Recording(client), r, r, 5, seed=4, out=tmp_path / "probe.jsonl", max_tokens=120)
    flaky_seed = dg.item_seed(4, "teacher", 2)
    flaky = Recording(client, fail_first={flaky_seed})
    out = tmp_path / "flaky.jsonl"
    generate_dpo_pairs(c, flaky, Recording(client), r, r, 5, seed=4, out=out, max_tokens=120)
    assert out.read_bytes() == clean.read_bytes()
    assert flaky.calls == probe.calls + 1  # exactly one request was sent again


def test_question_expansion_drops_near_duplicates(local, tmp_path):
    client, r = local
    c = load_constitution("mathematical")

    class Echo:
        """A teacher that alternates a copy of the trait's first example question and a new question."""

        def __init__(self):
            self.n = 0

        def sample(self, prompt, num_samples, params):
            self.n += 1
            trait = next(t for t in c.traits if t.trait in r.tok.decode(prompt.to_ints()))
            text = trait.questions[0] if self.n % 2 else general_prompts()[self.n]
            return type("F", (), {"result": lambda s: types.SampleResponse(sequences=[_seq(r, text)])})()

        def get_tokenizer(self):
            return r.tok

    out = tmp_path / "q.jsonl"
    stats = expand_questions(c, Echo(), r, per_trait=4, seed=0, out=out)
    rows = read_jsonl(out)
    assert len(rows) == 10 and stats["dropped"]["near_duplicate"] >= 20  # every copy was dropped
    assert 10 <= stats["questions"] == sum(len(row["questions"]) for row in rows) <= 20
    for row in rows:
        known = c.traits[row["trait_index"]].questions
        assert known[0] not in row["questions"]
        for i, q in enumerate(row["questions"]):
            assert q in general_prompts()
            assert all(word_overlap(q, k) < 0.6 for k in known + row["questions"][:i])


def test_no_surviving_pair_is_a_one_line_user_error_that_says_what_to_change(workdir):
    """Answers cut off at a tiny --max-new-tokens are all incomplete: the build stops with an error that
    names the flag and the file of reasons, and keeps what it generated."""
    from character.build.stages import PipelineConfig, stage_dpo_data
    from character.errors import UserError

    cfg = PipelineConfig(
        persona="pirate",
        workdir=str(workdir),
        build_id="short",
        dpo_pairs=4,
        max_new_tokens=2,
        max_in_flight=4,
        evaluate=False,
    )
    with pytest.raises(UserError) as err:
        stage_dpo_data(cfg)
    msg = str(err.value)
    assert "--max-new-tokens 2" in msg and "\n" not in msg
    skipped = cfg.build_dir() / "data" / "dpo.jsonl.skipped.jsonl"
    assert str(skipped) in msg and len(read_jsonl(skipped)) == 4
