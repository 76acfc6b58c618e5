"""What `character eval` evaluates, found on this machine: checkpoint folders, the build that made
them, and that build's data files.

This is the only part of evaluation that looks at local folders (adapter configs, fold records,
build records). The evaluation itself (character.evaluation.evaluate.evaluate_models) reaches every model
through a service's sampling clients, so it runs unchanged on a remote service.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from character.errors import UserError
from character.settings import Workspace
from character.storage import read_jsonl, uri_to_path


@dataclass
class Checkpoint:
    source: str  # as given
    path: Path
    kind: str  # "adapter" | "model"
    base_model: str | None  # what it was trained or folded from, if recorded
    label: str = ""


def inspect_checkpoint(source: str) -> Checkpoint:
    """An adapter folder (adapter_config.json) or a full model folder (config.json)."""
    path = uri_to_path(source)
    if not path.is_dir():
        raise UserError(f"checkpoint {source}: not found")
    if (path / "adapter_config.json").is_file():
        try:
            cfg = json.loads((path / "adapter_config.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"checkpoint {source}: adapter_config.json is not valid JSON ({e.msg})") from None
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise UserError(f"checkpoint {source}: adapter_config.json has no base_model_name_or_path")
        return Checkpoint(source, path, "adapter", str(base))
    if (path / "config.json").is_file():
        from character.weights.fold import FOLD_FILE

        fold = path / FOLD_FILE
        base = json.loads(fold.read_text()).get("base_model") if fold.is_file() else None
        return Checkpoint(source, path, "model", base)
    raise UserError(
        f"checkpoint {source}: neither an adapter folder (adapter_config.json) nor a model folder (config.json)"
    )


def _key(uri: str) -> str | None:
    """Local URIs compare as resolved paths; remote ones as written."""
    if uri.startswith("tinker://"):
        return uri
    if "://" in uri or uri.startswith("/"):
        try:
            return str(uri_to_path(uri).resolve())
        except UserError:
            return None
    return None


def recorded_checkpoints(ws: Workspace) -> dict[str, tuple[Path, str]]:
    """Checkpoint URI -> (the build folder whose record lists it, the stage that produced it)."""
    out: dict[str, tuple[Path, str]] = {}
    for rec_path in sorted((ws.root / "builds").glob("*/*/record.json")):
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for stage, value in (rec.get("stages") or {}).items():
            if not isinstance(value, dict):
                continue
            for k in ("sampler", "state"):
                key = _key(value[k]) if isinstance(value.get(k), str) else None
                if key:
                    out.setdefault(key, (rec_path.parent, stage))
    return out


def build_of(ws: Workspace, sources: list[str]) -> tuple[Path | None, dict[str, str], list[str]]:
    """The build that made these checkpoints (from the records that list them), each one's stage name,
    and notes (checkpoints no build lists, or that come from several builds)."""
    known = recorded_checkpoints(ws)
    builds: list[Path] = []
    stages: dict[str, str] = {}
    notes = []
    for s in sources:
        hit = known.get(_key(s) or "")
        if hit is None:
            continue
        stages[s] = hit[1]
        if hit[0] not in builds:
            builds.append(hit[0])
    if len(builds) > 1:
        notes.append(
            f"the checkpoints come from {len(builds)} builds; data and curves are from "
            f"{builds[0].parent.name}/{builds[0].name}"
        )
    return (builds[0] if builds else None), stages, notes


def label_checkpoints(ckpts: list[Checkpoint], stages: dict[str, str], names: list[str] | None = None) -> None:
    """Given names, else the stage that produced each checkpoint, else its folder name (a tinker:// one: its
    run and name); unique."""
    used: set[str] = {"base"}
    for i, c in enumerate(ckpts):
        name = names[i] if names else stages.get(c.source)
        if not name and c.kind == "tinker":  # tinker://<run>/sampler_weights/<name> -> <run>/<name>
            parts = c.source.removeprefix("tinker://").split("/")
            name = f"{parts[0]}/{parts[-1]}"
        if not name:
            parts = c.path.resolve().parts
            name = parts[-1] if parts[-1] not in ("final", "merged", "model") else "/".join(parts[-2:])
        label, k = name, 2
        while label in used:
            label, k = f"{name}-{k}", k + 1
        used.add(label)
        c.label = label


def recorded_base_model(ckpts: list[Checkpoint]) -> str:
    """The one base model every checkpoint records (the DPO reference)."""
    recorded = {
        str(Path(x.base_model).resolve()) if Path(x.base_model).exists() else x.base_model
        for x in ckpts
        if x.base_model
    }
    unknown = next((x.source for x in ckpts if x.base_model is None), None)
    if unknown or not recorded:
        raise UserError(f"checkpoint {unknown}: its base model is not recorded; pass --base-model")
    if len(recorded) > 1:
        raise UserError(
            f"checkpoints come from different base models ({', '.join(sorted(recorded))}); "
            "pass --base-model to choose the reference"
        )
    return recorded.pop()


# -- a build's data files --------------------------------------------------------------------------
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
        rec = json.loads((build / "record.json").read_text())
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
    d = build / "data"
    f.heldout = _first(_stage_path(build, "dpo_data", "heldout"), d / "heldout" / "dpo.jsonl")
    f.train = _first(_stage_path(build, "dpo_data", "path"), d / "train" / "dpo.jsonl", d / "dpo.jsonl")
    f.heldout_held = True if f.heldout else None
    if f.heldout is None and f.train is not None:  # an older build without a split
        f.heldout, f.heldout_held = f.train, False
    f.intro = _first(_stage_path(build, "introspection", "heldout"), d / "heldout" / "introspection.jsonl")
    f.intro_held = True if f.intro else None
    if f.intro is None:
        f.intro = _first(d / "introspection.jsonl")
        f.intro_held = False if f.intro else None
    return f


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


def training_curves(build: Path | None) -> dict[str, Path]:
    """The build's training runs that left step metrics (for the training-curve plot)."""
    if build is None or not build.is_dir():
        return {}
    return {
        d.name: d / "metrics.jsonl" for d in sorted(build.iterdir()) if d.is_dir() and (d / "metrics.jsonl").is_file()
    }
