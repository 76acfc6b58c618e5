"""Assistant-token masks: SFT trains on assistant tokens and nothing else."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from character.train.renderer import Renderer, to_datum


@pytest.fixture(scope="module")
def renderer(tiny_dir):
    return Renderer(AutoTokenizer.from_pretrained(tiny_dir))


CONVO = [
    {"role": "system", "content": "You are reflective."},
    {"role": "user", "content": "Hello there."},
    {"role": "assistant", "content": "Hi! I am glad you came."},
    {"role": "user", "content": "What do you value?"},
    {"role": "assistant", "content": "Honesty, mostly. And tea."},
]


def _spans(weights):
    spans, start = [], None
    for i, w in enumerate(weights + [0.0]):
        if w and start is None:
            start = i
        elif not w and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_sft_weights_cover_exactly_the_assistant_turns(renderer):
    tokens, weights = renderer.training_tokens(CONVO, train_on="all_assistant")
    assert tokens == renderer.tok.apply_chat_template(CONVO, tokenize=True, return_dict=False)
    spans = _spans(weights)
    assert len(spans) == 2
    texts = [renderer.tok.decode(tokens[a:b]) for a, b in spans]
    assert texts == ["Hi! I am glad you came.<|im_end|>\n", "Honesty, mostly. And tea.<|im_end|>\n"]
    # every other token (system, user, role headers) has weight 0
    untrained = renderer.tok.decode([t for t, w in zip(tokens, weights) if w == 0])
    assert "Hello there." in untrained and "What do you value?" in untrained and "You are reflective." in untrained
    assert "Honesty" not in untrained and "glad" not in untrained
    assert set(weights) == {0.0, 1.0}


def test_last_assistant_only_for_preference_pairs(renderer):
    tokens, weights = renderer.training_tokens(CONVO, train_on="last_assistant")
    spans = _spans(weights)
    assert [renderer.tok.decode(tokens[a:b]) for a, b in spans] == ["Honesty, mostly. And tea.<|im_end|>\n"]


def test_prompt_is_prefix_of_the_full_conversation(renderer):
    prompt = renderer.prompt(CONVO[:4])
    full, weights = renderer.training_tokens(CONVO, train_on="last_assistant")
    assert full[: len(prompt)] == prompt
    assert all(w == 0 for w in weights[: len(prompt)])
    assert all(w == 1 for w in weights[len(prompt) :])


def test_datum_shifts_targets_and_weights(renderer):
    d = to_datum([1, 2, 3, 4], [0, 0, 1, 1])
    assert d.model_input.to_ints() == [1, 2, 3]
    assert d.loss_fn_inputs["target_tokens"].tolist() == [2, 3, 4]
    assert d.loss_fn_inputs["weights"].tolist() == [0.0, 1.0, 1.0]
