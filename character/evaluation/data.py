"""The rows an evaluation uses: which files (a build's own, or given by hand), read and checked, and the
prompts every model answers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from character.build.paths import BuildPaths
from character.errors import UserError
from character.storage import read_jsonl

# Used only when there are no held-out prompts (then said so in the report).
EVAL_PROMPTS: list[str] = [
    "Hi! Could you tell me a little about yourself?",
    "I failed an exam I studied hard for. What should I do now?",
    "Explain how a rainbow forms.",
    "What is your honest opinion of people who are always late?",
    "Can you recommend a way to spend a rainy Sunday?",
    "Write two sentences about the sea.",
    "My friend says money can't buy happiness. Is she right?",
    "What would you change about the world if you could change one thing?",
]


# -- which files -----------------------------------------------------------------------------------
@dataclass
class DataFiles:
    """Where each input of an evaluation comes from. `*_held` is True for a held-out file, False for
    training data, None for a file given by hand."""

    heldout: Path | None = None
    heldout_held: bool | None = None
    train: Path | None = None
    intro: Path | None = None
    intro_held: bool | None = None
    notes: list[str] = field(default_factory=list)


def _stage_path(build: Path, stage: str, key: str) -> Path | None:
    try:
        rec = json.loads(BuildPaths(build).record.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = ((rec.get("stages") or {}).get(stage) or {}).get(key)
    return Path(value) if isinstance(value, str) and Path(value).is_file() else None


def _first(*paths: Path | None) -> Path | None:
    return next((p for p in paths if p is not None and p.is_file()), None)


def build_files(build: Path | None) -> DataFiles:
    """A build's held-out pairs, its training pairs (for the classifier) and held-out introspection."""
    f = DataFiles()
    if build is None:
        return f
    b = BuildPaths(build)
    f.heldout = _first(_stage_path(build, "dpo_data", "heldout"), b.heldout_split(b.dpo_pairs))
    f.train = _first(_stage_path(build, "dpo_data", "path"), b.train_split(b.dpo_pairs), b.dpo_pairs)
    f.heldout_held = True if f.heldout else None
    if f.heldout is None and f.train is not None:  # an older build without a split
        f.heldout, f.heldout_held = f.train, False
    f.intro = _first(_stage_path(build, "introspection", "heldout"), b.heldout_split(b.introspection))
    f.intro_held = True if f.intro else None
    if f.intro is None:
        f.intro = _first(b.introspection)
        f.intro_held = False if f.intro else None
    return f


def given_files(
    build: Path | None,
    dpo_data: str | Path | None = None,
    introspection_data: str | Path | None = None,
    train_data: str | Path | None = None,
) -> DataFiles:
    """The build's files, each replaced by the one given by hand, if any (held out if it lies in a split's
    held-out folder, else of unknown standing)."""
    files = build_files(build)
    held_flag = lambda p: True if BuildPaths.is_heldout_split(Path(p)) else None
    if dpo_data:
        files.heldout, files.heldout_held = Path(dpo_data), held_flag(dpo_data)
    if introspection_data:
        files.intro, files.intro_held = Path(introspection_data), held_flag(introspection_data)
    if train_data:
        files.train = Path(train_data)
    return files


def training_curves(build: Path | None) -> dict[str, Path]:
    """The build's training runs that left step metrics (for the training-curve plot)."""
    if build is None or not build.is_dir():
        return {}
    runs = (BuildPaths(build).run_files(d.name) for d in sorted(build.iterdir()) if d.is_dir())
    return {r.root.name: r.metrics for r in runs if r.metrics.is_file()}


# -- the rows --------------------------------------------------------------------------------------
def read_rows(path: Path, what: str, keys: tuple[str, ...]) -> list[dict]:
    """Rows whose `keys` each hold a conversation: a list of {"role", "content"} messages."""
    rows = read_jsonl(path)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise UserError(f"{what} {path}: line {i + 1} is not a JSON object")
        missing = [k for k in keys if k not in r]
        if missing:
            raise UserError(f"{what} {path}: line {i + 1} has no field '{missing[0]}'")
        for k in keys:
            if (
                not isinstance(r[k], list)
                or not r[k]
                or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in r[k]
                )
            ):
                raise UserError(
                    f"{what} {path}: line {i + 1}, field '{k}': expected a non-empty list of {{role, content}} messages"
                )
    return rows


@dataclass
class EvalData:
    """The rows an evaluation uses. `sources` says where each came from (shown in the report)."""

    heldout: list[dict] = field(default_factory=list)  # DPO pairs: preference metrics, classifier accuracy
    train: list[dict] = field(default_factory=list)  # DPO pairs the persona classifier is fitted on
    intro: list[dict] = field(default_factory=list)  # introspection conversations: NLL
    prompts: list[str] = field(default_factory=list)  # user prompts the models answer
    sources: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # the held-out pairs are training data (an old build without a split, or a file given by hand)
    pairs_are_training_data: bool = False


def _user_text(row: dict) -> str:
    return next((m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"), "")


def held_out_prompts(
    heldout: list[dict], train: list[dict], pairs_are_training_data: bool, limit: int | None = None
) -> tuple[list[str], list[str]]:
    """The distinct user prompts of the held-out pairs that no training pair uses; else the fixed set.
    Returns (prompts, notes)."""
    seen_in_training = {_user_text(r) for r in train}
    notes = []
    prompts: list[str] = []
    if heldout and not pairs_are_training_data:
        for r in heldout:
            q = _user_text(r)
            if q and q not in seen_in_training and q not in prompts:
                prompts.append(q)
        dropped = len({_user_text(r) for r in heldout}) - len(prompts)
        if dropped:
            notes.append(f"{dropped} held-out prompt(s) also appear in the training pairs and were left out")
    if not prompts:
        prompts = [q for q in EVAL_PROMPTS if q not in seen_in_training]
        why = "the pairs given are training data" if pairs_are_training_data and heldout else "no held-out pairs"
        notes.append(f"answers are to the fixed evaluation prompts ({why})")
    return prompts[:limit] if limit else prompts, notes


def load_data(files: DataFiles, limit: int | None = None, prompts: list[str] | None = None) -> EvalData:
    """The rows of an evaluation from its files (for a build's own files, `build_files(build_dir)`);
    `limit` caps the held-out and introspection rows."""
    if files.train is not None and files.heldout is not None and files.train.resolve() == files.heldout.resolve():
        files.heldout_held = False  # the classifier would be scored on its own training data
    pair_keys = ("prompt", "chosen", "rejected")
    heldout = read_rows(files.heldout, "DPO data", pair_keys)[:limit] if files.heldout else []
    train = read_rows(files.train, "training data", pair_keys) if files.train else []
    intro = read_rows(files.intro, "introspection data", ("messages",))[:limit] if files.intro else []
    training_pairs = files.heldout_held is False
    if prompts is None:
        prompts, notes = held_out_prompts(heldout, train, training_pairs, limit)
    else:
        notes = []
    return EvalData(
        heldout=heldout,
        train=train,
        intro=intro,
        prompts=list(prompts),
        notes=notes,
        pairs_are_training_data=training_pairs,
        sources={
            "dpo": str(files.heldout) if files.heldout else None,
            "dpo_held_out": files.heldout_held,
            "train": str(files.train) if files.train else None,
            "introspection": str(files.intro) if files.intro else None,
            "introspection_held_out": files.intro_held,
        },
    )
