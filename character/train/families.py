"""One renderer per model family, chosen by model name.

A family renderer renders with the model's own chat template, called with the arguments of the
family's non-thinking mode (Qwen3's `enable_thinking=False`, which ends the prompt with an empty
think block), so sampling prompts and training tokens are the same thing. For training, each
assistant turn is the prompt the model was given at that turn followed by what it produced (its
answer and the end-of-turn token), never the template's later rendering of that turn: hybrid
Qwen3/3.5/3.6 templates drop the empty think block from earlier turns, so a multi-turn
conversation becomes several sequences, merged where one turn's sequence is a prefix of the next
(Qwen3.8 keeps history as it was, so its conversations stay one sequence).

Families we cannot render correctly are refused by name before anything is called: gpt-oss
(reasoning-only: every answer starts with a chain of thought, which this method would have to
train on or cut out mid-format), DeepSeek and Kimi (hybrid, but no copy of their current
templates is available to test against), and base models (no chat template to train a persona
on). `tiny`, local folders and unknown names keep the generic renderer ("template").

Facts about each family (non-thinking generation prompts, end-of-turn tokens, which Qwen models
share a template) were read from the chat templates TRL ships and tinker-cookbook's renderers and
model_info; tests/test_renderers.py checks each family against TRL's copy of its real template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from character.errors import UserError
from character.train.renderer import Messages, Renderer, Sequence, TrainOn

GENERIC = "template"


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str  # searched in the model name, case-insensitive
    end_of_turn: tuple[str, ...]  # tokens that end an assistant turn (the stop tokens)
    prompt_suffix: str  # what a generation prompt ends with in this mode
    template_args: dict = field(default_factory=dict)
    think_markup: tuple[str, ...] = ()  # must never be trained on

    def matches(self, model: str) -> bool:
        return re.search(self.pattern, model, re.I) is not None


_THINK = ("<think>", "</think>")
_NO_THINK = {"enable_thinking": False}
_CHATML_ASSISTANT = "<|im_start|>assistant\n"

# First match wins: more specific patterns come first.
FAMILIES = [
    Family("qwen3_8_disable_thinking", r"qwen3\.8", ("<|im_end|>",), "<think>\n\n</think>\n\n", _NO_THINK, _THINK),
    # Qwen3.6 shares Qwen3.5's tokenizer and chat format (tinker-cookbook's model_info)
    Family("qwen3_5_disable_thinking", r"qwen3\.[56]", ("<|im_end|>",), "<think>\n\n</think>\n\n", _NO_THINK, _THINK),
    Family("qwen3_instruct", r"qwen3-.*instruct-2507", ("<|im_end|>",), _CHATML_ASSISTANT),
    Family("qwen3_disable_thinking", r"qwen3-\d", ("<|im_end|>",), "<think>\n\n</think>\n\n", _NO_THINK, _THINK),
    Family("qwen2_5", r"qwen2\.5-.*instruct", ("<|im_end|>",), _CHATML_ASSISTANT),
    Family(
        "nemotron3_disable_thinking", r"nemotron-3", ("<|im_end|>",), "assistant\n<think></think>", _NO_THINK, _THINK
    ),
    Family("llama3", r"llama-3.*instruct", ("<|eot_id|>",), "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    Family("gemma3", r"gemma-3-.*-it", ("<end_of_turn>",), "<start_of_turn>model\n"),
]

REFUSED = [
    (
        r"gpt-oss",
        "a reasoning-only model: every answer begins with a chain of thought, which persona training "
        "would have to train on or cut out mid-format",
    ),
    (r"deepseek", "a DeepSeek model: its hybrid chat template has no renderer here that was tested against it"),
    (r"kimi", "a Kimi model: its hybrid chat template has no renderer here that was tested against it"),
    (r"-base\b|^meta-llama/llama-3[.\d]*-\d+b$", "a base model: it has no chat format to train a persona on"),
    (r"qwen3-vl", "a Qwen3-VL model: its vision chat format has no renderer here"),
]
_ALTERNATIVES = "choose a chat model such as Qwen/Qwen3.5-4B, Qwen/Qwen3-8B or a Llama 3 Instruct model"


def _is_local(model: str) -> bool:
    return model == "tiny" or model.startswith(("/", ".", "~", "file://")) or Path(model).expanduser().exists()


def family_of(model: str) -> Family | None:
    """The family a model name belongs to (None: the generic renderer); refused families raise."""
    if _is_local(model):
        return None
    for pattern, why in REFUSED:
        if re.search(pattern, model, re.I):
            raise UserError(f"model {model} is {why}; it is not supported ({_ALTERNATIVES})")
    return next((f for f in FAMILIES if f.matches(model)), None)


def renderer_name(model: str) -> str:
    """The name of the renderer a model gets (recorded in the build); refused families raise UserError."""
    fam = family_of(model)
    return fam.name if fam else GENERIC


def check_renderable(models: dict[str, str | None]) -> dict[str, str]:
    """Each named model's renderer, before any call: {role: renderer name}; a refused one raises,
    naming its role (student, teacher, judge)."""
    out = {}
    for role, model in models.items():
        if not model:
            continue
        try:
            out[role] = renderer_name(model)
        except UserError as e:
            raise UserError(f"{role}: {e}") from None
    return out


def renderer_for(tokenizer, model: str | None = None) -> Renderer:
    """The renderer for `model` (by name); without a name, by the tokenizer's hub name when that names
    a family we render, else the generic one."""
    if model is not None:
        fam = family_of(model)
    else:
        hub = str(getattr(tokenizer, "name_or_path", "") or "")
        try:
            fam = family_of(hub) if hub and "/" in hub else None
        except UserError:
            fam = None
    return FamilyRenderer(tokenizer, fam) if fam else Renderer(tokenizer)


class FamilyRenderer(Renderer):
    """A family's chat template in its non-thinking mode; each assistant turn trained as it was sampled."""

    def __init__(self, tokenizer, family: Family):
        super().__init__(tokenizer)
        self.family = family
        self.name = family.name
        vocab = tokenizer.get_vocab()
        missing = [t for t in family.end_of_turn if t not in vocab]
        if missing:
            raise UserError(f"{family.name}: the tokenizer has no end-of-turn token {missing[0]!r}")
        self._eot = [vocab[t] for t in family.end_of_turn]
        probe = self.tok.decode(self.prompt([{"role": "user", "content": "Hello."}]), skip_special_tokens=False)
        if not probe.endswith(family.prompt_suffix):
            raise UserError(
                f"{family.name}: the model's chat template does not end a prompt with "
                f"{family.prompt_suffix!r} (its non-thinking mode); it ends with {probe[-40:]!r}"
            )

    def _ids(self, messages: Messages, add_generation_prompt: bool) -> list[int]:
        out = self.tok.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
            **self.family.template_args,
        )
        return list(out)

    def _end_of_turn(self) -> list[int]:
        return list(self._eot)

    def completion(self, messages: Messages, i: int) -> list[int]:
        """The tokens the model produces for assistant turn `i` after `prompt(messages[:i])`: the answer up
        to and including its end-of-turn token (what the template writes after that is not generated)."""
        head, full = self.prompt(messages[:i]), self._ids(messages[: i + 1], False)
        if full[: len(head)] != head:
            raise ValueError(f"{self.name}: the rendered turn {i} does not continue its own prompt")
        rest = full[len(head) :]
        end = next((k for k, t in enumerate(rest) if t in self._eot), None)
        if end is None:
            raise ValueError(f"{self.name}: turn {i} renders without an end-of-turn token")
        out = rest[: end + 1]
        text = self.tok.decode(out, skip_special_tokens=False)
        if any(m in text for m in self.family.think_markup):
            raise ValueError(f"{self.name}: turn {i} would train on think markup: {text[:60]!r}")
        return out

    def training_sequences(self, messages: Messages, train_on: TrainOn = "all_assistant") -> list[Sequence]:
        """One sequence per run of assistant turns whose contexts extend each other: each turn's tokens are
        its prompt then its completion, exactly as sampled."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_on == "last_assistant":
            turns = turns[-1:]
        seqs: list[Sequence] = []
        tokens: list[int] = []
        weights: list[float] = []
        for i in turns:
            head = self.prompt(messages[:i])
            if tokens and head[: len(tokens)] != tokens:  # history was rewritten: a new sequence
                seqs.append((tokens, weights))
                tokens, weights = [], []
            comp = self.completion(messages, i)
            weights = weights + [0.0] * (len(head) - len(tokens)) + [1.0] * len(comp)
            tokens = head + comp
        if tokens:
            seqs.append((tokens, weights))
        return seqs

    def training_tokens(self, messages: Messages, train_on: TrainOn = "all_assistant") -> Sequence:
        seqs = self.training_sequences(messages, train_on)
        if len(seqs) != 1:
            raise ValueError(
                f"{self.name}: this conversation trains as {len(seqs)} sequences (the template rewrites "
                "earlier turns); use training_sequences"
            )
        return seqs[0]
