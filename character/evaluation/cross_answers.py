"""Every model's answers to the cross-persona prompts, plain (no system prompt) and under the
break-character conversation: reused from the builds' own evaluations where they sampled them, the rest
sampled here through the service, one model held at a time. The `prompted` models are the base model with
one persona's teacher system prompt before each conversation, as the single-build evaluation's `prompted`
row (character.evaluation.run): the ceiling a trained model aims for."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

from tinker import types

from character.backend.retry import Call
from character.datagen.engine import item_seed
from character.evaluation.cross_builds import PersonaBuild
from character.evaluation.multiturn import with_system
from character.train.families import renderer_for

KINDS = ("plain", "robust")


@dataclass
class CrossModel:
    """One model's answers; `persona`: whose build it is (None: the base, every persona's reference).
    `system`: the prompted model's system prompt (its persona's teacher's)."""

    label: str  # "base", "prompted", "final", "dpo"
    persona: str | None
    source: str
    system: str | None = None
    answers: dict[str, list[str | None]] = field(default_factory=dict)  # kind -> one per prompt
    reused: int = 0
    sampled: int = 0


def models_of(builds: list[PersonaBuild], base_model: str) -> list[CrossModel]:
    """The base once, the base prompted with each persona's teacher system prompt (where its constitution
    is found), then each build's final and dpo models."""
    out = [CrossModel("base", None, base_model)]
    out += [CrossModel("prompted", b.persona, base_model, system=b.system) for b in builds if b.system]
    for b in builds:
        out += [CrossModel(label, b.persona, uri) for label, uri in b.models.items()]
    return out


def on_base(model: CrossModel) -> bool:
    """Sampled from the base model's weights (the base and the prompted models)."""
    return model.label in ("base", "prompted")


def messages(model: CrossModel, prompt: dict, kind: str) -> list[dict]:
    """The conversation the model answers: the prompt alone, or its break-character conversation; the
    prompted model's system prompt first (before the break-character instruction, as the single-build
    evaluation gives it)."""
    msgs = [{"role": "user", "content": prompt["prompt"]}] if kind == "plain" else prompt["attack"]
    return with_system(msgs, model.system)


def _known(model: CrossModel, builds: list[PersonaBuild], prompt: str, kind: str) -> str | None:
    """An answer a build's evaluation already sampled: the base's from any build, a trained model's from its own."""
    own = [b for b in builds if model.persona is None or b.persona == model.persona]
    for b in own:
        text = ((b.sampled.get(prompt) or {}).get("answers", {}).get(model.label) or {}).get(kind)
        if text is not None:
            return text
    return None


def gather_answers(
    service, models: list[CrossModel], builds: list[PersonaBuild], prompts: list[dict], base_model: str, *,
    max_new_tokens: int, seed: int,
) -> None:  # fmt: skip
    """Fill each model's answers: known ones first, then the missing ones sampled (only models missing some
    are loaded; the base and the prompted models share one client of the base)."""
    base_client = None
    for m in models:
        m.answers = {k: [_known(m, builds, p["prompt"], k) for p in prompts] for k in KINDS}
        m.reused = sum(a is not None for k in KINDS for a in m.answers[k])
        missing = [(k, i) for k in KINDS for i, a in enumerate(m.answers[k]) if a is None]
        if not missing:
            continue
        if on_base(m):
            if base_client is None:
                base_client = service.create_sampling_client(base_model=base_model)
            client = base_client
        else:
            if base_client is not None:  # one model held at a time
                base_client = None
                gc.collect()
            client = service.create_sampling_client(model_path=m.source)
        renderer = renderer_for(client.get_tokenizer(), base_model)
        calls = []
        for k, i in missing:  # everything submitted before waiting: the backend batches it
            p = prompts[i]
            params = types.SamplingParams(
                max_tokens=max_new_tokens,
                temperature=0.7,
                top_p=0.95,
                seed=item_seed(seed, "cross-persona", k, p["prompt"]),
                stop=renderer.stop_tokens,
            )
            ids = renderer.prompt(messages(m, p, k))
            calls.append(Call(lambda ids=ids, sp=params, c=client: c.sample(types.ModelInput.from_ints(ids), 1, sp)))
        for (k, i), c in zip(missing, calls):
            m.answers[k][i] = renderer.decode(list(c.result().sequences[0].tokens))
        m.sampled = len(missing)
        del client, calls  # one model held at a time
        gc.collect()
