"""Settings (env prefix CHARACTER_) and the workspace layout on disk."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from character.build.paths import builds_root
from character.errors import UserError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHARACTER_", extra="ignore")

    workdir: Path = Field(default=Path("workspace"), description="datasets, checkpoints, run records, cached models")
    backend: Literal["local", "tinker"] = "local"
    base_model: str = "tiny"
    teacher_model: str | None = None
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto, cpu, cuda or cuda:N")
    seed: int = 0
    # Tinker (backend "tinker"): models it serves, where the key lives, and how long to wait for it.
    # Served defaults (Tinker's lineup of 2026-08; README "Tinker: default models"): a dense 8B hybrid-thinking
    # chat model, the paper's student size, whose exported adapters merge exactly here; and as teacher the largest
    # served chat model our renderers support (397B total, 17B active), in its non-thinking mode. Checked against
    # the service's capabilities before a build spends anything; `character tinker models` marks other candidates.
    tinker_base_model: str = "Qwen/Qwen3-8B"
    tinker_teacher_model: str | None = Field(
        "Qwen/Qwen3.5-397B-A17B",
        description="teacher for Tinker builds: a chat model many times larger than the student",
    )
    tinker_secret_block: str | None = Field(
        None, description="name of a Prefect Secret block holding the Tinker key (used when TINKER_API_KEY is unset)"
    )
    tinker_timeout_s: float = Field(60.0, gt=0, description="how long to wait for Tinker to answer at all")
    tinker_result_timeout_s: float = Field(
        600.0, gt=0, description="how long to wait for any one Tinker result before giving it up as transient"
    )
    tinker_max_in_flight: int = Field(32, ge=1, description="sampling requests in flight at once on Tinker")
    # Revealed preferences (character.evaluation.revealed): the judge that names the trait an answer shows. Unset: that
    # evaluation is skipped, and the report and JSON say so. A model Tinker serves, a tinker:// path, a local
    # model or adapter folder, or 'tiny'. The paper's judge was a large chat model (GLM-4.5-Air).
    revealed_judge: str | None = Field(None, description="judge model for the revealed-preference evaluation")
    revealed_games: int = Field(200, ge=1, description="revealed-preference games per evaluated model")
    # What builds cost (character.cost.prices): a dated JSON table of $ per million tokens; unset, the shipped one.
    price_table: Path | None = Field(None, description="price table JSON file (default: character/cost/prices.json)")
    # Reliability testing: this share of backend calls fails with a transient error (character.backend.faults).
    fault_rate: float = Field(0.0, ge=0, le=1, description="share of backend calls made to fail transiently (0: off)")
    fault_seed: int = Field(0, description="which calls fail, when fault_rate is set")


def check_name(name: str, what: str) -> str:
    """A persona or build name becomes a folder name: allow no separators, no '..'."""
    if not _SAFE_NAME.match(name):
        raise UserError(
            f"{what} {name!r} is not a safe name: use letters, digits, '-' and '_' (at most 64, no path separators)"
        )
    return name


class Workspace:
    """Where everything lives. Folders are created on first use."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def build_dir(self, persona: str, build_id: str) -> Path:
        return builds_root(self.root) / check_name(persona, "persona") / check_name(build_id, "build id")
