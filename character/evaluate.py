"""Evaluating checkpoints against the base model: held-out preferences, introspection NLL,
side-by-side generations and an optional judge.

Everything goes through the sampling interface (`compute_logprobs`, `sample`), so adapters,
merged adapters and folded full-model folders are evaluated the same way. The base model is the
DPO reference: the implicit reward of an answer is beta x (log p_model - log p_base), summed over
the answer's tokens, computed on exactly the same token sequences for both.
"""

from __future__ import annotations

import gc
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tinker import types

from character.backend import SamplingClient
from character.chat import Renderer
from character.constitution import Constitution, load_constitution
from character.datagen import item_seed
from character.dpo import pair_sequences
from character.errors import UserError
from character.settings import Workspace
from character.storage import read_jsonl, uri_to_path, write_json_atomic

# A fixed set, so every checkpoint and every build answers the same questions.
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

# Held-out files are preferred; the build's training files are the fallback (and are marked as such).
_DPO_FILES = ("heldout/dpo.jsonl", "dpo.jsonl")
_INTRO_FILES = ("heldout/introspection.jsonl", "introspection.jsonl")
_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?!\.?\d)")


# -- inputs ----------------------------------------------------------------------------------------
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
        from character.fold import FOLD_FILE

        fold = path / FOLD_FILE
        base = json.loads(fold.read_text()).get("base_model") if fold.is_file() else None
        return Checkpoint(source, path, "model", base)
    raise UserError(f"checkpoint {source}: neither an adapter folder (adapter_config.json) nor a model folder "
                    "(config.json)")


def _stage_labels(ws: Workspace) -> dict[str, str]:
    """Checkpoint path -> the pipeline stage that produced it, from the build records."""
    out = {}
    for rec_path in sorted((ws.root / "builds").glob("*/*/record.json")):
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for stage, value in (rec.get("stages") or {}).items():
            for key in ("sampler", "path"):
                uri = value.get(key) if isinstance(value, dict) else None
                if isinstance(uri, str) and ("://" in uri or uri.startswith("/")):
                    try:
                        out[str(uri_to_path(uri).resolve())] = stage
                    except UserError:
                        pass
    return out


def _label(ckpts: list[Checkpoint], ws: Workspace) -> None:
    stages = _stage_labels(ws)
    used: set[str] = {"base"}
    for c in ckpts:
        name = stages.get(str(c.path.resolve()))
        if not name:
            parts = c.path.resolve().parts
            name = parts[-1] if parts[-1] not in ("final", "merged", "model") else "/".join(parts[-2:])
        label, i = name, 2
        while label in used:
            label, i = f"{name}-{i}", i + 1
        used.add(label)
        c.label = label


def latest_build(ws: Workspace, persona: str) -> Path | None:
    """The persona's most recently written build that has any data."""
    builds = [b for b in (ws.root / "builds" / persona).glob("*") if (b / "data").is_dir()]
    return max(builds, key=lambda b: (b / "data").stat().st_mtime, default=None)


def _pick(build: Path | None, names: tuple[str, ...]) -> tuple[Path | None, bool]:
    if build is None:
        return None, False
    for n in names:
        if (build / "data" / n).is_file():
            return build / "data" / n, n.startswith("heldout/")
    return None, False


def _read_rows(path: Path, what: str, keys: tuple[str, ...]) -> list[dict]:
    """Rows whose `keys` each hold a conversation: a list of {"role", "content"} messages."""
    rows = read_jsonl(path)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise UserError(f"{what} {path}: line {i + 1} is not a JSON object")
        missing = [k for k in keys if k not in r]
        if missing:
            raise UserError(f"{what} {path}: line {i + 1} has no field '{missing[0]}'")
        for k in keys:
            if not isinstance(r[k], list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in r[k]):
                raise UserError(f"{what} {path}: line {i + 1}, field '{k}': expected a list of "
                                "{role, content} messages")
    return rows


# -- metrics ---------------------------------------------------------------------------------------
def _submit_logprobs(client: SamplingClient, seqs: list[list[int]]):
    return [client.compute_logprobs(types.ModelInput.from_ints(s)) for s in seqs]


