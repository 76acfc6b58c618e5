"""The embedded tiny model: deterministic, offline, a chat model that ends its turns."""

from __future__ import annotations

import hashlib
import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from character.tinymodel import CHAT_TEMPLATE, TINY_RECIPE, _build_tokenizer, _corpus, build_tiny_model


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
