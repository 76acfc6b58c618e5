"""Constitutions: the paper's format, a JSON array of {"trait", "questions"} entries."""

from __future__ import annotations

import hashlib
import json
import unicodedata
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
                raise ValueError(f"question {i + 1} is empty")
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
    return resources.files("character.persona.shipped")


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


# Limits: generous for a real persona (the paper's have ten traits of one sentence and five
# questions each) and small enough that a pasted book or a generated file fails here, not mid-build.
MAX_TRAITS = 100
MAX_TRAIT_CHARS = 1000
MAX_QUESTIONS_PER_TRAIT = 200
MAX_QUESTION_CHARS = 2000
MAX_PROBLEMS = 20  # `personas validate` lists at most this many
# Bidirectional embeddings, overrides and isolates reorder displayed text (a "Trojan Source" trick).
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _bad_character(text: str) -> str | None:
    """Control characters (NUL, escapes, bidi overrides, lone surrogates) other than tab and newline."""
    for ch in text:
        if ch in "\t\n\r":
            continue
        if ch in _BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Cs"):
            return f"contains the control character U+{ord(ch):04X}"
    return None


def _text_problems(text: str, limit: int) -> str | None:
    if len(text) > limit:
        return f"is {len(text)} characters long; the limit is {limit}"
    return _bad_character(text)


def _loc(loc: tuple) -> str:
    """pydantic's location, with list positions counted from 1 like the entries."""
    return ".".join(str(x + 1) if isinstance(x, int) else str(x) for x in loc) or "entry"


def constitution_problems(
    text: str, name: str, source: str, fmt: str = "json"
) -> tuple[Constitution | None, list[str]]:
    """Every problem in a constitution's text (up to MAX_PROBLEMS), each one line naming the file, the
    entry (counted from 1) and the field; with none, the constitution."""
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
    if len(raw) > MAX_TRAITS:
        raise UserError(f"{source}: {len(raw)} traits; the limit is {MAX_TRAITS}")
    problems: list[str] = []
    traits: list[Trait] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw, 1):
        if len(problems) >= MAX_PROBLEMS:
            break
        if isinstance(entry, dict):  # limits first: a 1 MB trait is named as too long, not parsed further
            t, qs = entry.get("trait"), entry.get("questions")
            bad = [("trait", _text_problems(t, MAX_TRAIT_CHARS))] if isinstance(t, str) else []
            if isinstance(qs, list):
                if len(qs) > MAX_QUESTIONS_PER_TRAIT:
                    bad.append(("questions", f"{len(qs)} questions; the limit is {MAX_QUESTIONS_PER_TRAIT}"))
                else:
                    bad += [
                        (f"questions.{j}", _text_problems(q, MAX_QUESTION_CHARS))
                        for j, q in enumerate(qs, 1)
                        if isinstance(q, str)
                    ]
            bad = [(field, msg) for field, msg in bad if msg]
            if bad:
                problems += [f"{source}: entry {i}, field '{field}': {msg}" for field, msg in bad]
                continue
        try:
            trait = Trait.model_validate(entry)
        except ValidationError as e:
            problems += [f"{source}: entry {i}, field '{_loc(err['loc'])}': {err['msg']}" for err in e.errors()]
            continue
        key = " ".join(trait.trait.lower().split())
        if key in seen:
            problems.append(f"{source}: entry {i}, field 'trait': duplicate of entry {seen[key]}")
        seen[key] = i
        traits.append(trait)
    if problems:
        return None, problems[:MAX_PROBLEMS]
    return Constitution(name=name, traits=traits, source=source), []


def parse_constitution(text: str, name: str, source: str, fmt: str = "json") -> Constitution:
    """Validate a constitution's text; the first problem is a one-line UserError."""
    c, problems = constitution_problems(text, name, source, fmt)
    if problems:
        more = f" (and {len(problems) - 1} more: `character personas validate` lists them)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    return c


def _read(name_or_path: str) -> tuple[str, str, str, str]:
    """A shipped persona by name, or a constitution file: (text, persona name, source, format)."""
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
        return text, check_name(path.stem, "persona"), str(path), fmt
    check_name(name_or_path, "persona")
    if name_or_path not in shipped_personas():
        raise UserError(
            f"unknown persona {name_or_path!r}: shipped personas are {', '.join(shipped_personas())} "
            "(or give a path to a constitution .json file)"
        )
    res = _shipped_dir() / f"{name_or_path}.json"
    return res.read_text(encoding="utf-8"), name_or_path, f"{name_or_path}.json (shipped)", "json"


def load_constitution(name_or_path: str) -> Constitution:
    """A shipped persona by name, or a path to a constitution file (the persona is the file's stem)."""
    return parse_constitution(*_read(name_or_path))


def check_constitution(name_or_path: str) -> tuple[Constitution | None, list[str]]:
    """For `personas validate`: the constitution, or every problem (up to MAX_PROBLEMS)."""
    return constitution_problems(*_read(name_or_path))
