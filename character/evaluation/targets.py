"""What `character eval` evaluates, found on this machine: checkpoint folders and the build that made
them (that build's data files: character.evaluation.data).

Only these two modules look at local folders (adapter configs, fold records, build records). The
evaluation itself (character.evaluation.run.evaluate_models) reaches every model through a service's
sampling clients, so it runs unchanged on a remote service.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from character.build.paths import build_records
from character.errors import UserError
from character.settings import Workspace
from character.storage import uri_to_path


@dataclass
class EvalTarget:
    """A checkpoint to evaluate, as found here: what it is, what it was trained from, its label."""

    source: str  # as given
    path: Path
    kind: str  # "adapter" | "model" | "tinker"
    base_model: str | None  # what it was trained or folded from, if recorded
    label: str = ""


def inspect_checkpoint(source: str) -> EvalTarget:
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
        return EvalTarget(source, path, "adapter", str(base))
    if (path / "config.json").is_file():
        from character.weights.fold import FOLD_FILE

        fold = path / FOLD_FILE
        base = json.loads(fold.read_text()).get("base_model") if fold.is_file() else None
        return EvalTarget(source, path, "model", base)
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
    for rec_path in build_records(ws.root):
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


def label_checkpoints(ckpts: list[EvalTarget], stages: dict[str, str], names: list[str] | None = None) -> None:
    """Given names, else the stage that produced each checkpoint, else its folder name (a tinker:// one: its
    run and name); unique."""
    used: set[str] = {"base", "prompted"}  # the rows of the base model, bare and with the constitution
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


def recorded_base_model(ckpts: list[EvalTarget]) -> str:
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
