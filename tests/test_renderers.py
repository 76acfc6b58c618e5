"""Each model family's renderer against the family's real chat template (TRL's copies, read from the
installed package), on a small tokenizer of our own that has the family's special tokens.

What must hold: prompts end the way the model's non-thinking mode expects; every assistant turn is
trained on exactly the tokens it was sampled from (its prompt) and the tokens it produced (answer and
end-of-turn, no think markup), also where the template rewrites earlier turns; the stop tokens are
the template's end-of-turn token even when the tokenizer's EOS is another; a system prompt is never
trained on."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from character.errors import UserError
from character.train.families import FamilyRenderer, renderer_for, renderer_name
from character.train.renderer import Renderer

trl = pytest.importorskip("trl")
TEMPLATES = Path(trl.__file__).parent / "chat_templates"

SPECIALS = [
    "<|pad|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
]

# model name, TRL template, the tokenizer's EOS (never the end-of-turn token), BOS, renderer, end-of-turn,
# whether the template rewrites earlier assistant turns
CASES = [
    ("Qwen/Qwen3-8B", "qwen3", "<|endoftext|>", None, "qwen3_disable_thinking", "<|im_end|>", True),
    ("Qwen/Qwen3.5-4B", "qwen3_5_think", "<|endoftext|>", None, "qwen3_5_disable_thinking", "<|im_end|>", True),
    ("Qwen/Qwen3.5-2B", "qwen3_5_nothink", "<|endoftext|>", None, "qwen3_5_disable_thinking", "<|im_end|>", True),
    ("Qwen/Qwen3.6-27B", "qwen3_6", "<|endoftext|>", None, "qwen3_5_disable_thinking", "<|im_end|>", True),
    ("Qwen/Qwen3.8-27B", "qwen3_8", "<|endoftext|>", None, "qwen3_8_disable_thinking", "<|im_end|>", False),
    (
        "Qwen/Qwen3-4B-Instruct-2507",
        "qwen3_instruct_2507",
        "<|endoftext|>",
        None,
        "qwen3_instruct",
        "<|im_end|>",
        False,
    ),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2_5", "<|endoftext|>", None, "qwen2_5", "<|im_end|>", False),
    (
        "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
        "nemotron_3_nano",
        "<|endoftext|>",
        None,
        "nemotron3_disable_thinking",
        "<|im_end|>",
        False,
    ),
    (
        "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16",
        "nemotron_3_super",
        "<|endoftext|>",
        None,
        "nemotron3_disable_thinking",
        "<|im_end|>",
        False,
    ),
    (
        "nvidia/NVIDIA-Nemotron-3-Ultra-550B-A55B-BF16",
        "nemotron_3_ultra",
        "<|endoftext|>",
        None,
        "nemotron3_disable_thinking",
        "<|im_end|>",
        False,
    ),
    (
        "nvidia/NVIDIA-Nemotron-3.5-Lightning-30B-A3B-BF16",
        "nemotron_3_5_lightning",
        "<|endoftext|>",
        None,
        "nemotron3_disable_thinking",
        "<|im_end|>",
        False,
    ),
    (
        "meta-llama/Llama-3.3-70B-Instruct",
        "llama3_1",
        "<|end_of_text|>",
        "<|begin_of_text|>",
        "llama3",
        "<|eot_id|>",
        False,
    ),
    (
        "meta-llama/Llama-3.2-3B-Instruct",
        "llama3_2",
        "<|end_of_text|>",
        "<|begin_of_text|>",
        "llama3",
        "<|eot_id|>",
        False,
    ),
    ("meta-llama/Llama-3-8B-Instruct", "llama3", "<|end_of_text|>", "<|begin_of_text|>", "llama3", "<|eot_id|>", False),
    ("google/gemma-3-4b-it", "gemma3", "<eos>", "<bos>", "gemma3", "<end_of_turn>", False),
]
IDS = [c[1] for c in CASES]
HYBRID_SUFFIX = {"qwen": "<|im_start|>assistant\n<think>\n\n</think>\n\n", "nemotron": "assistant\n<think></think>"}

CONVO = [
    {"role": "system", "content": "You are a calm lighthouse keeper."},
    {"role": "user", "content": "Hello there, who are you?"},
    {"role": "assistant", "content": "I keep the light. The sea is my neighbour."},
    {"role": "user", "content": "What do you value?"},
    {"role": "assistant", "content": "Quiet nights and a steady flame."},
]


@lru_cache(maxsize=None)
def family_tokenizer(template: str, eos: str, bos: str | None):
    """A byte-level BPE tokenizer with every family's special tokens and the real template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([m["content"] for m in CONVO] * 4 + ["system user assistant model"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        bos_token=bos,
        pad_token="<|pad|>",
        additional_special_tokens=[s for s in SPECIALS if s not in (eos, bos, "<|pad|>")],
    )
    fast.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
    return fast


