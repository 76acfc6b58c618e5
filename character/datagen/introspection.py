"""Introspection data for SFT: reflections and self-interactions, sampled with the constitution in view."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from character.backend import SamplingClient
from character.datagen.engine import (
    Ledger,
    Requests,
    clean_answer,
    item_seed,
    process_in_windows,
    sample_meta,
    sampling_params,
    too_long,
)
from character.persona.constitution import Constitution
from character.persona.prompts import (
    GREETINGS,
    INTERACTION_SYSTEM_PROMPT,
    REFLECTION_PROMPTS,
    interaction_system_prompt,
    reflection_system_prompt,
)
from character.train.renderer import Renderer


def generate_introspection(
    c: Constitution,
    model: SamplingClient,
    renderer: Renderer,
    n_reflections: int,
    n_interactions: int,
    turns: int,
    seed: int,
    out: Path,
    max_tokens: int = 1024,
    window: int = 64,
    provenance: dict | None = None,
    max_length: int | None = None,
) -> dict:
    """Reflections and self-interactions, both sampled with the numbered constitution in the system prompt.

    Reflections store no system prompt (SFT sees the question alone); self-interactions are stored from
    the side of the instance that answered the greeting, so SFT trains on that instance's turns, under the
    short INTERACTION_SYSTEM_PROMPT. Each row's meta records the system prompt it was sampled with.
    A row whose stored conversation renders longer than `max_length` tokens is dropped (`too_long`)."""
    job = _Introspection(
        Requests(model),
        renderer,
        seed,
        max_tokens,
        max_length,
        turns,
        reflection_system_prompt(c),
        interaction_system_prompt(c),
        sample_meta(c, max_tokens, seed, provenance),
    )
    key = lambda r: f"{r.get('kind')}-{r['meta']['index'] if 'meta' in r else r['index']}"  # noqa: E731
    ledger = Ledger(Path(out), key=key).load()
    todo = [i for i in range(n_reflections) if f"reflection-{i}" not in ledger.done]
    process_in_windows(ledger, todo, window, job.reflections)
    todo = [i for i in range(n_interactions) if f"interaction-{i}" not in ledger.done]
    process_in_windows(ledger, todo, window, job.interactions)
    rows, dropped = ledger.finish(order=lambda r: (r["kind"] != "reflection", r["meta"]["index"]))
    return {
        "rows": len(rows),
        "reflections": sum(r["kind"] == "reflection" for r in rows),
        "interactions": sum(r["kind"] == "interaction" for r in rows),
        "dropped": dropped,
    }


@dataclass
class _Introspection:
    """How one build samples its reflections and self-interactions, window by window."""

    req: Requests
    renderer: Renderer
    seed: int
    max_tokens: int
    max_length: int | None
    turns: int
    reflect_system: str
    talk_system: str
    meta: dict

    def _too_long(self, messages: list[dict]) -> bool:
        return self.max_length is not None and too_long(self.renderer, messages, self.max_length)

    def reflections(self, chunk: list[int]) -> tuple[list[dict], list[dict]]:
        """One answer per reflection prompt, every request of the window submitted before any is awaited."""
        jobs = []
        for i in chunk:
            q = REFLECTION_PROMPTS[i % len(REFLECTION_PROMPTS)]
            msgs = [{"role": "system", "content": self.reflect_system}, {"role": "user", "content": q}]
            params = sampling_params(item_seed(self.seed, "reflection", i), self.max_tokens, self.renderer.stop_tokens)
            jobs.append((i, q, self.req.submit(self.renderer.prompt(msgs), params)))
        rows, skipped = [], []
        for i, q, fut in jobs:
            answer, why = clean_answer(fut().sequences[0], self.renderer, self.max_tokens)
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
            if answer is not None and self._too_long(messages):
                answer, why = None, "too_long"
            if answer is None:
                skipped.append({"kind": "reflection", "index": i, "reasons": [why]})
                continue
            meta = {"index": i, "prompt_id": i % len(REFLECTION_PROMPTS), "system_prompt": self.reflect_system}
            rows.append({"kind": "reflection", "meta": {**meta, **self.meta}, "messages": messages})
        return rows, skipped

    def interactions(self, chunk: list[int]) -> tuple[list[dict], list[dict]]:
        """The window's conversations, stored from the side that answered the greeting."""
        rows, skipped = [], []
        for i, said in zip(chunk, self._converse(chunk)):
            if said is None:
                skipped.append({"kind": "interaction", "index": i, "reasons": ["turn_filtered"]})
                continue
            messages = [{"role": "system", "content": INTERACTION_SYSTEM_PROMPT}]
            messages += [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(said)]
            if self._too_long(messages):
                skipped.append({"kind": "interaction", "index": i, "reasons": ["too_long"]})
                continue
            meta = {"index": i, "greeting": said[0], "turns": self.turns, "system_prompt": self.talk_system}
            rows.append({"kind": "interaction", "messages": messages, "meta": {**meta, **self.meta}})
        return rows, skipped

    def _converse(self, indices: list[int]) -> list[list[str] | None]:
        """All conversations of a window advance one turn at a time. Transcript[0] is the greeting from
        instance B; then A and B alternate. A conversation with a filtered turn is dropped whole."""
        transcripts: dict[int, list[str] | None] = {i: [GREETINGS[i % len(GREETINGS)]] for i in indices}
        for turn in range(self.turns):
            speaker_is_a = turn % 2 == 0
            jobs = []
            for i, said in transcripts.items():
                if said is None:
                    continue
                view = [{"role": "system", "content": self.talk_system}]
                for k, text in enumerate(said):
                    own = (k % 2 == 1) == speaker_is_a  # one's own past turns are "assistant"
                    view.append({"role": "assistant" if own else "user", "content": text})
                params = sampling_params(
                    item_seed(self.seed, "interaction", i, turn), self.max_tokens, self.renderer.stop_tokens
                )
                jobs.append((i, self.req.submit(self.renderer.prompt(view), params)))
            for i, fut in jobs:
                text, _ = clean_answer(fut().sequences[0], self.renderer, self.max_tokens)
                transcripts[i] = None if text is None else transcripts[i] + [text]
        return [transcripts[i] for i in indices]
