"""One evaluation of a base model and its checkpoints, on any service: persona adherence, held-out
preferences, introspection NLL, side-by-side generations, an optional judge and revealed preferences;
and the sections of character.evaluation.sections: the prompted baseline (the base model with the
constitution in its system prompt, sampled here with the base's client), multi-turn prefill robustness,
the capability probe and coherence.

`evaluate_models` reaches every model only through a service's sampling clients (`sample`,
`compute_logprobs`, `get_tokenizer`), so adapters, merged adapters, folded model folders and remote
checkpoints are evaluated the same way. The base model is the DPO reference (character.evaluation.logprobs).
One model is held at a time: each is sampled, its outputs kept as a ModelRun, and dropped; scoring and
the judges come after.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from tinker import types

from character.backend import SamplingClient
from character.backend.retry import Call
from character.datagen.engine import item_seed
from character.errors import UserError
from character.evaluation.capability import render_choices, score_choices
from character.evaluation.data import EvalData
from character.evaluation.judges import judge_revealed, score_answers
from character.evaluation.logprobs import (
    Sequences,
    dpo_metrics,
    nll_metrics,
    render_sequences,
    submit_logprobs,
    weighted_sums,
)
from character.evaluation.metrics import (
    ClassifierReport,
    break_character_messages,
    fit_persona_classifier,
    in_persona_rate,
    model_summary,
)
from character.evaluation.multiturn import follow_up, prefill_messages
from character.evaluation.revealed import TRAITS, Offers, embodied_answers, make_offers
from character.evaluation.sections import Sections, capability_section, coherence_section, section_notes
from character.evaluation.specificity import prepare_specificity, specificity
from character.persona.constitution import Constitution
from character.train.families import renderer_for
from character.train.renderer import Renderer

# Below this held-out accuracy, or n, the classifier's verdicts are flagged as unreliable.
TRUSTED_ACCURACY, TRUSTED_N = 0.8, 20


@dataclass(frozen=True)
class Sampling:
    """How every model is sampled and its data cut: the same for all, so their answers compare."""

    max_new_tokens: int
    seed: int
    max_length: int
    sft_max_length: int

    def params(self, kind: str, i: int, stop: list[int]) -> types.SamplingParams:  # the same seeds for every model
        return types.SamplingParams(
            max_tokens=self.max_new_tokens, temperature=0.7, top_p=0.95, seed=item_seed(self.seed, kind, i), stop=stop
        )


@dataclass
class ModelRun:
    """One model's outputs, kept once the model is dropped: log-prob sums, answers (plain, under a
    break-character instruction, after the base's first answer), revealed-preference answers, the
    capability probe's scores; the classifier's verdicts come later."""

    label: str
    metrics: dict
    sums: dict
    plain: list[str]
    robust: list[str]
    embodied: object = None
    prefill: list[str] = field(default_factory=list)
    capability: dict | None = None
    p_plain: list = field(default_factory=list)
    p_robust: list = field(default_factory=list)
    p_prefill: list = field(default_factory=list)


# -- sampling --------------------------------------------------------------------------------------
def _texts(renderer: Renderer, futures) -> list[str]:
    return [renderer.decode(list(f.result().sequences[0].tokens)) for f in futures]


def _submit_samples(client: SamplingClient, prompts: list[list[int]], params: list[types.SamplingParams]) -> list[Call]:
    """One answer per prompt, submitted now; a request that fails transiently is made again alone (its
    params are seeded: the same answer comes back)."""
    return [
        Call(lambda p=p, sp=sp: client.sample(types.ModelInput.from_ints(p), 1, sp)) for p, sp in zip(prompts, params)
    ]


def _submit_prefill(client, renderer, prompts: list[str], first: list[str], system: str | None, sampling: Sampling):
    """The second turn after the base's first answers (character.evaluation.multiturn)."""
    return _submit_samples(
        client,
        [renderer.prompt(prefill_messages(q, first[i], i, system)) for i, q in enumerate(prompts)],
        [sampling.params("eval-prefill", i, renderer.stop_tokens) for i in range(len(prompts))],
    )


