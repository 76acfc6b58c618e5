"""Constitutions: the paper's format, a JSON array of {"trait", "questions"} entries."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from character.errors import UserError
from character.settings import check_name


class Trait(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    trait: str = Field(min_length=1)
    questions: list[str] = Field(min_length=1)

    @field_validator("trait")
    @classmethod
    def _trait_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("trait is empty")
        return v.strip()

    @field_validator("questions")
    @classmethod
    def _questions_not_blank(cls, v: list[str]) -> list[str]:
        for i, q in enumerate(v):
            if not q.strip():
                raise ValueError(f"question {i} is empty")
        return [q.strip() for q in v]


class Constitution(BaseModel):
    name: str
    traits: list[Trait]
    source: str = ""

    @property
    def questions(self) -> list[str]:
        return [q for t in self.traits for q in t.questions]

    def digest(self) -> str:
        """Content hash, recorded as provenance next to every generated row."""
        body = json.dumps([t.model_dump() for t in self.traits], sort_keys=True).encode()
        return hashlib.sha256(body).hexdigest()[:16]


CONSTITUTION_SUFFIXES = (".json", ".yaml", ".yml")


def _shipped_dir():
    return resources.files("character.personas")


def shipped_personas() -> list[str]:
    return sorted(p.name[:-5] for p in _shipped_dir().iterdir() if p.name.endswith(".json"))


def _parse_yaml(text: str, source: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise UserError(f"{source}: not valid YAML: {problem}{where}") from None


def parse_constitution(text: str, name: str, source: str, fmt: str = "json") -> Constitution:
    """Validate a constitution's text; errors name the file, the entry and the field, on one line."""
    if fmt == "yaml":
        raw = _parse_yaml(text, source)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(raw, list):
        raise UserError(f"{source}: expected a JSON array of {{trait, questions}} entries, got {type(raw).__name__}")
    if not raw:
        raise UserError(f"{source}: the constitution has no traits")
    traits = []
    for i, entry in enumerate(raw):
        try:
            traits.append(Trait.model_validate(entry))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "entry"
            raise UserError(f"{source}: entry {i}, field '{where}': {err['msg']}") from None
    seen: dict[str, int] = {}
    for i, t in enumerate(traits):
        key = " ".join(t.trait.lower().split())
        if key in seen:
            raise UserError(f"{source}: entry {i}, field 'trait': duplicate of entry {seen[key]}")
        seen[key] = i
    return Constitution(name=name, traits=traits, source=source)


def load_constitution(name_or_path: str) -> Constitution:
    """A shipped persona by name, or a path to a constitution file (the persona is the file's stem)."""
    path = Path(name_or_path)
    if path.suffix in CONSTITUTION_SUFFIXES or path.exists() or "/" in name_or_path:
        if not path.is_file():
            raise UserError(f"{name_or_path}: constitution file not found")
        if path.suffix not in CONSTITUTION_SUFFIXES:
            raise UserError(f"{path}: a constitution file must end in .json, .yaml or .yml")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        fmt = "json" if path.suffix == ".json" else "yaml"
        return parse_constitution(text, check_name(path.stem, "persona"), str(path), fmt)
    check_name(name_or_path, "persona")
    if name_or_path not in shipped_personas():
        raise UserError(
            f"unknown persona {name_or_path!r}: shipped personas are {', '.join(shipped_personas())} "
            "(or give a path to a constitution .json file)"
        )
    res = _shipped_dir() / f"{name_or_path}.json"
    return parse_constitution(res.read_text(encoding="utf-8"), name_or_path, f"{name_or_path}.json (shipped)")