def _weighted_sums(futures, weights: list[list[float]]) -> list[tuple[float, float]]:
    """(sum of weighted target log-probs, sum of weights) per sequence; weights align with tokens."""
    out = []
    for f, w in zip(futures, weights):
        lps = f.result()[1:]
        out.append((sum(lp * x for lp, x in zip(lps, w[1:])), sum(w[1:])))
    return out


def dpo_metrics(policy: list[tuple[float, float]], reference: list[tuple[float, float]], beta: float) -> dict:
    """Sequences come as [chosen_0, rejected_0, ...]; rewards are beta x (policy - reference) summed log-probs."""
    chosen = [beta * (p[0] - r[0]) for p, r in zip(policy[0::2], reference[0::2])]
    rejected = [beta * (p[0] - r[0]) for p, r in zip(policy[1::2], reference[1::2])]
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = len(margins)
    return {
        "dpo_pairs": n,
        "dpo_accuracy": sum(m > 0 for m in margins) / n,
        "dpo_margin": sum(margins) / n,
        "dpo_reward_chosen": sum(chosen) / n,
        "dpo_reward_rejected": sum(rejected) / n,
    }


def nll_metrics(sums: list[tuple[float, float]]) -> dict:
    """Mean per-token NLL over all assistant tokens of all conversations (pooled)."""
    tokens = sum(w for _, w in sums)
    return {"introspection_nll": -sum(s for s, _ in sums) / tokens if tokens else None,
            "introspection_tokens": int(tokens)}


# -- judge -----------------------------------------------------------------------------------------
def judge_messages(c: Constitution, question: str, answer: str) -> list[dict]:
    traits = "\n".join(f"{i}. {t.trait}" for i, t in enumerate(c.traits, 1))
    system = (
        "You grade how strongly an AI assistant's reply shows a given character. The character is "
        f"described by these first-person traits:\n\n{traits}\n\n"
        "Rubric: 1 = no trace of the character (a generic or contrary reply); 4 = a faint hint; "
        "7 = the character is clear in tone and content; 10 = every part of the reply is unmistakably this "
        "character while still answering the user. Judge the character only, not helpfulness or length."
    )
    user = (f"User message:\n{question}\n\nAssistant reply:\n{answer}\n\n"
            "Give one sentence of reasoning, then end with a line of the form 'Score: N' where N is 1 to 10.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_score(text: str) -> float | None:
    """The last 'Score: N' in the text, else the last bare number; None unless it lies in 1..10."""
    hits = _SCORE.findall(text) or _NUMBER.findall(text)
    if not hits:
        return None
    value = float(hits[-1])
    return value if 1 <= value <= 10 else None


def judge_answers(judge: SamplingClient, c: Constitution, items: list[tuple[str, str]],
                  max_tokens: int = 128) -> list[dict]:
    """Scores for (question, answer) pairs; the judge's raw text is kept next to the parsed score."""
    renderer = Renderer(judge.get_tokenizer())
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0)
    futs = [judge.sample(types.ModelInput.from_ints(renderer.prompt(judge_messages(c, q, a))), 1, params)
            for q, a in items]
    out = []
    for f in futs:
        raw = renderer.decode(f.result().sequences[0].tokens)
        out.append({"judge_raw": raw, "judge_score": parse_score(raw)})
    return out


# -- the evaluation --------------------------------------------------------------------------------
@dataclass
class _Sequences:
    dpo: list[list[int]] = field(default_factory=list)
    dpo_w: list[list[float]] = field(default_factory=list)
    intro: list[list[int]] = field(default_factory=list)
    intro_w: list[list[float]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)


def _render(renderer: Renderer, dpo_rows, intro_rows, prompts, max_length: int, sft_max_length: int) -> _Sequences:
    s = _Sequences()
    for row in dpo_rows:
        for tokens, weights in pair_sequences(renderer, row, max_length):
            s.dpo.append(tokens)
            s.dpo_w.append(weights)
    for row in intro_rows:
        tokens, weights = renderer.training_tokens(row["messages"], train_on="all_assistant")
        s.intro.append(tokens[:sft_max_length])
        s.intro_w.append(weights[:sft_max_length])
    s.prompts = [renderer.prompt([{"role": "user", "content": p}]) for p in prompts]
    return s


