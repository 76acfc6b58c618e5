"""The optional sections of an evaluation, beyond the persona and preference metrics: which are asked for
(Sections) and their results once every model has been sampled: the capability probe's summary and the
coherence comparisons (character.evaluation.capability, .coherence). character.evaluation.run samples the
models; the prompted baseline and the prefill turn are sampled there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from character.backend import SamplingClient
from character.evaluation.capability import CapabilitySet, capability_summary
from character.evaluation.coherence import judge_coherence

if TYPE_CHECKING:
    from character.evaluation.run import ModelRun
    from character.evaluation.specificity import SpecificitySetup


@dataclass
class Sections:
    """The optional parts of an evaluation (EvalOptions turns them all on for builds and `character eval`).

    `prompted_system`: the teacher's system prompt (the constitution); the base model answers with it as
    the `prompted` row. `prefill`: multi-turn robustness (character.evaluation.multiturn). `capability`:
    the multiple-choice probe (character.evaluation.capability). `coherence_judge`: makes the client of the
    judge of the pairwise coherence comparisons (character.evaluation.coherence); None: skipped, and why.
    `specificity`: where the reference answers of persona specificity come from (character.evaluation.specificity)."""

    prompted_system: str | None = None
    prefill: bool = False
    capability: CapabilitySet | None = None
    coherence_judge: Callable[[], SamplingClient] | None = None
    coherence_judge_name: str | None = None
    specificity: SpecificitySetup | None = None


def section_notes(sections: Sections, capability: dict) -> list[str]:
    """What every model's notes say of the optional sections not run, and a base at chance."""
    notes = []
    if not sections.prefill:
        notes.append("multi-turn (prefill) robustness not run")
    if sections.capability is None:
        notes.append("capability probe not run")
    elif capability.get("base_at_chance"):
        notes.append(
            f"capability: the base model is at chance on the set '{capability['set']}' (accuracy "
            f"{capability['models']['base']['accuracy']:.3f} vs chance {capability['chance']:.3f}, n={capability['n']}): "
            "its accuracies and changes are noise"
        )
    return notes


def final_label(models: list[ModelRun]) -> str | None:
    """The checkpoint labelled "final", else the last one evaluated (None: only base and prompted)."""
    labels = [m.label for m in models if m.label not in ("base", "prompted")]
    return "final" if "final" in labels else (labels[-1] if labels else None)


def capability_section(sections: Sections, models: list[ModelRun]) -> dict:
    if sections.capability is None:
        return {"status": "skipped", "reason": "not asked for"}
    return capability_summary(sections.capability, {m.label: m.capability for m in models})


def coherence_section(sections: Sections, prompts: list[str], models: list[ModelRun], seed: int) -> dict:
    if sections.coherence_judge is None:
        reason = (
            "no coherence judge is configured: set --coherence-judge or CHARACTER_COHERENCE_JUDGE "
            "(a model Tinker serves, a tinker:// path or a local model folder)"
        )
        return {"status": "skipped", "reason": reason, "judge_model": None}
    if not prompts:
        return {"status": "skipped", "reason": "no prompts to answer", "judge_model": sections.coherence_judge_name}
    answers = {m.label: m.plain for m in models}
    final = final_label(models)
    return judge_coherence(sections.coherence_judge, sections.coherence_judge_name, prompts, answers, final, seed)
