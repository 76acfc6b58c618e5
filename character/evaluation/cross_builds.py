"""The builds of a cross-persona evaluation, found in a workspace: each persona's teacher answers (the
chosen side of its DPO pairs: written with the constitution), its trained models (final, dpo where
present), the teacher's system prompt (its constitution: what the `prompted` row gives the base model),
the answers its own evaluation already sampled (`<build>/eval/metrics.json`), and the prompts every model
answers.

Every model answers the same prompts: the held-out prompts of every build, a few from each, so that no
persona's model is helped by its own topics and the base model lands at chance. Each prompt keeps the
break-character conversation its own build's evaluation used, so an answer sampled there is reused as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from character.build.paths import BuildPaths, build_records, builds_root
from character.errors import UserError
from character.evaluation.data import build_files, held_out_prompts, read_rows
from character.evaluation.metrics import break_character_messages
from character.persona.constitution import load_constitution
from character.persona.prompts import teacher_system_prompt
from character.storage import uri_to_path

# Prompts taken from each build's held-out prompts into the common set.
PROMPTS_PER_BUILD = 8


@dataclass
class PersonaBuild:
    persona: str
    root: Path
    base_model: str | None
    models: dict[str, str]  # "final", "dpo" -> local checkpoint path or tinker:// path
    teacher: list[str]  # the teacher's answers, with the constitution in its system prompt
    # the teacher's system prompt (None: the build's constitution cannot be found any more)
    system: str | None = None
    # prompt -> {"attack": messages, "answers": {label: {"plain": text, "robust": text}}} from its evaluation
    sampled: dict[str, dict] = field(default_factory=dict)


def find_build(workdir: str | Path, spec: str) -> Path:
    """A build named as `<persona>/<build id>`, as a bare build id (one persona has it) or as its folder."""
    path = Path(spec).expanduser()
    if BuildPaths.is_build(path):
        return path.resolve()
    root = builds_root(workdir)
    if "/" in spec and BuildPaths.is_build(root / spec):
        return (root / spec).resolve()
    hits = [r.parent for r in build_records(workdir) if r.parent.name == spec]
    if len(hits) == 1:
        return hits[0].resolve()
    if len(hits) > 1:
        names = ", ".join(f"{h.parent.name}/{h.name}" for h in hits)
        raise UserError(
            f"build {spec}: several personas have a build of that id ({names}); name one as <persona>/{spec}"
        )
    raise UserError(f"build {spec}: not found in {root} (give <persona>/<build id>, a build id or a build folder)")


def _record(root: Path) -> dict:
    try:
        return json.loads(BuildPaths(root).record.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"build {root}: its record cannot be read ({e})") from None


def _checkpoint(value) -> str | None:
    uri = (value or {}).get("sampler") if isinstance(value, dict) else None
    if not isinstance(uri, str):
        return None
    return uri if uri.startswith("tinker://") else str(uri_to_path(uri))


def load_build(root: Path) -> PersonaBuild:
    """A build's persona, models, teacher answers and already sampled answers; refused when it has no final
    model or no teacher answers."""
    rec = _record(root)
    stages = rec.get("stages") or {}
    persona = rec.get("persona") or root.parent.name
    final = _checkpoint(stages.get("merged")) or _checkpoint(stages.get("sft"))
    models = {"final": final} if final else {}
    if _checkpoint(stages.get("dpo")):
        models["dpo"] = _checkpoint(stages.get("dpo"))
    if not models:
        raise UserError(f"build {persona}/{root.name}: no trained model recorded (has it finished?)")
    files = build_files(root)
    teacher = []
    for path in {p for p in (files.train, files.heldout) if p is not None}:
        teacher += [r["chosen"][-1]["content"] for r in read_rows(path, "DPO data", ("prompt", "chosen", "rejected"))]
    if not teacher:
        raise UserError(f"build {persona}/{root.name}: no DPO pairs, so no teacher answers to learn the persona from")
    config = rec.get("config") or {}
    return PersonaBuild(
        persona,
        root,
        config.get("base_model"),
        models,
        sorted(teacher),
        _teacher_system(config.get("persona") or persona),
        _sampled(root, stages, files),
    )


def _teacher_system(constitution: str) -> str | None:
    """Exactly the system prompt the build's teacher wrote with (character.persona.prompts), or None when
    its constitution (a shipped name or a file) cannot be loaded now."""
    try:
        return teacher_system_prompt(load_constitution(constitution))
    except UserError:
        return None


def _sampled(root: Path, stages: dict, files) -> dict[str, dict]:
    """Each evaluated prompt's break-character conversation and every model's answers, from the build's
    evaluation; without one, its held-out prompts with the conversation evaluation would use."""
    metrics = ((stages.get("eval") or {}).get("report") or {}).get("metrics_json")
    if metrics and Path(metrics).is_file():
        gens = json.loads(Path(metrics).read_text()).get("generations") or []
        return {
            g["prompt"]: {
                "attack": g["attack"],
                "answers": {
                    lb: {"plain": a["text"], "robust": (g.get("robust") or {}).get(lb, {}).get("text")}
                    for lb, a in g["answers"].items()
                },
            }
            for g in gens
        }
    pairs = ("prompt", "chosen", "rejected")
    heldout = read_rows(files.heldout, "DPO data", pairs) if files.heldout and files.heldout_held else []
    train = read_rows(files.train, "DPO data", pairs) if files.train else []
    prompts, _ = held_out_prompts(heldout, train, not heldout)
    return {q: {"attack": break_character_messages(q, i), "answers": {}} for i, q in enumerate(prompts)}


def check_personas(builds: list[PersonaBuild]) -> None:
    """At least two personas, each once."""
    personas = [b.persona for b in builds]
    if len(builds) < 2:
        raise UserError(
            "the cross-persona evaluation needs builds of at least two personas; for one build, give its "
            "checkpoints: character eval CHECKPOINT --persona P"
        )
    twice = sorted({p for p in personas if personas.count(p) > 1})
    if twice:
        raise UserError(
            f"the cross-persona evaluation takes one build per persona; {', '.join(twice)} "
            f"{'is' if len(twice) == 1 else 'are'} given more than once"
            + ("" if len(set(personas)) > 1 else ": give builds of at least two personas")
        )


def common_prompts(builds: list[PersonaBuild], per_build: int = PROMPTS_PER_BUILD) -> list[dict]:
    """The prompts every model answers: up to `per_build` of each build's, each with its conversation."""
    out, seen = [], set()
    for b in builds:
        for q, item in list(b.sampled.items())[:per_build]:
            if q not in seen:
                seen.add(q)
                out.append({"prompt": q, "attack": item["attack"], "from": b.persona})
    return out
