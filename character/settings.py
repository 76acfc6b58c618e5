"""Settings (env prefix CHARACTER_) and the workspace layout on disk."""

from __future__ import annotations

import os
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
    nightly_wait_s: float = Field(
        12 * 3600.0, gt=0, description="how long a nightly run from a deployment waits for its build runs"
    )
    build_slot_timeout_s: float = Field(
        60.0,
        gt=0,
        description="how long a build run from a deployment waits for the Prefect server to answer the request for "
        "its build's slot (a slot held by another run is refused at once, whatever this is)",
    )
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
    # Coherence (character.evaluation.coherence): the judge of pairwise comparisons, as revealed_judge. Unset: skipped.
    coherence_judge: str | None = Field(None, description="judge model for the pairwise coherence comparisons")
    capability_set: Path | None = Field(None, description="multiple-choice set of the capability probe (JSONL)")
    # Reliability testing: this share of backend calls fails with a transient error (character.backend.faults).
    fault_rate: float = Field(0.0, ge=0, le=1, description="share of backend calls made to fail transiently (0: off)")
    fault_seed: int = Field(0, description="which calls fail, when fault_rate is set")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: default_threads())")
    wandb_project: str | None = Field(None, description="Weights & Biases project of every build (--wandb)")
    model_cache: Path | None = Field(
        None, description="models built here, shared by all workspaces (default: $XDG_CACHE_HOME/character/models)"
    )


def model_cache() -> Path:
    """Where the embedded tiny model is built, once per user rather than once per workspace (minutes on a
    small machine): CHARACTER_MODEL_CACHE, else $XDG_CACHE_HOME/character/models (~/.cache/character/models)."""
    configured = Settings().model_cache
    if configured:
        return Path(configured).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")  # relative: ignored (XDG)
    return Path(cache).resolve() / "character" / "models"


def default_threads() -> int:
    """CPU threads a local run uses unless told (--threads, CHARACTER_THREADS; OMP_NUM_THREADS when set):
    the cores this process may use (affinity and a cgroup quota), less those other processes keep busy
    (the 1-minute load average), at least one. Two CPU-heavy jobs on one machine then share its cores
    instead of each running a thread per core, which slows both many times over."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpus = min(cpus, _cgroup_cpus() or cpus)
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, min(cpus, cpus - busy))


def _cgroup_cpus() -> int | None:
    """The CPUs a cgroup (v2) quota allows this process, rounded up; None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def apply_threads(n: int) -> int:
    """Use `n` CPU threads for torch in this process (before or after torch is imported); returns `n`."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(n)  # read when torch starts; set_num_threads below if it already has
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


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

    @property
    def reference_answers(self) -> Path:
        """Teacher answers for other personas' constitutions, kept so a second build does not sample them again
        (character.evaluation.reference_set)."""
        return self.root / "cache" / "reference"

    def build_dir(self, persona: str, build_id: str) -> Path:
        return builds_root(self.root) / check_name(persona, "persona") / check_name(build_id, "build id")


# File systems that hold no ordinary files (a workdir there fails in odd ways deep inside a build).
_SPECIAL_FS = {
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "mqueue",
    "hugetlbfs",
    "autofs",
    "binfmt_misc",
    "efivarfs",
}
MIN_FREE_BYTES = 1 << 20  # below this a build cannot write even its first record


def _mount_type(path: Path) -> tuple[str, str] | None:
    """The mount point holding `path` and its file system type (Linux; None where unknown)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best: tuple[str, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ").replace("\\011", "\t")
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2])
    return best


def check_workdir(workdir: Path | str) -> Path:
    """The workspace folder can hold a build: a folder (or creatable), on an ordinary file system, writable,
    with space left. Each problem is one UserError naming the folder, raised before any work starts."""
    root = Path(workdir).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise UserError(f"workdir {root}: exists and is not a folder")
    existing = next(d for d in (root, *root.parents) if d.exists())  # where the first folder would be made
    where = f"workdir {root}" + ("" if existing == root else f" (to be created in {existing})")
    mount = _mount_type(existing.resolve())
    if mount and mount[1] in _SPECIAL_FS:
        raise UserError(f"{where}: on {mount[0]}, a {mount[1]} file system that holds no ordinary files")
    if not existing.is_dir():
        raise UserError(f"workdir {root}: {existing} is not a folder")
    _probe_write(existing, where)
    import shutil

    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"{where}: no space left on its device ({free // 1024} KiB free)")
    return root


def _probe_write(folder: Path, where: str) -> None:
    import errno
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".character-write-check-", dir=folder)
    except OSError as e:
        reason = {
            errno.EROFS: "on a read-only file system",
            errno.EACCES: "not writable (permission denied)",
            errno.EPERM: "not writable (operation not permitted)",
            errno.ENOSPC: "no space left on its device",
            errno.EDQUOT: "over its disk quota",
        }.get(e.errno, f"cannot be written ({e.strerror})")
        raise UserError(f"{where}: {reason}") from None
    os.close(fd)
    os.unlink(name)
