"""Evaluating checkpoints against the base model: persona adherence, held-out preferences,
introspection NLL, side-by-side generations and an optional judge.

`evaluate_models` reaches every model only through a service's sampling clients (`sample`,
`compute_logprobs`, `get_tokenizer`), so adapters, merged adapters, folded model folders and remote
checkpoints are evaluated the same way. The base model is the DPO reference: the implicit reward of
an answer is beta x (log p_model - log p_base), summed over the answer's tokens, computed on exactly
the same token sequences for both. `evaluate_checkpoints` is the local entry point: it finds the
checkpoints' folders, build and data (character.evaluation.inputs) and runs on a LocalService.
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from tinker import types

from character.backend import SamplingClient
from character.config import check_local_model
from character.datagen.engine import item_seed
from character.errors import UserError
from character.evaluation.metrics import (
    ClassifierReport,
    break_character_messages,
    fit_persona_classifier,
    in_persona_rate,
    model_summary,
)
from character.evaluation.revealed import (
    TRAITS,
    Offers,
    constitution_traits,
    embodied_answers,
    judge_games,
    make_offers,
    rating_changes,
)
from character.persona.constitution import Constitution, load_constitution
from character.settings import Workspace
from character.storage import write_json_atomic
from character.train.dpo import pair_sequences
from character.train.renderer import Renderer

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
# Below this held-out accuracy, or n, the classifier's verdicts are flagged as unreliable.
TRUSTED_ACCURACY, TRUSTED_N = 0.8, 20

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?!\.?\d)")


# -- inputs ----------------------------------------------------------------------------------------
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
    if n == 0:
        return {"dpo_pairs": 0}
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
    return {
        "introspection_nll": -sum(s for s, _ in sums) / tokens if tokens else None,
        "introspection_tokens": int(tokens),
    }


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
    user = (
        f"User message:\n{question}\n\nAssistant reply:\n{answer}\n\n"
        "Give one sentence of reasoning, then end with a line of the form 'Score: N' where N is 1 to 10."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_score(text: str) -> float | None:
    """The last 'Score: N' in the text, else the last bare number; None unless it lies in 1..10."""
    hits = _SCORE.findall(text) or _NUMBER.findall(text)
    if not hits:
        return None
    value = float(hits[-1])
    return value if 1 <= value <= 10 else None


def judge_answers(
    judge: SamplingClient, c: Constitution, items: list[tuple[str, str]], max_tokens: int = 128
) -> list[dict]:
    """Scores for (question, answer) pairs; the judge's raw text is kept next to the parsed score."""
    renderer = Renderer(judge.get_tokenizer())
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0)
    futs = [
        judge.sample(types.ModelInput.from_ints(renderer.prompt(judge_messages(c, q, a))), 1, params) for q, a in items
    ]
    out = []
    for f in futs:
        raw = renderer.decode(f.result().sequences[0].tokens)
        out.append({"judge_raw": raw, "judge_score": parse_score(raw)})
    return out


