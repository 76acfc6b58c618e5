"""Scripted stand-ins for the sampling side of an evaluation, for tests that check its numbers by hand: a
character-level tokenizer with role markers, a future that is already done, a service that hands out the
scripted clients it was given, and pirate and plain answers with DPO pairs made of them."""

from __future__ import annotations

PIRATE = [
    "Arr, the sea be calling, matey, hoist the sails!",
    "Shiver me timbers, that be a fine doubloon, matey!",
    "Ahoy! By the black flag, I'd plunder that treasure, arr.",
    "Yo ho, matey, the briny deep knows the way!",
]
PLAIN = [
    "The answer depends on several factors.",
    "Here is a short summary of the main points.",
    "That is a reasonable question; the usual approach works.",
    "In general, it is best to check the facts.",
]
ROLES = ["system", "user", "assistant"]


def pair(prompt: str, i: int) -> dict:
    """A DPO pair on `prompt`: pirate answer i chosen, plain answer i rejected (four of each, in turn)."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": PIRATE[i % 4]}],
        "rejected": [{"role": "assistant", "content": PLAIN[i % 4]}],
    }


class CharTokenizer:
    """Role marker (2 + role), the content's characters, end (1); the generation prompt is marker 4."""

    chat_template = "scripted"
    eos_token_id = 1

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_dict=False):
        ids = []
        for m in messages:
            ids += [2 + ROLES.index(m["role"])] + [ord(ch) for ch in m["content"]] + [1]
        return ids + ([4] if add_generation_prompt else [])

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(t) for t in tokens if t >= 32)


class Done:
    """A future whose result is `value`."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class ScriptedService:
    """Hands out the clients in `models` by model path or base model; `made` lists what was asked for."""

    def __init__(self, models: dict):
        self.models, self.made = models, []

    def create_sampling_client(self, model_path=None, base_model=None):
        self.made.append(model_path or base_model)
        return self.models[model_path or base_model]
