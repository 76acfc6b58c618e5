"""Every file of a build, named once.

A build lives in `<workdir>/builds/<persona>/<build_id>/`:

    record.json              what each finished stage produced (character.build.record)
    .lock                    the one-writer lock (character.build.lock)
    data/questions.jsonl     expanded questions (optional stage)
    data/dpo.jsonl           distillation pairs, all of them; data/{train,heldout}/dpo.jsonl the split
    data/introspection.jsonl reflections and self-interactions; data/{train,heldout}/... the split
    dpo/, sft/               training runs (RunPaths): metrics.jsonl, checkpoints.jsonl, saved states
    downloads/<stage>/       a Tinker checkpoint converted to a local adapter (paper-mode merge)
    merged/                  paper mode's merged adapter
    eval/                    evaluation reports
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECORD = "record.json"
LOCK = ".lock"
HELDOUT = "heldout"


@dataclass(frozen=True)
class RunPaths:
    """The files of a training run's folder (a build's `dpo/` or `sft/`, or any folder the loop is given)."""

    root: Path

    @property
    def metrics(self) -> Path:
        """One row per step."""
        return self.root / "metrics.jsonl"

    @property
    def saves(self) -> Path:
        """Every recorded state, then the final one with the sampler weights."""
        return self.root / "checkpoints.jsonl"


@dataclass(frozen=True)
class BuildPaths:
    root: Path

    @property
    def record(self) -> Path:
        return self.root / RECORD

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def questions(self) -> Path:
        return self.data / "questions.jsonl"

    @property
    def dpo_pairs(self) -> Path:
        return self.data / "dpo.jsonl"

    @property
    def introspection(self) -> Path:
        return self.data / "introspection.jsonl"

    @staticmethod
    def train_split(data_file: Path) -> Path:
        """The training side of a data file's held-out split (character.datagen.heldout)."""
        return data_file.parent / "train" / data_file.name

    @staticmethod
    def heldout_split(data_file: Path) -> Path:
        return data_file.parent / HELDOUT / data_file.name

    @staticmethod
    def is_heldout_split(data_file: Path) -> bool:
        """Whether a data file lies where heldout_split puts one (a file given by hand may)."""
        return Path(data_file).parent.name == HELDOUT

    @staticmethod
    def skipped(data_file: Path) -> Path:
        """The rows generation dropped from a data file, each with its reason."""
        return data_file.with_name(data_file.name + ".skipped.jsonl")

    def run(self, stage: str) -> Path:
        """A training stage's run folder (`dpo`, `sft`)."""
        return self.root / stage

    def run_files(self, stage: str) -> RunPaths:
        """The files of a training stage's run folder."""
        return RunPaths(self.run(stage))

    def download(self, stage: str) -> Path:
        return self.root / "downloads" / stage

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @staticmethod
    def is_build(folder: Path) -> bool:
        return (Path(folder) / RECORD).is_file()

    @staticmethod
    def containing(path: Path, depth: int = 3) -> BuildPaths | None:
        """The build a data file or folder lies in (up to `depth` folders up), if any."""
        return next((BuildPaths(d) for d in Path(path).resolve().parents[:depth] if BuildPaths.is_build(d)), None)


def builds_root(workdir: str | Path) -> Path:
    return Path(workdir).expanduser() / "builds"


def build_records(workdir: str | Path, persona: str | None = None) -> list[Path]:
    """The record.json of every build in a workspace (of one persona, if given), sorted by path."""
    return sorted(builds_root(workdir).glob(f"{persona or '*'}/*/{RECORD}"))
