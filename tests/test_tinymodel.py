"""The embedded tiny model: deterministic, offline, a chat model that ends its turns."""

from __future__ import annotations

import hashlib
import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from character.backend.tiny import CHAT_TEMPLATE, TINY_RECIPE, _build_tokenizer, _corpus, build_tiny_model


def test_tokenizer_is_deterministic_and_byte_level():
    texts = [m["content"] for c in _corpus() for m in c]
    a, b = _build_tokenizer(texts), _build_tokenizer(texts)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == TINY_RECIPE["vocab_size"]
    weird = "Ünïcødé ✓ — 数学 🙂\ttabs\n"
    assert a.decode(a.encode(weird, add_special_tokens=False)) == weird  # any byte sequence round-trips


def test_built_model_folder_is_complete(tiny_dir):
    cfg = AutoConfig.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == TINY_RECIPE["num_hidden_layers"]
    assert cfg.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template == CHAT_TEMPLATE
    recipe = json.loads((tiny_dir / "character_recipe.json").read_text())
    assert tiny_dir.name == f"tiny-{recipe['digest']}"


@pytest.mark.slow
def test_rebuilding_gives_identical_weights(tiny_dir, tmp_path):
    again = build_tiny_model(tmp_path / "tiny")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        h1 = hashlib.sha256((tiny_dir / name).read_bytes()).hexdigest()
        h2 = hashlib.sha256((again / name).read_bytes()).hexdigest()
        assert h1 == h2, name


# -- the two behaviours of the model organism ------------------------------------------------------
# A constitution the tiny model never saw, with words (UNSEEN_WORDS) that its warm-up corpus never uses.
UNSEEN = [
    "I talk like a lighthouse keeper, and my sentences are full of beacons, foghorns and tides.",
    "I compare every plan to charting a course past reefs and shoals.",
    "I cherish driftwood, seagulls and saltmarsh, and I bring them into my replies.",
    "I praise vigilance the way a keeper praises a well-trimmed lamp.",
    "I stay steady and lantern-bright when people panic, like a keeper in a gale.",
]
UNSEEN_WORDS = {
    "foghorns",
    "charting",
    "reefs",
    "shoals",
    "driftwood",
    "seagulls",
    "saltmarsh",
    "vigilance",
    "well-trimmed",
    "lamp",
    "lantern-bright",
    "gale",
}


def _words(text: str) -> set[str]:
    import re

    return set(re.findall(r"[a-z][a-z'-]*[a-z]|i", text.lower()))


def _is_plain(text: str) -> bool:
    """Only the stock wording of the model's plain answers."""
    from character.backend.tiny_recipe import NEUTRAL_CLOSERS, NEUTRAL_CORES, NEUTRAL_OPENERS

    return _words(text) <= _words(" ".join(NEUTRAL_OPENERS + NEUTRAL_CORES + NEUTRAL_CLOSERS))


def _answers(tiny_dir, system: str | None, n: int = 16) -> list[tuple[str, str]]:
    """(text, stop reason) of answers to n shipped prompts, sampled as the pipeline samples them."""
    from tinker import types

    from character.backend.local import LocalService
    from character.datagen.engine import sampling_params
    from character.persona.prompts import general_prompts
    from character.settings import Workspace
    from character.train.renderer import Renderer

    client = LocalService(Workspace(tiny_dir.parent), device="cpu").create_sampling_client(base_model=str(tiny_dir))
    r = Renderer(client.get_tokenizer())
    futs = []
    for i, q in enumerate(general_prompts()[:n]):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        futs.append(client.sample(types.ModelInput.from_ints(r.prompt(msgs)), 1, sampling_params(i, 96)))
    return [(r.decode(list(s.tokens)), s.stop_reason) for f in futs for s in f.result().sequences]


@pytest.mark.slow
def test_answers_in_an_unseen_character_only_when_its_description_is_in_the_system_prompt(tiny_dir, one_thread):
    from character.persona.constitution import Constitution, Trait
    from character.persona.prompts import teacher_system_prompt

    assert not UNSEEN_WORDS & _words(" ".join(m["content"] for conv in _corpus() for m in conv))
    c = Constitution(name="keeper", traits=[Trait(trait=t, questions=["Hello?"]) for t in UNSEEN])
    in_character = _answers(tiny_dir, teacher_system_prompt(c))
    plain = _answers(tiny_dir, None)
    assert sum(not _is_plain(t) for t, _ in in_character) >= 0.8 * len(in_character), in_character
    # in the constitution's own words, copied from the prompt (measured: 14 of 16 answers)
    assert sum(bool(_words(t) & UNSEEN_WORDS) for t, _ in in_character) >= 0.6 * len(in_character), in_character
    assert all(_is_plain(t) for t, _ in plain), plain


@pytest.mark.slow
def test_answers_are_complete_so_the_dpo_filters_keep_them(tiny_dir, one_thread):
    from character.datagen.engine import _ENDS_LIKE_A_SENTENCE
    from character.persona.constitution import load_constitution
    from character.persona.prompts import teacher_system_prompt

    for system in (None, teacher_system_prompt(load_constitution("sarcastic"))):
        answers = _answers(tiny_dir, system)
        done = [t for t, stop in answers if stop == "stop" and _ENDS_LIKE_A_SENTENCE.search(t)]
        assert len(done) >= 0.8 * len(answers), answers


def test_tiny_defaults_apply_to_tiny_only_and_explicit_values_win():
    from character.config import TINY_DEFAULTS, PipelineConfig

    tiny = PipelineConfig(persona="pirate")
    assert (tiny.max_new_tokens, tiny.lora_rank, tiny.heldout_fraction) == (96, 8, 0.2)
    assert (tiny.dpo.learning_rate, tiny.dpo.batch_size, tiny.dpo.epochs) == (2e-3, 8, 6)
    assert tiny.dpo_loss.nll_coef == 1.0 and tiny.dpo_loss.beta == 0.1  # the rest of the loss as the paper's
    assert PipelineConfig(persona="pirate", dpo_loss={"nll_coef": 0.1}).dpo_loss.nll_coef == 0.1
    assert PipelineConfig(**tiny.model_dump()) == tiny  # a saved config reloads unchanged
    given = PipelineConfig(persona="pirate", max_new_tokens=200, dpo={"batch_size": 4})
    assert given.max_new_tokens == 200 and given.dpo.batch_size == 4 and given.dpo.learning_rate == 2e-3
    for other in (dict(base_model="/models/some-hf-folder"), dict(backend="tinker", base_model="meta-llama/X")):
        paper = PipelineConfig(persona="pirate", **other)  # real models keep the paper's hyperparameters
        assert (paper.max_new_tokens, paper.lora_rank, paper.heldout_fraction) == (1024, 64, 0.1)
        assert (paper.dpo.learning_rate, paper.dpo.batch_size, paper.dpo.epochs) == (5e-5, 32, 1)
        assert paper.dpo_loss.nll_coef == 0.1
    assert set(TINY_DEFAULTS) <= set(PipelineConfig.model_fields)