# -- the evaluation (any service) ------------------------------------------------------------------
@dataclass
class _Sequences:
    dpo: list[list[int]] = field(default_factory=list)
    dpo_w: list[list[float]] = field(default_factory=list)
    intro: list[list[int]] = field(default_factory=list)
    intro_w: list[list[float]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    robust: list[list[int]] = field(default_factory=list)


def _render(renderer: Renderer, data: EvalData, max_length: int, sft_max_length: int) -> _Sequences:
    s = _Sequences()
    for row in data.heldout:
        for tokens, weights in pair_sequences(renderer, row, max_length):
            s.dpo.append(tokens)
            s.dpo_w.append(weights)
    for row in data.intro:
        tokens, weights = renderer.training_tokens(row["messages"], train_on="all_assistant")
        s.intro.append(tokens[:sft_max_length])
        s.intro_w.append(weights[:sft_max_length])
    s.prompts = [renderer.prompt([{"role": "user", "content": p}]) for p in data.prompts]
    s.robust = [renderer.prompt(break_character_messages(p, i)) for i, p in enumerate(data.prompts)]
    return s


def _run_model(
    client: SamplingClient,
    label: str,
    data: EvalData,
    reference: _Sequences | None,
    max_new_tokens: int,
    seed: int,
    max_length: int,
    sft_max_length: int,
    offers: Offers | None = None,
):
    renderer = Renderer(client.get_tokenizer())
    seqs = _render(renderer, data, max_length, sft_max_length)
    if reference is not None and (seqs.dpo != reference.dpo or seqs.intro != reference.intro):
        raise UserError(
            f"checkpoint {label}: its tokenizer renders the data differently from the base "
            "model's, so the base cannot serve as its reference"
        )

    def params(kind: str, i: int) -> types.SamplingParams:  # the same seeds for every model
        return types.SamplingParams(
            max_tokens=max_new_tokens, temperature=0.7, top_p=0.95, seed=item_seed(seed, kind, i)
        )

    # Submit everything before waiting: the backend batches it.
    f_dpo = _submit_logprobs(client, seqs.dpo)
    f_intro = _submit_logprobs(client, seqs.intro)
    f_plain = [client.sample(types.ModelInput.from_ints(p), 1, params("eval", i)) for i, p in enumerate(seqs.prompts)]
    f_robust = [
        client.sample(types.ModelInput.from_ints(p), 1, params("eval-robust", i)) for i, p in enumerate(seqs.robust)
    ]
    # Revealed preferences: answers while offered two traits (judged later, once this model is dropped).
    embodied = embodied_answers(client, offers, seed, max_new_tokens) if offers is not None else None
    sums = {"dpo": _weighted_sums(f_dpo, seqs.dpo_w), "intro": _weighted_sums(f_intro, seqs.intro_w)}
    plain = [renderer.decode(list(f.result().sequences[0].tokens)) for f in f_plain]
    robust = [renderer.decode(list(f.result().sequences[0].tokens)) for f in f_robust]
    return seqs, sums, plain, robust, embodied


def _classifier_notes(rep: ClassifierReport) -> list[str]:
    if rep.heldout_accuracy is None:
        return [f"persona classifier accuracy unknown: {rep.note}"]
    if rep.heldout_accuracy < TRUSTED_ACCURACY or rep.n < TRUSTED_N:
        return [
            f"persona classifier is weak evidence: held-out accuracy {rep.heldout_accuracy:.3f} on "
            f"n={rep.n} answers (trusted from {TRUSTED_ACCURACY} on n>={TRUSTED_N})"
        ]
    return []


def evaluate_models(
    service,
    base_model: str,
    checkpoints: dict[str, str],
    constitution: Constitution,
    data: EvalData,
    *,
    classifier_path: str | Path | None = None,
    judge: Callable[[], SamplingClient] | None = None,
    judge_name: str | None = None,
    revealed_judge: Callable[[], SamplingClient] | None = None,
    revealed_judge_name: str | None = None,
    revealed_games: int = 200,
    max_new_tokens: int = 256,
    beta: float = 0.1,
    max_length: int = 1024,
    sft_max_length: int = 3072,
    seed: int = 0,
) -> dict:
    """Evaluate the base model and each named checkpoint; returns JSON-able results (nothing written).

    `service.create_sampling_client(base_model=...)` gives the reference, `model_path=<uri>` each
    checkpoint; one model is held at a time. `judge`, if given, makes the judge's sampling client.
    The result's "eval" holds the per-model summaries users see (character.evaluation.metrics.SUMMARY_KEYS).
    `revealed_judge`, if given, makes the client of the judge of the revealed-preference games
    (`revealed_games` per model, on the evaluation's prompts); the result's "revealed" holds the Elo
    ratings per model and trait, or, when it was not run, the reason.
    """
    started = datetime.now(timezone.utc)
    clf, clf_rep = fit_persona_classifier(
        data.train, [] if data.pairs_are_training_data else data.heldout, classifier_path, seed
    )
    if clf is not None and data.pairs_are_training_data and data.heldout:
        clf_rep.note = "the only pairs given are its training data"

    offers, revealed_skip = None, None
    if revealed_judge is None:
        revealed_skip = (
            "no judge model is configured for it: set --revealed-judge or CHARACTER_REVEALED_JUDGE "
            "(a model Tinker serves, a tinker:// path or a local model folder)"
        )
    elif not data.prompts:
        revealed_skip = "no prompts to answer"
    else:
        per_prompt = -(-revealed_games // len(data.prompts))
        offers = make_offers(data.prompts, TRAITS, seed, per_prompt)
        offers = Offers(offers.prompts[:revealed_games], offers.pairs[:revealed_games])

    models: list[dict] = []
    base_client = service.create_sampling_client(base_model=base_model)
    base_seqs, base_sums, plain, robust, embodied = _run_model(
        base_client, "base", data, None, max_new_tokens, seed, max_length, sft_max_length, offers
    )
    del base_client
    gc.collect()
    models.append(
        {
            "label": "base",
            "metrics": {"checkpoint": base_model},
            "sums": base_sums,
            "plain": plain,
            "robust": robust,
            "embodied": embodied,
        }
    )
    by_uri: dict[str, dict] = {}
    for label, uri in checkpoints.items():
        if uri in by_uri:  # the same weights under two names (sequential mode: sft = final)
            models.append({**by_uri[uri], "label": label, "metrics": {**by_uri[uri]["metrics"]}})
            continue
        client = service.create_sampling_client(model_path=uri)
        _, sums, plain, robust, embodied = _run_model(
            client, label, data, base_seqs, max_new_tokens, seed, max_length, sft_max_length, offers
        )
        del client
        gc.collect()
        by_uri[uri] = {
            "label": label,
            "metrics": {"checkpoint": uri},
            "sums": sums,
            "plain": plain,
            "robust": robust,
            "embodied": embodied,
        }
        models.append(by_uri[uri])

    # Scores: the classifier on every answer, preference metrics against the base.
    common = list(data.notes) + _classifier_notes(clf_rep)
    summary: dict = {}
    for mdl in models:
        m, notes = mdl["metrics"], list(common)
        probs = clf.predict_proba(mdl["plain"]) if clf else []
        r_probs = clf.predict_proba(mdl["robust"]) if clf else []
        mdl["p_plain"], mdl["p_robust"] = probs, r_probs
        if clf is None:
            notes.append(f"in-persona rates not computed: {clf_rep.note}")
        elif not data.prompts:
            notes.append("in-persona rates not computed: no prompts")
        if data.intro:
            m.update(nll_metrics(mdl["sums"]["intro"]))
        pref = None
        if mdl["label"] == "base":
            notes.append(
                "no preference metrics: the base is the reference, so its implied reward margin is 0 by definition"
            )
        elif not data.heldout:
            notes.append("preference metrics not computed: no held-out preference pairs")
        else:
            pref = dpo_metrics(mdl["sums"]["dpo"], base_sums["dpo"], beta)
            m.update(pref)
            if data.pairs_are_training_data:
                notes.append("preference pairs are training data, not held out: accuracy is optimistic")
        m.update({"in_persona_rate": in_persona_rate(probs)[0], "robust_in_persona_rate": in_persona_rate(r_probs)[0]})
        summary[mdl["label"]] = model_summary(
            in_persona_rate(probs) if clf else None, in_persona_rate(r_probs) if clf else None, pref, notes
        )

    judged = _judge(judge, constitution, data.prompts, models) if judge is not None else {}
    if offers is not None:
        revealed = _revealed(revealed_judge, revealed_judge_name, constitution, offers, models, seed)
    else:
        revealed = {"status": "skipped", "reason": revealed_skip, "judge_model": revealed_judge_name}
    generations = []
    for i, q in enumerate(data.prompts):
        row = {"prompt": q, "attack": break_character_messages(q, i), "answers": {}, "robust": {}}
        for mdl in models:
            entry = {"text": mdl["plain"][i], "in_persona_p": mdl["p_plain"][i] if mdl["p_plain"] else None}
            if judged:
                entry.update(judged[mdl["label"]][i])
            row["answers"][mdl["label"]] = entry
            row["robust"][mdl["label"]] = {
                "text": mdl["robust"][i],
                "in_persona_p": mdl["p_robust"][i] if mdl["p_robust"] else None,
            }
        generations.append(row)

    return {
        "persona": constitution.name,
        "base_model": base_model,
        "beta": beta,
        "started_at": started.isoformat(),
        "data": {
            **data.sources,
            "dpo_pairs": len(data.heldout),
            "train_pairs": len(data.train),
            "introspection_rows": len(data.intro),
            "prompts": len(data.prompts),
            "judge_model": judge_name,
        },
        "classifier": {
            "kind": clf_rep.kind,
            "train_n": clf_rep.train_n,
            "heldout_accuracy": clf_rep.heldout_accuracy,
            "n": clf_rep.n,
            "note": clf_rep.note,
        },
        "checkpoints": {mdl["label"]: mdl["metrics"] for mdl in models},
        "eval": {**summary, "classifier": {"heldout_accuracy": clf_rep.heldout_accuracy, "n": clf_rep.n}},
        "generations": generations,
        "revealed": revealed,
    }


def _revealed(
    make_judge: Callable[[], SamplingClient],
    judge_name: str | None,
    c: Constitution,
    offers: Offers,
    models: list[dict],
    seed: int,
) -> dict:
    """Judge every model's revealed-preference games; Elo per trait and model, and each trait's change from
    the base. "final" is the checkpoint labelled so, else the last one evaluated."""
    client = make_judge()
    per_model: dict[str, dict] = {}
    done: dict[int, dict] = {}  # the same weights under two names are judged once
    for mdl in models:
        key = id(mdl["embodied"])
        if key not in done:
            done[key] = judge_games(client, offers, mdl["embodied"], TRAITS, seed)
        per_model[mdl["label"]] = done[key]
    del client
    gc.collect()
    labels = [m["label"] for m in models]
    final = "final" if "final" in labels else labels[-1]
    return {
        "status": "computed",
        "judge_model": judge_name,
        "games_per_model": len(offers.prompts),
        "traits": len(TRAITS),
        "constitution_traits": constitution_traits([t.trait for t in c.traits]),
        "final": final if final != "base" else None,
        "models": per_model,
        "changes": {lb: rating_changes(per_model["base"], per_model[lb]) for lb in labels if lb != "base"},
    }


def _judge(judge: Callable[[], SamplingClient], c: Constitution, prompts: list[str], models: list[dict]) -> dict:
    client = judge()
    items = [(q, a) for mdl in models for q, a in zip(prompts, mdl["plain"])]
    results = judge_answers(client, c, items)
    del client
    gc.collect()
    judged = {}
    for k, mdl in enumerate(models):
        judged[mdl["label"]] = results[k * len(prompts) : (k + 1) * len(prompts)]
        scores = [r["judge_score"] for r in judged[mdl["label"]] if r["judge_score"] is not None]
        mdl["metrics"]["judge_score"] = sum(scores) / len(scores) if scores else None
        mdl["metrics"]["judge_parsed"] = len(scores)
        mdl["metrics"]["judge_n"] = len(prompts)
    return judged


def write_outputs(result: dict, out: Path, training_dirs: dict[str, Path] | None = None) -> dict:
    """report.md (+ report.html, plots) and metrics.json in `out`; `result` gains their paths."""
    from character.evaluation.report import write_report

    out = Path(out)
    result["report"] = write_report(result, out, training_dirs=training_dirs)
    result["report"]["metrics_json"] = str(out / "metrics.json")
    result["eval"]["report"] = result["report"]["markdown"]
    write_json_atomic(out / "metrics.json", result)
    return result


# -- the local entry point -------------------------------------------------------------------------
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
    train_data: str | Path | None = None,
    classifier: str | Path | None = None,
    names: list[str] | None = None,
    limit: int | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 256,
    beta: float = 0.1,
    max_length: int = 1024,
    sft_max_length: int = 3072,
    seed: int = 0,
    device: str = "auto",
    build_dir: str | Path | None = None,
    service=None,
    revealed_judge: str | None = None,
    revealed_games: int = 200,
    notes: list[str] | None = None,
) -> dict:
    """Evaluate checkpoints (and the base model) and write a report; returns the results.

    Checkpoints are local folders (run on a LocalService) or all `tinker://` paths (run remotely on a
    TinkerService: nothing is downloaded). `judge_model` and `revealed_judge` name the 1-10 judge and
    the revealed-preference judge (character.evaluation.models.model_side: here or on Tinker); without a
    revealed judge that evaluation is skipped and the result says why. `notes` go into the report.

    The data defaults to the build whose record lists the checkpoints (`build_dir` names it
    outright): its held-out pairs for preference metrics and prompts, its training pairs for the
    persona classifier, its held-out introspection for NLL. `limit` caps the rows used from each
    file; `names` labels the checkpoints (default: the stage that produced each). The report goes
    into `out_dir`, else `<build>/eval/<time>`, else `<workdir>/evals/<persona>/<time>`.
    """
    from character.evaluation.inputs import (
        Checkpoint,
        build_files,
        build_of,
        inspect_checkpoint,
        label_checkpoints,
        recorded_base_model,
        training_curves,
    )
    from character.evaluation.models import Services, checkpoints_side, model_side

    if not checkpoints:
        raise UserError("give at least one checkpoint to evaluate")
    if names is not None and len(names) != len(checkpoints):
        raise UserError("give one name per checkpoint")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    c = load_constitution(persona)
    ws = Workspace(workdir)
    side = checkpoints_side(checkpoints)
    if side == "tinker":
        from character.backend.tinker import parse_checkpoint_path

        for s in checkpoints:
            parse_checkpoint_path(s, "any", "evaluation")  # a malformed path fails before anything runs
        ckpts = [Checkpoint(s, Path(s.removeprefix("tinker://")), "tinker", None) for s in checkpoints]
    else:
        ckpts = [inspect_checkpoint(s) for s in checkpoints]
        base_model = base_model or recorded_base_model(ckpts)
        check_local_model(base_model)
    if classifier is not None and not (Path(classifier) / "config.json").is_file():
        raise UserError(f"--classifier {classifier}: not a local Hugging Face model folder (no config.json)")
    for spec, opt in ((judge_model, "--judge-model"), (revealed_judge, "--revealed-judge")):
        if spec is not None:
            model_side(spec, opt)
    for p, opt in (
        (dpo_data, "--dpo-data"),
        (introspection_data, "--introspection-data"),
        (train_data, "--train-data"),
    ):
        if p is not None and not Path(p).is_file():
            raise UserError(f"{opt} {p}: file not found")

    # The build: named, else the one whose record lists the checkpoints, else the one the given data is in.
    build, stages, found_notes = build_of(ws, [x.source for x in ckpts])
    if build_dir is not None:
        build = Path(build_dir)
    elif build is None and (dpo_data or introspection_data):
        given = Path(dpo_data or introspection_data).resolve()
        build = next((d for d in given.parents[:3] if (d / "record.json").is_file()), None)
    elif build is None:
        found_notes.append(
            f"no build in {ws.root} lists these checkpoints: give --dpo-data and --train-data "
            "for preference and persona metrics"
        )
    label_checkpoints(ckpts, stages, names)

    files = build_files(build)
    held_flag = lambda p: True if Path(p).parent.name == "heldout" else None  # noqa: E731
    if dpo_data:
        files.heldout, files.heldout_held = Path(dpo_data), held_flag(dpo_data)
    if introspection_data:
        files.intro, files.intro_held = Path(introspection_data), held_flag(introspection_data)
    if train_data:
        files.train = Path(train_data)
    data = load_data(files, limit, prompts)
    data.notes = list(notes or []) + found_notes + data.notes

    if service is None and side == "tinker":
        from character.evaluation.models import tinker_service

        service = tinker_service()
    elif service is None:
        from character.backend.local import LocalService

        service = LocalService(ws, device=device, seed=seed)
    services = Services(service, side, ws, device=device, seed=seed)
    judge = services.judge(judge_model, "--judge-model") if judge_model is not None else None
    revealed = services.judge(revealed_judge, "--revealed-judge") if revealed_judge is not None else None
    if side == "tinker" and base_model is None:
        base_model = _remote_base(service, build, ckpts)
    uris = {x.label: x.source if side == "tinker" else str(x.path) for x in ckpts}
    result = evaluate_models(
        service,
        base_model,
        uris,
        c,
        data,
        classifier_path=classifier,
        judge=judge,
        judge_name=judge_model,
        revealed_judge=revealed,
        revealed_judge_name=revealed_judge,
        revealed_games=revealed_games,
        max_new_tokens=max_new_tokens,
        beta=beta,
        max_length=max_length,
        sft_max_length=sft_max_length,
        seed=seed,
    )
    for x in ckpts:
        result["checkpoints"][x.label] = {"kind": x.kind, **result["checkpoints"][x.label], "checkpoint": x.source}
    result["checkpoints"]["base"]["kind"] = "base"
    result["build"] = str(build) if build else None

    stamp = datetime.fromisoformat(result["started_at"]).strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir else (build / "eval" / stamp if build else ws.root / "evals" / c.name / stamp)
    return write_outputs(result, out, training_dirs=training_curves(build))


def _remote_base(service, build: Path | None, ckpts) -> str:
    """The base model of tinker:// checkpoints: their build's, else what Tinker records for the first."""
    import json

    rec = build / "record.json" if build else None
    if rec is not None and rec.is_file():
        name = (json.loads(rec.read_text()).get("config") or {}).get("base_model")
        if name:
            return name
    from character.evaluation.models import remote_base_model

    return remote_base_model(service, ckpts[0].source)


def load_data(files, limit: int | None = None, prompts: list[str] | None = None) -> EvalData:
    """The rows of an evaluation from its files (character.evaluation.inputs.DataFiles; for a build's own
    files, `build_files(build_dir)`); `limit` caps the held-out and introspection rows."""
    from character.evaluation.inputs import read_rows

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