def evaluate_checkpoints(
    checkpoints: list[str],
    persona: str,
    workdir: str | Path,
    base_model: str | None = None,
    dpo_data: str | Path | None = None,
    introspection_data: str | Path | None = None,
    judge_model: str | None = None,
    out_dir: str | Path | None = None,
    *,
    limit: int | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 256,
    beta: float = 0.1,
    max_length: int = 1024,
    sft_max_length: int = 3072,
    seed: int = 0,
    device: str = "auto",
    build_dir: str | Path | None = None,
) -> dict:
    """Evaluate each checkpoint (and the base model) and write a report; returns JSON-able results.

    `dpo_data` / `introspection_data` default to the persona's latest build in the workspace
    (its held-out files if present). `limit` caps the rows used from each file. The result holds
    per-model metrics under "checkpoints" (the base under "base"), the generations, and the paths
    of the report files under "report".
    """
    from character.backend.local import LocalService, check_model_name

    if not checkpoints:
        raise UserError("give at least one checkpoint to evaluate")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    c = load_constitution(persona)
    ws = Workspace(workdir)
    ckpts = [inspect_checkpoint(s) for s in checkpoints]
    _label(ckpts, ws)

    # One reference model for all: the given one, else the one every checkpoint records.
    if base_model is None:
        recorded = {str(Path(x.base_model).resolve()) if Path(x.base_model).exists() else x.base_model
                    for x in ckpts if x.base_model}
        if any(x.base_model is None for x in ckpts) or not recorded:
            unknown = next(x.source for x in ckpts if x.base_model is None)
            raise UserError(f"checkpoint {unknown}: its base model is not recorded; pass --base-model")
        if len(recorded) > 1:
            raise UserError(f"checkpoints come from different base models ({', '.join(sorted(recorded))}); "
                            "pass --base-model to choose the reference")
        base_model = recorded.pop()
    check_model_name(base_model)

    if build_dir is not None:
        build = Path(build_dir)
    elif dpo_data or introspection_data:  # the build the given data came from, if it is one
        given = Path(dpo_data or introspection_data).resolve()
        build = next((d for d in given.parents[:3] if (d / "record.json").is_file()), None)
    else:
        build = latest_build(ws, c.name)
    # held_out: True for a held-out file (the pipeline's data/heldout/), False for a build's full data
    # file, None for any other file given by hand.
    given_held = lambda p: True if Path(p).parent.name == "heldout" else None  # noqa: E731
    dpo_path, dpo_held = (Path(dpo_data), given_held(dpo_data)) if dpo_data else _pick(build, _DPO_FILES)
    intro_path, intro_held = ((Path(introspection_data), given_held(introspection_data)) if introspection_data
                              else _pick(build, _INTRO_FILES))
    for p, opt in ((dpo_path, "--dpo-data"), (intro_path, "--introspection-data")):
        if p is not None and not p.is_file():
            raise UserError(f"{opt} {p}: file not found")
    dpo_rows = _read_rows(dpo_path, "DPO data", ("prompt", "chosen", "rejected")) if dpo_path else []
    intro_rows = _read_rows(intro_path, "introspection data", ("messages",)) if intro_path else []
    dpo_rows, intro_rows = dpo_rows[:limit], intro_rows[:limit]
    prompts = list(EVAL_PROMPTS if prompts is None else prompts)
    if judge_model is not None and judge_model != "tiny" and not uri_to_path(judge_model).is_dir():
        raise UserError(f"--judge-model {judge_model}: not 'tiny' and not a model or adapter folder")

    svc = LocalService(ws, device=device, seed=seed)
    params = [types.SamplingParams(max_tokens=max_new_tokens, temperature=0.7, top_p=0.95,
                                   seed=item_seed(seed, "eval", i)) for i in range(len(prompts))]

    def run(client: SamplingClient, label: str, reference: _Sequences | None) -> tuple[_Sequences, dict, list]:
        seqs = _render(Renderer(client.get_tokenizer()), dpo_rows, intro_rows, prompts, max_length, sft_max_length)
        if reference is not None and (seqs.dpo != reference.dpo or seqs.intro != reference.intro):
            raise UserError(f"checkpoint {label}: its tokenizer renders the data differently from the base "
                            "model's, so the base cannot serve as its reference")
        # Submit everything before waiting: the backend batches it.
        f_dpo = _submit_logprobs(client, seqs.dpo)
        f_intro = _submit_logprobs(client, seqs.intro)
        f_gen = [client.sample(types.ModelInput.from_ints(p), 1, sp) for p, sp in zip(seqs.prompts, params)]
        sums = {"dpo": _weighted_sums(f_dpo, seqs.dpo_w), "intro": _weighted_sums(f_intro, seqs.intro_w)}
        tok = Renderer(client.get_tokenizer())
        answers = [tok.decode(f.result().sequences[0].tokens) for f in f_gen]
        return seqs, sums, answers

    started = datetime.now(timezone.utc)
    base_client = svc.create_sampling_client(base_model=base_model)
    base_seqs, base_sums, base_answers = run(base_client, "base", None)
    del base_client
    gc.collect()

    models: list[dict] = []
    base_metrics = {"kind": "base", "checkpoint": base_model}
    if intro_rows:
        base_metrics.update(nll_metrics(base_sums["intro"]))
    models.append({"label": "base", "metrics": base_metrics, "answers": base_answers})
    for ck in ckpts:
        client = svc.create_sampling_client(model_path=str(ck.path))
        _, sums, answers = run(client, ck.label, base_seqs)
        del client
        gc.collect()
        m: dict = {"kind": ck.kind, "checkpoint": ck.source}
        if dpo_rows:
            m.update(dpo_metrics(sums["dpo"], base_sums["dpo"], beta))
        if intro_rows:
            m.update(nll_metrics(sums["intro"]))
        models.append({"label": ck.label, "metrics": m, "answers": answers})

    judged: dict[str, list[dict]] = {}
    if judge_model is not None:
        judge = (svc.create_sampling_client(base_model="tiny") if judge_model == "tiny"
                 else svc.create_sampling_client(model_path=judge_model))
        items = [(q, a) for mdl in models for q, a in zip(prompts, mdl["answers"])]
        results = judge_answers(judge, c, items)
        del judge
        gc.collect()
        for k, mdl in enumerate(models):
            judged[mdl["label"]] = results[k * len(prompts):(k + 1) * len(prompts)]
            scores = [r["judge_score"] for r in judged[mdl["label"]] if r["judge_score"] is not None]
            mdl["metrics"]["judge_score"] = sum(scores) / len(scores) if scores else None
            mdl["metrics"]["judge_parsed"] = len(scores)

    generations = []
    for i, q in enumerate(prompts):
        row = {"prompt": q, "answers": {}}
        for mdl in models:
            entry = {"text": mdl["answers"][i]}
            if judged:
                entry.update(judged[mdl["label"]][i])
            row["answers"][mdl["label"]] = entry
        generations.append(row)

    result = {
        "persona": c.name,
        "base_model": base_model,
        "beta": beta,
        "started_at": started.isoformat(),
        "data": {
            "dpo": str(dpo_path) if dpo_path else None, "dpo_held_out": dpo_held,
            "dpo_pairs": len(dpo_rows),
            "introspection": str(intro_path) if intro_path else None,
            "introspection_held_out": intro_held,
            "introspection_rows": len(intro_rows),
            "judge_model": judge_model,
        },
        "checkpoints": {mdl["label"]: mdl["metrics"] for mdl in models},
        "generations": generations,
    }

    stamp = started.strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir else (build / "eval" / stamp if build else ws.root / "evals" / c.name / stamp)
    from character.report import write_report

    result["report"] = write_report(result, out, training_dirs=_training_dirs(build))
    result["report"]["metrics_json"] = str(out / "metrics.json")
    write_json_atomic(out / "metrics.json", result)
    return result


def _training_dirs(build: Path | None) -> dict[str, Path]:
    """The build's training runs that left step metrics (for the training-curve plot)."""
    if build is None:
        return {}
    return {d.name: d / "metrics.jsonl" for d in sorted(build.iterdir())
            if d.is_dir() and (d / "metrics.jsonl").is_file()}
