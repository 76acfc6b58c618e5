"""Scale presets (DPO pairs / reflections / interactions / turns), as used by the Tinker port."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

ScaleName = Literal["smoke", "demo", "mini", "half", "full"]


class Scale(BaseModel):
    dpo_pairs: int = Field(ge=1)
    reflections: int = Field(ge=0)
    interactions: int = Field(ge=0)
    turns: int = Field(ge=2)


SCALES: dict[str, Scale] = {
    "smoke": Scale(dpo_pairs=16, reflections=40, interactions=4, turns=4),
    "demo": Scale(dpo_pairs=150, reflections=40, interactions=8, turns=4),  # the embedded model's README run
    "mini": Scale(dpo_pairs=250, reflections=1500, interactions=150, turns=8),
    "half": Scale(dpo_pairs=750, reflections=6000, interactions=600, turns=10),
    "full": Scale(dpo_pairs=1500, reflections=10000, interactions=2000, turns=10),
}