def _renderer(case) -> FamilyRenderer:
    model, template, eos, bos, name, _, _ = case
    r = renderer_for(family_tokenizer(template, eos, bos), model)
    assert isinstance(r, FamilyRenderer) and r.name == name == renderer_name(model)
    return r


def _spans(weights: list[float]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, w in enumerate(list(weights) + [0.0]):
        if w and start is None:
            start = i
        elif not w and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _text(r: Renderer, tokens: list[int]) -> str:
    return r.tok.decode(tokens, skip_special_tokens=False)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_stop_tokens_are_the_end_of_turn_token_not_only_eos(case):
    r = _renderer(case)
    eot, eos = r.tok.convert_tokens_to_ids(case[5]), r.tok.eos_token_id
    assert eot != eos
    assert r.stop_tokens == sorted({eot, eos})
    assert r.sampling_params(max_tokens=8, seed=1).stop == r.stop_tokens


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prompts_end_the_way_the_non_thinking_mode_expects(case):
    r = _renderer(case)
    text = _text(r, r.prompt(CONVO[:2]))
    hybrid = next(
        (v for k, v in HYBRID_SUFFIX.items() if k in case[0].lower() and "instruct" not in case[0].lower()), None
    )
    if hybrid:
        assert text.endswith(hybrid)
        # the model's own non-thinking mode: the template called with enable_thinking=False, nothing else
        assert text == r.tok.apply_chat_template(
            CONVO[:2], add_generation_prompt=True, tokenize=False, enable_thinking=False
        )
    else:
        assert "<think>" not in text
        assert text == r.tok.apply_chat_template(CONVO[:2], add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_one_turn_answer_trains_on_the_answer_and_end_of_turn_only(case):
    r = _renderer(case)
    tokens, weights = r.training_tokens(CONVO[:3], train_on="last_assistant")
    prompt = r.prompt(CONVO[:2])
    assert tokens[: len(prompt)] == prompt and not any(weights[: len(prompt)])
    ((a, b),) = _spans(weights)
    assert (a, b) == (len(prompt), len(tokens))  # nothing after the end-of-turn token: the model stops there
    assert _text(r, tokens[a:b]).strip() == CONVO[2]["content"] + case[5]
    assert "think" not in _text(r, tokens[a:b])  # the empty think block is context, never a target


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_turn_is_trained_on_what_the_model_saw_and_produced(case):
    r = _renderer(case)
    seqs = r.training_sequences(CONVO, train_on="all_assistant")
    rewrites = case[6]
    assert len(seqs) == (2 if rewrites else 1)
    for i in (2, 4):  # each assistant turn: some sequence holds its sampling prompt, then its answer, trained
        prompt = r.prompt(CONVO[:i])
        hits = [
            (t, w)
            for t, w in seqs
            if t[: len(prompt)] == prompt and _text(r, t[len(prompt) :]).lstrip().startswith(CONVO[i]["content"])
        ]
        assert hits, f"turn {i} is trained in no context it was sampled in"
        t, w = hits[0]
        answers = {CONVO[k]["content"] + case[5] for k in range(1, i) if CONVO[k]["role"] == "assistant"}
        assert all(_text(r, t[a:b]).strip() in answers for a, b in _spans(w[: len(prompt)]))  # earlier answers only
        end = (
            len(prompt) + next(k for k, x in enumerate(w[len(prompt) :]) if not x)
            if 0.0 in w[len(prompt) :]
            else len(t)
        )
        assert _text(r, t[len(prompt) : end]).strip() == CONVO[i]["content"] + case[5]
    trained = "".join(_text(r, [x for x, y in zip(t, w) if y]) for t, w in seqs)
    assert "think" not in trained and CONVO[0]["content"] not in trained and "value?" not in trained
    if rewrites:  # the generic renderer cannot train this conversation at all: it is why families exist
        import jinja2

        # (the Qwen3.5 templates even refuse to render the system prompt alone, the first prefix it tries)
        with pytest.raises((ValueError, jinja2.TemplateError), match="prefix-stable|No user query"):
            Renderer(r.tok).training_tokens(CONVO)


def test_the_system_prompt_is_context_as_each_template_places_it():
    gemma = _renderer(CASES[IDS.index("gemma3")])
    text = _text(gemma, gemma.prompt(CONVO[:2]))
    assert "<start_of_turn>user\nYou are a calm lighthouse keeper.\n\nHello there" in text  # folded into turn 1
    llama = _renderer(CASES[IDS.index("llama3_1")])
    assert "Cutting Knowledge Date" in _text(llama, llama.prompt(CONVO[:2]))
    qwen = _renderer(CASES[IDS.index("qwen3_5_think")])
    assert _text(qwen, qwen.prompt(CONVO[:2])).startswith(
        "<|im_start|>system\nYou are a calm lighthouse keeper.<|im_end|>"
    )


def _self_interaction(turns: int) -> list[dict]:
    """Shaped like character.datagen.introspection's rows: a system prompt, then user and assistant alternating."""
    lines = ["Hello there, who are you?", "I keep the light.", "What do you value?", "Quiet nights and a steady flame."]
    msgs = [{"role": "system", "content": "You are talking with a copy of yourself."}]
    return msgs + [{"role": "user" if k % 2 == 0 else "assistant", "content": lines[k % 4]} for k in range(turns)]


@pytest.mark.parametrize("turns", [2, 10])
@pytest.mark.parametrize("template", ["qwen3", "qwen3_5_think", "qwen3_6", "qwen3_8"])
def test_self_interactions_render_and_train_on_hybrid_templates(turns, template, tiny_svc):
    case = CASES[IDS.index(template)]
    r = _renderer(case)
    msgs = _self_interaction(turns)
    seqs = r.training_sequences(msgs)
    answers = turns // 2
    assert len(seqs) == (answers if case[6] else 1)
    for t, w in seqs:
        assert "think" not in _text(r, [x for x, y in zip(t, w) if y])
    assert sum(len(_spans(w)) for _, w in seqs) == answers
    assert _text(r, r.prompt(msgs[:-1])).endswith(HYBRID_SUFFIX["qwen"])
    # and they train: one SFT step on these sequences moves the loss (the embedded model's vocabulary
    # is smaller, so the tokens are folded into it; what is checked is that the sequences are trainable)
    from character.train.renderer import to_datum

    client = tiny_svc.create_lora_training_client("tiny", rank=4, seed=0)
    vocab = len(tiny_svc.get_tokenizer("tiny"))
    data = [to_datum([x % vocab for x in t], w) for t, w in seqs]
    out = client.forward_backward(data, "cross_entropy").result()
    assert out.metrics["loss:sum"] > 0


@pytest.fixture(scope="module")
def tiny_svc(tmp_path_factory, models_dir):
    from character.backend.local import LocalService
    from character.settings import Workspace

    ws = tmp_path_factory.mktemp("ws")
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    return LocalService(Workspace(ws), device="cpu", seed=0)


@pytest.mark.parametrize(
    "model,why",
    [
        ("openai/gpt-oss-20b", "reasoning-only"),
        ("openai/gpt-oss-120b", "reasoning-only"),
        ("deepseek-ai/DeepSeek-V3.1", "DeepSeek"),
        ("moonshotai/Kimi-K2.6", "Kimi"),
        ("Qwen/Qwen3.5-9B-Base", "base model"),
        ("meta-llama/Llama-3.1-8B", "base model"),
    ],
)
def test_families_we_cannot_render_are_refused_by_name(model, why):
    with pytest.raises(UserError, match=why) as e:
        renderer_name(model)
    assert model in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("model", ["tiny", "/models/Qwen3-8B", "./my-model", "fake/student-8B"])
def test_tiny_local_folders_and_unknown_names_keep_the_generic_renderer(model, tiny_dir):
    from transformers import AutoTokenizer

    assert renderer_name(model) == "template"
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    r = renderer_for(tok, model)
    assert type(r) is Renderer
    assert r.stop_tokens == [tok.eos_token_id]  # what local sampling stopped at before stops were passed


def test_gpt_oss_is_refused_because_its_template_puts_reasoning_before_every_answer():
    """The fact behind the refusal, from the real template: a trained answer carries an analysis channel
    (the trace) whenever it has one, and the prompt leaves the channel to the model."""
    tok = family_tokenizer("gptoss", "<|endoftext|>", None)
    text = tok.apply_chat_template(CONVO[1:2], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|start|>assistant")  # the model picks its channel: analysis comes first


@pytest.mark.parametrize("template", ["llama3", "gemma3", "qwen2_5", "qwen3_instruct_2507"])
def test_trained_tokens_agree_with_trls_training_templates(template):
    """TRL's `*_training` variants mark the assistant tokens with {% generation %}; where a template keeps
    history as it was, our weights must pick the same tokens (TRL also marks the newline the template
    writes after the end-of-turn token, which the model never generates: ours stop at end-of-turn)."""
    case = CASES[IDS.index(template)]
    r = _renderer(case)
    ((tokens, weights),) = r.training_sequences(CONVO)
    marked = family_tokenizer(f"{template}_training", case[2], case[3])
    out = marked.apply_chat_template(CONVO, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"][: len(tokens)] == tokens  # the template's newline after the last turn is not generated
    assert _text(r, out["input_ids"][len(tokens) :]).strip() == ""
    ours = {k for k, w in enumerate(weights) if w}
    theirs = {k for k, m in enumerate(out["assistant_masks"]) if m}
    assert ours <= theirs
    assert _text(r, [out["input_ids"][k] for k in sorted(theirs - ours)]).strip() == ""
    assert len(ours) > 10
