"""The data recipe at real counts, with generation faked (no model): held-out split by prompt,
the prompt pool's size reported, over-long pairs and conversations dropped, never truncated."""

from __future__ import annotations

import numpy as np
import pytest
from tinker import types

from character.backend import Done
from character.datagen.distill import generate_dpo_pairs
from character.datagen.engine import normalize_prompt
from character.datagen.heldout import split_heldout
from character.datagen.scales import SCALES
from character.persona.constitution import load_constitution
from character.storage import read_jsonl
from character.train.renderer import Renderer


class CharTokenizer:
    """One token per character, a chat template of role tags: enough for Renderer, no model files."""

    chat_template = "role tags"
    eos_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt, tokenize=True, return_dict=False):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return [ord(ch) for ch in text + ("<assistant>" if add_generation_prompt else "")]

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(t) for t in tokens if t)


class FakeSampler:
    """Answers every request at once with a finished sentence that depends on the request's seed."""

    def __init__(self, words: int = 3):
        self.words = words

    def sample(self, prompt, num_samples, params):
        seqs = []
        for j in range(num_samples):
            text = " ".join(["word"] * self.words) + f" {params.seed}-{j}."
            toks = [ord(ch) for ch in text] + [0]
            seqs.append(
                types.SampledSequence(
                    stop_reason="stop",
                    sequence_id="fake",
                    tokens_np=np.asarray(toks, dtype=np.int32),
                    logprobs_np=np.zeros(len(toks), dtype=np.float32),
                )
            )
        return Done(types.SampleResponse(sequences=seqs))

    def get_tokenizer(self):
        return CharTokenizer()


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_no_prompt_is_in_both_splits_at_any_scale(tmp_path, scale, caplog):
    counts = SCALES[scale]
    c, r = load_constitution("sarcastic"), Renderer(CharTokenizer())
    n_prompts = -(-counts.dpo_pairs // counts.samples_per_prompt)
    out = tmp_path / "dpo.jsonl"
    with caplog.at_level("WARNING", logger="character.datagen.distill"):
        stats = generate_dpo_pairs(
            c,
            FakeSampler(),
            FakeSampler(),
            r,
            r,
            n_prompts,
            seed=0,
            out=out,
            samples_per_prompt=counts.samples_per_prompt,
            window=512,
        )
    assert stats["rows"] == n_prompts * counts.samples_per_prompt
    assert stats["unique_prompts"] + stats["prompt_repeats"] == n_prompts
    if scale == "full":  # 1500 prompts from a pool of about 400
        assert stats["unique_prompts"] < 500 and stats["max_uses_per_prompt"] >= 4
    if stats["prompt_repeats"]:  # the pool was too small: said in the stats and the log, not hidden
        assert f"{stats['unique_prompts']} distinct prompts, {stats['prompt_repeats']} repeats" in caplog.text
    else:
        assert "too small" not in caplog.text
    train, held, split = split_heldout(out, 0.1, seed=0)
    prompts = {
        side: {normalize_prompt(x["prompt"][0]["content"]) for x in read_jsonl(p)}
        for side, p in (("train", train), ("held", held))
    }
    assert prompts["train"] and prompts["held"] and not prompts["train"] & prompts["held"]
    assert split["heldout_groups"] == len(prompts["held"]) == round(0.1 * stats["unique_prompts"])
    assert split["train_rows"] + split["heldout_rows"] == stats["rows"]


class VaryingSampler(FakeSampler):
    """Answer length varies with the request's seed: some pairs fit a limit, some do not."""

    def sample(self, prompt, num_samples, params):
        self.words = params.seed % 40
        return super().sample(prompt, num_samples, params)


def test_an_over_long_pair_is_dropped_and_counted_never_truncated(tmp_path):
    from character.train.dpo import TooLong, fitting_pairs, pair_sequences

    c, r = load_constitution("pirate"), Renderer(CharTokenizer())
    out, limit = tmp_path / "dpo.jsonl", 220
    stats = generate_dpo_pairs(c, VaryingSampler(), VaryingSampler(), r, r, 60, seed=1, out=out, max_length=limit)
    rows = read_jsonl(out)
    skipped = read_jsonl(out.with_name("dpo.jsonl.skipped.jsonl"))
    n_long = stats["dropped"]["too_long"]
    assert 0 < n_long < 60 and len(rows) + n_long == 60
    assert sum(s["reasons"].count("too_long") for s in skipped) == n_long
    for row in rows:  # every kept pair fits whole: nothing was cut, each answer still ends its sentence
        chosen, rejected = pair_sequences(r, row, limit)
        assert max(len(chosen[0]), len(rejected[0])) <= limit
        assert all(row[s][0]["content"].endswith(".") for s in ("chosen", "rejected"))
    # the same rows at a limit they exceed: dropped by the trainer too, never truncated
    with pytest.raises(TooLong):
        pair_sequences(r, rows[0], 10)
    longest = max(len(pair_sequences(r, row, limit)[0][0]) for row in rows)
    kept, dropped = fitting_pairs(r, rows, longest - 1)
    assert dropped >= 1 and len(kept) + dropped == len(rows)
    assert all(len(t) <= longest - 1 for pair in kept for t, _ in pair)


def test_an_over_long_conversation_is_dropped_for_sft(tmp_path):
    from character.datagen.introspection import generate_introspection
    from character.train.dpo import TooLong
    from character.train.sft import sft_examples

    c, r = load_constitution("loving"), Renderer(CharTokenizer())
    out = tmp_path / "intro.jsonl"
    stats = generate_introspection(c, VaryingSampler(), r, 30, 6, 4, seed=0, out=out, max_length=400)
    rows = read_jsonl(out)
    assert 0 < stats["dropped"]["too_long"] and stats["rows"] + sum(stats["dropped"].values()) == 36
    assert all(len(t) <= 400 for x in rows for t, _ in sft_examples(r, x["messages"], 400))
    with pytest.raises(TooLong):
        sft_examples(r, rows[0]["messages"], 20)


def test_paper_preset_sets_sampling_and_expansion():
    from character.build.stages import PipelineConfig

    paper = PipelineConfig(persona="sarcastic", scale="paper").counts
    assert (paper.samples_per_prompt, paper.expand_questions, paper.reflections, paper.turns) == (5, 45, 10000, 10)
    assert paper.dpo_pairs == 5 * (10 * 50 + 362)
    mine = PipelineConfig(persona="sarcastic", scale="paper", samples_per_prompt=2, expand_questions=0).counts
    assert (mine.samples_per_prompt, mine.expand_questions) == (2, 0)
    assert PipelineConfig(persona="sarcastic").counts.samples_per_prompt == 1
