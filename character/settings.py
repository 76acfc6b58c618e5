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
    tinker_base_model: str = "meta-llama/Llama-3.1-8B-Instruct"
    # The paper's teacher is a much larger model than the student: on Tinker the default is the largest dense-
    # quality instruct model it serves (235B total, 22B active, no reasoning traces to strip). CHARACTER_TEACHER_MODEL
    # overrides it; `character tinker models` marks which models can serve as teacher and judge.
    tinker_teacher_model: str | None = Field(
        "Qwen/Qwen3-235B-A22B-Instruct-2507",
        description="teacher for Tinker builds: an instruct model several times larger than the student",
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