def _run_model(
    client: SamplingClient,
    label: str,
    checkpoint: str,
    data: EvalData,
    reference: Sequences | None,
    sampling: Sampling,
    offers: Offers | None = None,
    base_model: str | None = None,
    *,
    sections: Sections,
    system: str | None = None,
    first: list[str] | None = None,
) -> tuple[Sequences, ModelRun]:
    """One model's samples and log-probs. `system`: the prompted baseline's; `first`: the base's first
    answers for the prefill turn (None: this is the base, whose own plain answers are the first)."""
    renderer = renderer_for(client.get_tokenizer(), base_model)  # checkpoints render as their base does
    seqs = render_sequences(renderer, data, sampling.max_length, sampling.sft_max_length, system)
    if reference is not None and (seqs.dpo != reference.dpo or seqs.intro != reference.intro):
        raise UserError(
            f"checkpoint {label}: its tokenizer renders the data differently from the base "
            "model's, so the base cannot serve as its reference"
        )
    # Submit everything before waiting: the backend batches it.
    f_dpo = submit_logprobs(client, seqs.dpo)
    f_intro = submit_logprobs(client, seqs.intro)
    stops = renderer.stop_tokens
    f_plain = _submit_samples(
        client, seqs.prompts, [sampling.params("eval", i, stops) for i in range(len(seqs.prompts))]
    )
    f_robust = _submit_samples(
        client, seqs.robust, [sampling.params("eval-robust", i, stops) for i in range(len(seqs.robust))]
    )
    prefill_now = sections.prefill and first is not None
    f_prefill = _submit_prefill(client, renderer, data.prompts, first, system, sampling) if prefill_now else []
    cap = sections.capability
    cap_seqs = render_choices(renderer, cap, system) if cap else ([], [])
    f_cap = submit_logprobs(client, cap_seqs[0])
    # Revealed preferences: answers while offered two traits (judged later, once this model is dropped).
    embodied = embodied_answers(client, offers, sampling.seed, sampling.max_new_tokens) if offers is not None else None
    sums = {"dpo": weighted_sums(f_dpo, seqs.dpo_w), "intro": weighted_sums(f_intro, seqs.intro_w)}
    plain, robust = _texts(renderer, f_plain), _texts(renderer, f_robust)
    if sections.prefill and first is None:  # the base: its first answers are the plain ones just sampled
        f_prefill = _submit_prefill(client, renderer, data.prompts, plain, system, sampling)
    capability = score_choices(cap, weighted_sums(f_cap, cap_seqs[1])) if cap else None
    run = ModelRun(
        label, {"checkpoint": checkpoint}, sums, plain, robust, embodied, _texts(renderer, f_prefill), capability
    )
    return seqs, run


def _sample_models(
    service,
    base_model: str,
    checkpoints: dict[str, str],
    data: EvalData,
    offers: Offers | None,
    sampling: Sampling,
    sections: Sections,
) -> list[ModelRun]:
    """The base model (and with the same client the prompted baseline), then each checkpoint, one held at
    a time; weights named twice are sampled once."""
    client = service.create_sampling_client(base_model=base_model)
    base_seqs, base = _run_model(
        client, "base", base_model, data, None, sampling, offers, base_model, sections=sections
    )
    models = [base]
    if sections.prompted_system:
        _, prompted = _run_model(
            client, "prompted", base_model, data, None, sampling, None, base_model, sections=sections,
            system=sections.prompted_system, first=base.plain,
        )  # fmt: skip
        prompted.metrics["kind"] = "prompted"
        models.append(prompted)
    del client
    gc.collect()
    by_uri: dict[str, ModelRun] = {}
    for label, uri in checkpoints.items():
        if uri in by_uri:  # the same weights under two names (sequential mode: sft = final)
            models.append(replace(by_uri[uri], label=label, metrics=dict(by_uri[uri].metrics)))
            continue
        client = service.create_sampling_client(model_path=uri)
        _, by_uri[uri] = _run_model(
            client, label, uri, data, base_seqs, sampling, offers, base_model, sections=sections, first=base.plain
        )
        del client
        gc.collect()
        models.append(by_uri[uri])
    return models


