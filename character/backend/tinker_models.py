"""Which models a Tinker build may name, read from the names alone (no network).

`check_ready` refuses local model names (and a missing key) before anything runs; `model_roles`
marks which served models are big enough to teach a given student and to judge
(`character tinker models`).
"""

from __future__ import annotations

import re
from pathlib import Path

from character.backend.tinker_key import NO_KEY, api_key_source
from character.errors import UserError
from character.settings import Settings

_SIZE = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([BT])(?![a-z])", re.IGNORECASE)  # "235B", not "A22B"
TEACHER_MIN_RATIO = 4.0  # the paper's teacher is many times the student's size
JUDGE_MIN_B = 30.0  # naming a trait from a short answer needs a capable reader


def check_ready(settings: Settings, base_model: str, teacher_model: str | None = None) -> None:
    """What can be checked before anything runs, with no network: a key source and model names."""
    if api_key_source(settings) is None:
        raise UserError(NO_KEY)
    for what, name in (("base model", base_model), ("teacher model", teacher_model)):
        if name is None:
            continue
        if name == "tiny" or "/" not in name or Path(name).expanduser().exists():
            raise UserError(
                f"{what} {name!r} is a local model; on Tinker use a model it serves, e.g. "
                f"{settings.tinker_base_model!r} (`character tinker models` lists them)"
            )


def model_size_b(name: str) -> float | None:
    """Total parameters in billions, read from the model's name (None when the name does not say)."""
    m = _SIZE.search(name.rsplit("/", 1)[-1])
    if not m:
        return None
    return float(m.group(1)) * (1000.0 if m.group(2).upper() == "T" else 1.0)


def is_chat_model(name: str) -> bool:
    """Follows a system prompt: not a pretrained-only base model (e.g. Qwen3-8B-Base, Llama-3.1-8B)."""
    short = name.rsplit("/", 1)[-1].lower()
    if short.endswith("-base") or "-base-" in short:
        return False
    if short.startswith("llama") and "instruct" not in short:
        return False
    return True


def model_roles(model, student: str) -> list[str]:
    """ "teacher" for a sampleable chat model at least TEACHER_MIN_RATIO x the student's size, "judge" for one of
    at least JUDGE_MIN_B billion parameters. Models whose name gives no size are not marked."""
    if model.sampleable is False or not is_chat_model(model.model_name):
        return []
    size, small = model_size_b(model.model_name), model_size_b(student)
    if size is None:
        return []
    roles = []
    if small is not None and size >= TEACHER_MIN_RATIO * small:
        roles.append("teacher")
    if size >= JUDGE_MIN_B:
        roles.append("judge")
    return roles
