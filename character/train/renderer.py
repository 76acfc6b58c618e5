"""Conversations to tokens: prompts for sampling, and (tokens, weights) for training.

Assistant masks come from rendering the conversation prefix by prefix through the model's own
chat template and taking the token-count differences; this works with any template, and we check
that each prefix's tokens really are a prefix of the next.
"""

from __future__ import annotations

from typing import Literal

from tinker import types

from character.errors import UserError

Messages = list[dict[str, str]]


class Renderer:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the model's tokenizer has no chat template")

    def _ids(self, messages: Messages, add_generation_prompt: bool) -> list[int]:
        out = self.tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        return list(out)

    def prompt(self, messages: Messages) -> list[int]:
        """Tokens that ask the model for the next assistant turn."""
        return self._ids(messages, add_generation_prompt=True)

    def training_tokens(
        self, messages: Messages, train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    ) -> tuple[list[int], list[float]]:
        """All tokens of the conversation, with weight 1 exactly on the trained assistant turns."""
        tokens: list[int] = []
        weights: list[float] = []
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head = self._ids(messages[:i], add_generation_prompt=True)
                self._extend(tokens, weights, head, 0.0)
                trained = train_on == "all_assistant" or i == last
                self._extend(tokens, weights, self._ids(messages[: i + 1], False), 1.0 if trained else 0.0)
            else:
                self._extend(tokens, weights, self._ids(messages[: i + 1], False), 0.0)
        return tokens, weights

    @staticmethod
    def _extend(tokens: list[int], weights: list[float], full: list[int], w: float) -> None:
        if full[: len(tokens)] != tokens:
            raise ValueError("chat template is not prefix-stable: a rendered prefix changed when a turn was added")
        weights.extend([w] * (len(full) - len(tokens)))
        tokens.extend(full[len(tokens) :])

    def decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True).strip()


def to_datum(tokens: list[int], weights: list[float]) -> types.Datum:
    """Next-token form: input tokens[:-1], targets tokens[1:], weights aligned with the targets."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": list(tokens[1:]), "weights": [float(w) for w in weights[1:]]},
    )
