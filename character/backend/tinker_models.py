"""Which models a Tinker build may name: from the names alone (no network), then against what the
service says it serves.

`check_ready` refuses local model names (and a missing key) before anything runs; `check_served`
checks every model a build will use against the service's capabilities (free to ask) before anything
is spent; `model_roles` marks which served models are big enough to teach a given student and to judge
(`character tinker models`). Neither offers a model whose family the renderers refuse
(character.train.families): the alternatives named are models a build can use.
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
# Total parameters (billions) of served models whose names do not say (their model cards do).
KNOWN_SIZES_B = {"deepseek-v3": 671.0, "kimi-k2": 1000.0, "glm-5": 744.0}


def check_ready(settings: Settings, base_model: str, teacher_model: str | None = None) -> None:
    """What can be checked before anything runs, with no network: a key source and model names."""
    if api_key_source(settings) is None:
        raise UserError(NO_KEY)
    rehearsal = _is_loopback()  # a loopback service (character.loopback) serves `tiny` by that name
    for what, name in (("base model", base_model), ("teacher model", teacher_model)):
        if name is None or (rehearsal and "/" not in name and not Path(name).expanduser().exists()):
            continue
        if name == "tiny" or "/" not in name or Path(name).expanduser().exists():
            raise UserError(
                f"{what} {name!r} is a local model; on Tinker use a model it serves, e.g. "
                f"{settings.tinker_base_model!r} (`character tinker models` lists them)"
            )


def _is_loopback() -> bool:
    """The service is on this machine (TINKER_BASE_URL at 127.0.0.1, ::1 or localhost): bare names are its own."""
    from urllib.parse import urlparse

    from character.backend.tinker import resolve_base_url

    try:
        host = urlparse(resolve_base_url(None)).hostname or ""
    except Exception:  # noqa: BLE001 - no usable URL: not a loopback; the preflight names the problem
        return False
    return host in ("127.0.0.1", "::1", "localhost")


def model_size_b(name: str) -> float | None:
    """Total parameters in billions, read from the model's name (None when the name does not say)."""
    short = name.rsplit("/", 1)[-1]
    m = _SIZE.search(short)
    if not m:
        return next((b for prefix, b in KNOWN_SIZES_B.items() if short.lower().startswith(prefix)), None)
    return float(m.group(1)) * (1000.0 if m.group(2).upper() == "T" else 1.0)


def is_chat_model(name: str) -> bool:
    """Follows a system prompt: not a pretrained-only base model (e.g. Qwen3-8B-Base, Llama-3.1-8B)."""
    short = name.rsplit("/", 1)[-1].lower()
    if short.endswith("-base") or "-base-" in short:
        return False
    if short.startswith("llama") and "instruct" not in short:
        return False
    return True


def renderer_or_refusal(name: str) -> tuple[str | None, str | None]:
    """(the renderer a build would use for this model, None) or (None, why its family is refused)."""
    from character.train.families import renderer_name

    try:
        return renderer_name(name), None
    except UserError as e:
        return None, str(e)


def renderable(name: str) -> bool:
    """Whether a build may use this model at all: its family is not refused by the renderers."""
    return renderer_or_refusal(name)[0] is not None


def model_roles(model, student: str) -> list[str]:
    """ "teacher" for a sampleable chat model at least TEACHER_MIN_RATIO x the student's size, "judge" for one of
    at least JUDGE_MIN_B billion parameters. Models whose name gives no size, and models the renderers refuse,
    are not marked."""
    if model.sampleable is False or not is_chat_model(model.model_name) or not renderable(model.model_name):
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


def merge_supported(name: str) -> bool:
    """Whether a paper-mode build on this base model can export and merge its adapters here."""
    from character.weights.tinker_export import UnsupportedAdapter, check_family

    try:
        check_family(name)
    except UnsupportedAdapter:
        return False
    return True


def models_to_check(cfg, judges: list[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(what, model, needs) for every served model a build will use: the student trains and samples, the
    teacher and the judges sample."""
    out = [("base model", cfg.base_model, ("train", "sample"))]
    teacher = cfg.teacher_model or cfg.base_model
    if teacher != cfg.base_model:
        out.append(("teacher model", teacher, ("sample",)))
    out += [(what, name, ("sample",)) for what, name in judges if name and "/" in name and "://" not in name]
    return [(what, name, needs) for what, name, needs in out if not Path(name).expanduser().exists()]


def check_served(served: list, wanted: list[tuple[str, str, tuple[str, ...]]], where: str) -> None:
    """Refuse, naming the model and the served alternatives, a model not served, not trainable or not
    sampleable. `served`: the service's `SupportedModel`s (an empty list: it did not say; not checked)."""
    if not served:
        return
    by_name = {m.model_name: m for m in served}
    for what, name, needs in wanted:
        m = by_name.get(name)
        can = {
            "train": m is not None and m.trainable is not False,
            "sample": m is not None and m.sampleable is not False,
        }
        if all(can[n] for n in needs):
            continue
        doing = " and ".join({"train": "trained", "sample": "sampled"}[n] for n in needs)
        fits = [
            x.model_name
            for x in served
            if all({"train": x.trainable is not False, "sample": x.sampleable is not False}[n] for n in needs)
            and is_chat_model(x.model_name)
            and renderable(x.model_name)  # never offer a model the build would then refuse
        ]
        state = "is not served" if m is None else f"cannot be {doing} there now"
        raise UserError(
            f"{what} {name!r} {state} by Tinker at {where}; served chat models that can be {doing}: "
            f"{', '.join(sorted(fits)) or 'none'} (`character tinker models` lists every model)"
        )


def check_build_served(cfg, settings: Settings) -> None:
    """A build's models (student, teacher, the judges when it evaluates) checked against
    what the service serves: one free call."""
    from character.backend.tinker import TinkerService, display_url

    judges = (
        [
            ("revealed-preference judge (CHARACTER_REVEALED_JUDGE)", settings.revealed_judge),
            ("coherence judge (CHARACTER_COHERENCE_JUDGE)", settings.coherence_judge),
        ]
        if cfg.evaluate
        else []
    )
    svc = TinkerService(settings)
    check_served(svc.list_models(), models_to_check(cfg, judges), display_url(svc.base_url))