def _revealed_offers(
    revealed_judge: Callable | None, data: EvalData, games: int, seed: int
) -> tuple[Offers | None, str | None]:
    """The trait pairs offered in the revealed-preference games (the same for every model), or why none."""
    if revealed_judge is None:
        return None, (
            "no judge model is configured for it: set --revealed-judge or CHARACTER_REVEALED_JUDGE "
            "(a model Tinker serves, a tinker:// path or a local model folder)"
        )
    if not data.prompts:
        return None, "no prompts to answer"
    per_prompt = -(-games // len(data.prompts))
    offers = make_offers(data.prompts, TRAITS, seed, per_prompt)
    return Offers(offers.prompts[:games], offers.pairs[:games]), None


# -- scoring ---------------------------------------------------------------------------------------
def _classifier(data: EvalData, classifier_path: str | Path | None, seed: int):
    clf, rep = fit_persona_classifier(
        data.train, [] if data.pairs_are_training_data else data.heldout, classifier_path, seed
    )
    if clf is not None and data.pairs_are_training_data and data.heldout:
        rep.note = "the only pairs given are its training data"
    return clf, rep


def _classifier_notes(rep: ClassifierReport) -> list[str]:
    if rep.heldout_accuracy is None:
        return [f"persona classifier accuracy unknown: {rep.note}"]
    if rep.heldout_accuracy < TRUSTED_ACCURACY or rep.n < TRUSTED_N:
        return [
            f"persona classifier is weak evidence: held-out accuracy {rep.heldout_accuracy:.3f} on "
            f"n={rep.n} answers (trusted from {TRUSTED_ACCURACY} on n>={TRUSTED_N})"
        ]
    return []


def _score_model(
    mdl: ModelRun,
    data: EvalData,
    clf,
    clf_rep: ClassifierReport,
    base_dpo: list,
    beta: float,
    notes: list[str],
    spec: tuple = (None, {}),
) -> dict:
    """The classifier on the model's answers, NLL, preference metrics against the base (into its
    metrics); returns the summary users see, with the notes that say what was not computed."""
    m = mdl.metrics
    mdl.p_plain, mdl.p_robust, mdl.p_prefill = (
        ([], [], []) if clf is None else map(clf.predict_proba, (mdl.plain, mdl.robust, mdl.prefill))
    )
    if clf is None:
        notes.append(f"in-persona rates not computed: {clf_rep.note}")
    elif not data.prompts:
        notes.append("in-persona rates not computed: no prompts")
    if data.intro and mdl.sums["intro"]:
        m.update(nll_metrics(mdl.sums["intro"]))
    pref = None
    if mdl.label == "base":
        notes.append(
            "no preference metrics: the base is the reference, so its implied reward margin is 0 by definition"
        )
    elif not data.heldout:
        notes.append("preference metrics not computed: no held-out preference pairs")
    else:
        pref = dpo_metrics(mdl.sums["dpo"], base_dpo, beta)
        m.update(pref)
        if data.pairs_are_training_data:
            notes.append("preference pairs are training data, not held out: accuracy is optimistic")
    rates = [in_persona_rate(p) for p in (mdl.p_plain, mdl.p_robust, mdl.p_prefill)]
    m.update({k: r[0] for k, r in zip(("in_persona_rate", "robust_in_persona_rate", "prefill_in_persona_rate"), rates)})
    cap = mdl.capability
    if cap is not None:
        m.update({k: v for k, v in cap.items() if k != "capability_picks"})
    spec_clf, spec_section = spec
    specific = specificity(spec_clf, spec_section.get("classes", [None])[0], mdl.plain) if data.prompts else (None, 0)
    if specific[0] is None:
        notes.append(f"persona specificity not computed: {spec_section.get('reason') or 'no prompts'}")
    return model_summary(
        *(r if clf else None for r in rates[:2]),
        pref,
        notes,
        prefill=rates[2] if clf else None,
        capability=(cap["capability_accuracy"], cap["capability_n"]) if cap else None,
        specificity=specific,
    )


def _generations(prompts: list[str], models: list[ModelRun], judged: dict[str, list[dict]]) -> list[dict]:
    """Every model's answer to each prompt, side by side, with the classifier's and the judge's verdicts;
    and, where it ran, the prefill conversation's second answers."""
    generations = []
    p = lambda probs, i: probs[i] if probs else None  # noqa: E731
    for i, q in enumerate(prompts):
        row = {"prompt": q, "attack": break_character_messages(q, i), "answers": {}, "robust": {}}
        for mdl in models:
            entry = {"text": mdl.plain[i], "in_persona_p": p(mdl.p_plain, i)}
            if judged:
                entry.update(judged[mdl.label][i])
            row["answers"][mdl.label] = entry
            row["robust"][mdl.label] = {"text": mdl.robust[i], "in_persona_p": p(mdl.p_robust, i)}
        if models and models[0].prefill:
            answers = {m.label: {"text": m.prefill[i], "in_persona_p": p(m.p_prefill, i)} for m in models}
            row["prefill"] = {"first": models[0].plain[i], "follow_up": follow_up(i), "answers": answers}
        generations.append(row)
    return generations


def _data_result(data: EvalData, judge_name: str | None) -> dict:
    return {
        **data.sources,
        "dpo_pairs": len(data.heldout),
        "train_pairs": len(data.train),
        "introspection_rows": len(data.intro),
        "prompts": len(data.prompts),
        "judge_model": judge_name,
    }


def _classifier_result(rep: ClassifierReport) -> dict:
    return {
        "kind": rep.kind,
        "train_n": rep.train_n,
        "heldout_accuracy": rep.heldout_accuracy,
        "n": rep.n,
        "note": rep.note,
    }


# -- the evaluation --------------------------------------------------------------------------------
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
    sections: Sections | None = None,
) -> dict:
    """Evaluate the base model and each named checkpoint; returns JSON-able results (nothing written).

    `service.create_sampling_client(base_model=...)` gives the reference, `model_path=<uri>` each
    checkpoint; one model is held at a time. `judge`, if given, makes the judge's sampling client.
    The result's "eval" holds the per-model summaries users see (character.evaluation.metrics.SUMMARY_KEYS).
    `revealed_judge`, if given, makes the client of the judge of the revealed-preference games
    (`revealed_games` per model, on the evaluation's prompts); the result's "revealed" holds the Elo
    ratings per model and trait, or, when it was not run, the reason. `sections` adds the prompted baseline,
    multi-turn robustness, the capability probe and coherence ("capability", "coherence": or why not run)."""
    started = datetime.now(timezone.utc)
    sections = sections or Sections()
    clf, clf_rep = _classifier(data, classifier_path, seed)
    spec = prepare_specificity(constitution.name, data.train, sections.specificity, seed)
    offers, revealed_skip = _revealed_offers(revealed_judge, data, revealed_games, seed)
    sampling = Sampling(max_new_tokens, seed, max_length, sft_max_length)
    models = _sample_models(service, base_model, checkpoints, data, offers, sampling, sections)

    capability = capability_section(sections, models)
    common = list(data.notes) + _classifier_notes(clf_rep) + section_notes(sections, capability)
    base_dpo = models[0].sums["dpo"]
    summary = {mdl.label: _score_model(mdl, data, clf, clf_rep, base_dpo, beta, list(common), spec) for mdl in models}
    judged = score_answers(judge, constitution, data.prompts, models) if judge is not None else {}
    revealed = judge_revealed(revealed_judge, revealed_judge_name, constitution, offers, models, seed, revealed_skip)
    return {
        "persona": constitution.name,
        "base_model": base_model,
        "beta": beta,
        "started_at": started.isoformat(),
        "data": _data_result(data, judge_name),
        "classifier": _classifier_result(clf_rep),
        "checkpoints": {mdl.label: mdl.metrics for mdl in models},
        "eval": {**summary, "classifier": {"heldout_accuracy": clf_rep.heldout_accuracy, "n": clf_rep.n}},
        "generations": _generations(data.prompts, models, judged),
        "revealed": revealed,
        "coherence": coherence_section(sections, data.prompts, models, seed),
        "capability": capability,
        "specificity": spec[1],
    }
