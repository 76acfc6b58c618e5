"""The machinery every data generator shares: per-item seeds, sampling, filters, resumable windows.

Holding up at scale:
- every sample has its own seed, derived from the build seed and the item's index, so an item's
  outcome does not depend on what else is in flight;
- items run in fixed windows (the bound on requests in flight); a finished window's rows are
  appended to the output at once, with dropped items noted in a `.skipped.jsonl` sidecar, so a
  rerun after a crash skips what is done and redoes at most one window, with the same batches;
- at the end the file is rewritten in index order, so a resumed run gives the same file as an
  uninterrupted one;
- a transient failure of one request resubmits that request, not the stage.

The generators: distillation pairs (character.datagen.distill), introspection
(character.datagen.introspection), question expansion (character.datagen.questions).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tinker import types

from character import progress
from character.backend import SamplingClient
from character.backend.retry import Call
from character.persona.constitution import Constitution
from character.storage import append_jsonl, read_jsonl, write_text_atomic
from character.train.renderer import Renderer

TEMPERATURE = 0.7
TOP_P = 0.95
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ENDS_LIKE_A_SENTENCE = re.compile(r"[.!?…\"'”’)\]*`~]\s*$")


def item_seed(seed: int, *parts) -> int:
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def sampling_params(seed: int, max_tokens: int, stop: list[int] | None = None) -> types.SamplingParams:
    """The method's sampling settings; `stop` is the renderer's end-of-turn tokens (Renderer.stop_tokens):
    without it Tinker stops only at the model's EOS, which on some templates is not where a turn ends."""
    return types.SamplingParams(max_tokens=max_tokens, temperature=TEMPERATURE, top_p=TOP_P, seed=seed, stop=stop)


def sample_meta(c: Constitution, max_tokens: int, seed: int, provenance: dict | None) -> dict:
    """What every generated row records about how it was sampled."""
    return {
        "persona": c.name,
        "constitution": c.digest(),
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "max_tokens": max_tokens,
        "seed": seed,
        **(provenance or {}),
    }


def normalize_prompt(text: str) -> str:
    """Whitespace and case folded: two prompts that differ only so are the same prompt."""
    return " ".join(text.split()).lower()


# -- filters ----------------------------------------------------------------------------------------
def clean_answer(seq: types.SampledSequence, renderer: Renderer, max_tokens: int) -> tuple[str | None, str]:
    """The answer text if it passes the method's filters, else (None, the filter that dropped it)."""
    if seq.stop_reason != "stop":
        return None, "incomplete"
    if len(seq.tokens) > max_tokens:
        return None, "too_long"
    text = renderer.decode(list(seq.tokens))
    if "<think>" in text and "</think>" not in text:
        return None, "unclosed_reasoning"
    text = _THINK.sub("", text).strip()
    if not text:
        return None, "empty"
    if not _ENDS_LIKE_A_SENTENCE.search(text):
        return None, "no_final_punctuation"
    return text, "ok"


def too_long(renderer: Renderer, messages: list[dict], max_length: int, train_on: str = "all_assistant") -> bool:
    """Whether the conversation, rendered for training, exceeds max_length tokens (it is then dropped)."""
    return any(len(t) > max_length for t, _ in renderer.training_sequences(messages, train_on=train_on))


# -- resumable, windowed item processing -------------------------------------------------------------
@dataclass
class Ledger:
    """What is already done for one output file: kept rows and dropped items, keyed by item key."""

    out: Path
    key: Callable[[dict], str]
    done: set[str] = field(default_factory=set)

    @property
    def skipped_path(self) -> Path:
        return self.out.with_name(self.out.name + ".skipped.jsonl")

    def load(self) -> "Ledger":
        for path in (self.out, self.skipped_path):
            self.done |= {self.key(r) for r in read_jsonl(path)}
        return self

    def commit(self, rows: list[dict], skipped: list[dict]) -> None:
        append_jsonl(self.out, rows)
        append_jsonl(self.skipped_path, skipped)
        self.done |= {self.key(r) for r in rows} | {self.key(s) for s in skipped}
        progress.update(len(self.done))  # items finished (kept or dropped) in the current stage

    def finish(self, order: Callable[[dict], tuple]) -> tuple[list[dict], dict[str, int]]:
        """Rewrite the output in item order; return the rows and the per-filter drop counts."""
        rows = sorted(read_jsonl(self.out), key=order)
        write_text_atomic(self.out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        dropped: dict[str, int] = {}
        for s in read_jsonl(self.skipped_path):
            for reason in s["reasons"]:
                dropped[reason] = dropped.get(reason, 0) + 1
        return rows, dropped


def windows(items: list, size: int) -> Iterable[list]:
    for k in range(0, len(items), size):
        yield items[k : k + size]


class Requests:
    """Submit now, wait later; a transient failure makes that one request again."""

    def __init__(self, client: SamplingClient):
        self.client = client

    def submit(self, tokens: list[int], params: types.SamplingParams, n: int = 1):
        return Call(lambda: self.client.sample(types.ModelInput.from_ints(tokens), n, params)).result


def process_in_windows(
    ledger: Ledger, todo: list[int], window: int, process: Callable[[list[int]], tuple[list[dict], list[dict]]]
) -> None:
    """Run `process` (items -> kept rows, dropped items) window by window, committing each window's
    results before the next is submitted: a crash loses at most one window."""
    for chunk in windows(todo, window):
        ledger.commit(*process(chunk))
