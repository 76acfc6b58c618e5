"""Conversations to tokens: prompts for sampling, (tokens, weights) for training, and the stop tokens
that end an answer.

`Renderer` is the generic renderer (named "template"): the model's own chat template with its default
arguments, used for the embedded `tiny` model, local model folders and models of no known family.
Assistant masks come from rendering the conversation prefix by prefix and taking the token-count
differences; we check that each prefix's tokens really are a prefix of the next. Model families with
their own rules (hybrid thinking, templates that rewrite history) live in character.train.families.
"""

from __future__ import annotations

from typing import Literal

from tinker import types

from character.errors import UserError

Messages = list[dict[str, str]]
TrainOn = Literal["all_assistant", "last_assistant"]
Sequence = tuple[list[int], list[float]]

# A probe conversation: what the template puts after an assistant answer shows its end-of-turn token.
_PROBE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]


class Renderer:
    name = "template"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the model's tokenizer has no chat template")
        self._stop: list[int] | None = None

    def _ids(self, messages: Messages, add_generation_prompt: bool) -> list[int]:
        out = self.tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        return list(out)

    def prompt(self, messages: Messages) -> list[int]:
        """Tokens that ask the model for the next assistant turn."""
        return self._ids(messages, add_generation_prompt=True)

    def training_tokens(self, messages: Messages, train_on: TrainOn = "all_assistant") -> Sequence:
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

    def training_sequences(self, messages: Messages, train_on: TrainOn = "all_assistant") -> list[Sequence]:
        """The conversation as the sequences to train on: one here; several where a family's template
        rewrites history (each assistant turn must be trained in the context it was sampled in)."""
        return [self.training_tokens(messages, train_on)]

    @staticmethod
    def _extend(tokens: list[int], weights: list[float], full: list[int], w: float) -> None:
        if full[: len(tokens)] != tokens:
            raise ValueError("chat template is not prefix-stable: a rendered prefix changed when a turn was added")
        weights.extend([w] * (len(full) - len(tokens)))
        tokens.extend(full[len(tokens) :])

    @property
    def stop_tokens(self) -> list[int]:
        """The tokens that end an answer: the template's end-of-turn token and the tokenizer's EOS."""
        if self._stop is None:
            self._stop = sorted(set(self._end_of_turn()) | set(_ids_of(getattr(self.tok, "eos_token_id", None))))
        return self._stop

    def _end_of_turn(self) -> list[int]:
        """The first special token the template writes after an assistant answer (none if it writes none)."""
        head, full = self.prompt(_PROBE[:1]), self._ids(_PROBE, False)
        # Added tokens count too: an end-of-turn token need not be among the tokenizer's named specials
        # (moving EOS elsewhere leaves <|im_end|> only an added token).
        special = set(getattr(self.tok, "all_special_ids", None) or ()) | set(
            getattr(self.tok, "added_tokens_decoder", None) or ()
        )
        return [t for t in full[len(head) :] if t in special][:1]

    def sampling_params(self, **kw) -> types.SamplingParams:
        """Sampling parameters that stop at this renderer's end-of-turn tokens (both backends honour `stop`)."""
        return types.SamplingParams(stop=self.stop_tokens, **kw)

    def decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True).strip()


def _ids_of(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def to_datum(tokens: list[int], weights: list[float]) -> types.Datum:
    """Next-token form: input tokens[:-1], targets tokens[1:], weights aligned with the targets."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": list(tokens[1:]), "weights": [float(w) for w in weights[1:]]},
    )
