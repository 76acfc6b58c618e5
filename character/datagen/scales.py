"""Scale presets: how much data a build generates.

smoke/mini/half/full are the Tinker port's presets (DPO pairs / reflections / interactions / turns),
one sample per prompt, no question expansion. `paper` follows the paper's reference recipe: each
trait's questions expanded by the teacher to 50 (5 given + 45 generated), every distillation prompt
answered 5 times by teacher and student, 10 reflection prompts x 1000 samples, 2000 self-interactions
of 10 turns. The paper's general prompts are LIMA's (about 1,300); ours are the shipped pool of 362, so
its pair count is 5 x (10 traits x 50 + 362) = 4310: each distinct prompt once, 5 samples each.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

ScaleName = Literal["smoke", "demo", "mini", "half", "full", "paper"]


class Scale(BaseModel):
    dpo_pairs: int = Field(ge=1)
    reflections: int = Field(ge=0)
    interactions: int = Field(ge=0)
    turns: int = Field(ge=2)
    samples_per_prompt: int = Field(1, ge=1)
    expand_questions: int = Field(0, ge=0)


SCALES: dict[str, Scale] = {
    "smoke": Scale(dpo_pairs=16, reflections=40, interactions=4, turns=4),
    "demo": Scale(dpo_pairs=150, reflections=40, interactions=8, turns=4),  # the embedded model's README run
    "mini": Scale(dpo_pairs=250, reflections=1500, interactions=150, turns=8),
    "half": Scale(dpo_pairs=750, reflections=6000, interactions=600, turns=10),
    "full": Scale(dpo_pairs=1500, reflections=10000, interactions=2000, turns=10),
    "paper": Scale(
        dpo_pairs=5 * (10 * 50 + 362),
        reflections=10000,
        interactions=2000,
        turns=10,
        samples_per_prompt=5,
        expand_questions=45,
    ),
}
