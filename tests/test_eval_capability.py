"""The capability probe: sets load in the shapes lighteval and Inspect export (MMLU, ARC), bad rows fail
with one line naming them, and each choice's score through the sampling client equals a direct
log-probability computation with transformers on the tiny model (with and without a system prompt)."""

from __future__ import annotations

import json

import pytest
import torch

from character.errors import UserError
from character.evaluation.capability import (
    SHIPPED,
    load_capability_set,
    question_messages,
    render_choices,
    score_choices,
)
from character.evaluation.logprobs import submit_logprobs, weighted_sums

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sets_load_in_the_exported_shapes(tmp_path):
    mmlu = {"question": "2 + 2 = ?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
    arc = {
        "id": "x",
        "question": "Which is a gas?",
        "choices": {"text": ["Ice", "Steam", "Rock"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    }
    arc_digits = {"question": "Pick two.", "choices": {"text": ["one", "two"], "label": ["1", "2"]}, "answerKey": "2"}
    inspect = {"input": "Sky colour?", "choices": ["green", "blue"], "target": "B"}
    lighteval = {"query": "Best?", "choices": ["a", "b", "c"], "gold_index": [2]}
    cap = load_capability_set(_write(tmp_path / "mixed.jsonl", [mmlu, arc, arc_digits, inspect, lighteval]))
    assert cap.name == "mixed" and [q.answer for q in cap.questions] == [1, 1, 1, 1, 2]
    assert cap.questions[1].choices == ("Ice", "Steam", "Rock") and cap.questions[3].question == "Sky colour?"
    assert cap.chance == pytest.approx((1 / 4 + 1 / 3 + 1 / 2 + 1 / 2 + 1 / 3) / 5)
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([mmlu, inspect]))
    assert len(load_capability_set(as_list).questions) == 2
    assert len(load_capability_set(tmp_path / "mixed.jsonl", limit=2).questions) == 2


def test_the_shipped_set_is_balanced():
    cap = load_capability_set()
    assert cap.name == "shipped" and cap.source == SHIPPED and len(cap.questions) >= 40
    assert cap.chance == 0.25
    positions = [q.answer for q in cap.questions]
    assert {positions.count(k) for k in range(4)} == {len(positions) // 4}  # always picking one position scores 1/4


@pytest.mark.parametrize(
    "row,message",
    [
        ({"question": "q", "choices": ["a", "b"]}, "line 2: no answer field"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "line 2, field 'answer': index 2 is outside"),
        ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "line 2, field 'answer': 'C' is neither"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "line 2, field 'choices'"),
        ({"choices": ["a", "b"], "answer": 0}, "line 2: no question text"),
    ],
)
def test_bad_rows_name_the_line_and_field(tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", [{"question": "ok", "choices": ["a", "b"], "answer": 0}, row])
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_capability_set(path)


def test_unreadable_files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"question": "q"\n')
    with pytest.raises(UserError, match="line 1 is not valid JSON"):
        load_capability_set(tmp_path / "broken.jsonl")
    with pytest.raises(UserError, match="file not found"):
        load_capability_set(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no questions"):
        load_capability_set(tmp_path / "empty.jsonl")


def _direct(model, tok, messages) -> float:
    """Summed log p of the last (assistant) turn's tokens, end of turn included: one forward, no batching."""
    render = lambda m, g=False: tok.apply_chat_template(m, add_generation_prompt=g, tokenize=True, return_dict=False)  # noqa: E731
    ids = list(render(messages))
    start = len(render(messages[:-1], True))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return float(lp[start - 1 :].sum())


@pytest.mark.parametrize("system", [None, "You are a pirate. Speak like one."])
def test_scores_through_the_sampling_client_equal_a_direct_computation(base, tiny_dir, workdir, system):
    from transformers import AutoTokenizer

    from character.backend.local import LocalService
    from character.train.renderer import Renderer

    cap = load_capability_set(limit=6)
    client = LocalService(workdir, device="cpu").create_sampling_client(base_model=str(tiny_dir))
    seqs, weights = render_choices(Renderer(client.get_tokenizer()), cap, system)
    sums = weighted_sums(submit_logprobs(client, seqs), weights)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    direct = [_direct(base, tok, question_messages(q, k, system)) for q in cap.questions for k in range(len(q.choices))]
    assert [s for s, _ in sums] == pytest.approx(direct, rel=1e-4, abs=1e-4)
    scored = score_choices(cap, sums)
    k, picks = 0, []
    for q in cap.questions:  # the answer is the best-scoring choice
        row = direct[k : k + len(q.choices)]
        picks.append(row.index(max(row)))
        k += len(q.choices)
    assert scored["capability_picks"] == picks
    right = sum(p == q.answer for p, q in zip(picks, cap.questions))
    assert scored["capability_correct"] == right and scored["capability_accuracy"] == right / 6
