"""The paper's robustness measure across personas: ONE classifier learns which persona wrote an answer
from the builds' teacher answers (labelled by persona; part held out for its own macro-F1), then names the
persona of every trained model's answers, with no system prompt and under the break-character
conversations. Per model group (base, prompted, dpo, final): per-persona precision, recall, F1, macro-F1
and the confusion matrix (character.evaluation.classification). The base model stands in for every
persona's model (its answers counted once per persona), so its figures are the chance-level reference;
`prompted` is the base model with each persona's teacher system prompt (exactly the teacher's: its
constitution), the ceiling a trained model aims for, as in the single-build evaluation.

Builds: character.evaluation.cross_builds; answers: character.evaluation.cross_answers; report:
character.evaluation.cross_report.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from character.datagen.engine import item_seed
from character.errors import UserError
from character.evaluation.classification import classification_report
from character.evaluation.cross_builds import (
    PROMPTS_PER_BUILD,
    PersonaBuild,
    check_personas,
    common_prompts,
    find_build,
    load_build,
)

HELDOUT_SHARE = 0.25  # of each persona's teacher answers, to measure the classifier itself
GROUPS = ("base", "prompted", "dpo", "final")


@dataclass(kw_only=True)
class CrossOptions:
    workdir: str | Path
    classifier: str | Path | None = None  # a local encoder folder (default: TF-IDF + logistic regression)
    base_model: str | None = None
    prompts_per_build: int = PROMPTS_PER_BUILD
    max_new_tokens: int = 256
    seed: int = 0
    device: str = "auto"
    out_dir: str | Path | None = None


def prepare(specs: list[str], o: CrossOptions) -> tuple[list[PersonaBuild], str]:
    """The builds and the base model, every check that needs no model done: refused before any sampling."""
    if o.classifier is not None and not (Path(o.classifier) / "config.json").is_file():
        raise UserError(f"--classifier {o.classifier}: not a local Hugging Face model folder (no config.json)")
    if o.prompts_per_build < 1:
        raise UserError(f"--prompts-per-build must be at least 1, not {o.prompts_per_build}")
    roots = [find_build(o.workdir, s) for s in specs]
    builds = [load_build(r) for r in roots]
    check_personas(builds)
    bases = {b.base_model for b in builds if b.base_model}
    if o.base_model is None and len(bases) != 1:
        raise UserError(
            "the builds record "
            + (f"different base models ({', '.join(sorted(bases))})" if bases else "no base model")
            + ": pass --base-model"
        )
    return builds, o.base_model or bases.pop()


def split_teacher(builds: list[PersonaBuild], seed: int) -> tuple[list, list, list, list]:
    """(train texts, labels, held-out texts, labels): a seeded share of each persona's answers held out."""
    tr, tr_y, ho, ho_y = [], [], [], []
    for b in builds:
        answers = list(b.teacher)
        random.Random(item_seed(seed, "cross-persona-split", b.persona)).shuffle(answers)
        k = round(len(answers) * HELDOUT_SHARE) if len(answers) > 1 else 0
        ho, ho_y = ho + answers[:k], ho_y + [b.persona] * k
        tr, tr_y = tr + answers[k:], tr_y + [b.persona] * (len(answers) - k)
    return tr, tr_y, ho, ho_y


def score_groups(clf, models, personas: list[str]) -> dict[str, dict]:
    """group -> kind -> classification report of its answers (the base's counted once per persona)."""
    out = {}
    for group in GROUPS:
        members = [m for m in models if m.label == group]
        if not members:
            continue
        out[group] = {}
        for kind in ("plain", "robust"):
            true, pred = [], []
            for m in members:
                said = clf.predict(m.answers[kind])
                for persona in personas if m.persona is None else [m.persona]:
                    true += [persona] * len(said)
                    pred += said
            out[group][kind] = classification_report(true, pred, personas)
    return out


def evaluate_personas(specs: list[str], o: CrossOptions, service=None) -> dict:
    """Fit, sample what is missing, score, write the report; returns the result (also in metrics.json)."""
    from character.evaluation.cross_answers import gather_answers, models_of
    from character.evaluation.metrics import make_classifier

    builds, base_model = prepare(specs, o)
    started = datetime.now(timezone.utc)
    personas = [b.persona for b in builds]
    tr, tr_y, ho, ho_y = split_teacher(builds, o.seed)
    clf = make_classifier(o.classifier, o.seed).fit(tr, tr_y)
    heldout = classification_report(ho_y, clf.predict(ho), personas) if ho else None

    prompts = common_prompts(builds, o.prompts_per_build)
    models = models_of(builds, base_model)
    if service is None:
        service = _service(models, o)
    gather_answers(service, models, builds, prompts, base_model, max_new_tokens=o.max_new_tokens, seed=o.seed)
    result = {
        "kind": "cross-persona",
        "personas": personas,
        "builds": {b.persona: str(b.root) for b in builds},
        "base_model": base_model,
        "started_at": started.isoformat(),
        "classifier": {
            "kind": "tfidf-logreg" if o.classifier is None else f"encoder:{Path(o.classifier).name}",
            "train_n": len(tr),
            "heldout": heldout,
            "heldout_macro_f1": heldout["macro_f1"] if heldout else None,
        },
        "prompts": [{"prompt": p["prompt"], "from": p["from"]} for p in prompts],
        "notes": [
            f"prompted: no {b.persona} row (its build's constitution cannot be found)" for b in builds if not b.system
        ],
        "groups": score_groups(clf, models, personas),
        "answers": {
            f"{m.persona or 'all'}/{m.label}": {"reused": m.reused, "sampled": m.sampled, **m.answers} for m in models
        },
    }
    from character.evaluation.cross_report import write_cross_report

    out = Path(o.out_dir) if o.out_dir else Path(o.workdir) / "evals" / "cross-persona" / f"{started:%Y%m%d-%H%M%S}"
    return write_cross_report(result, out)


def _service(models, o: CrossOptions):
    if any(m.source.startswith("tinker://") for m in models):
        from character.evaluation.models import tinker_service

        return tinker_service()
    from character.backend.local import LocalService
    from character.settings import Workspace

    return LocalService(Workspace(o.workdir), device=o.device, seed=o.seed)


def headline(result: dict) -> dict:
    """The figures a table row wants: the classifier's held-out macro-F1, each group's plain and robust macro-F1."""
    out = {"classifier_heldout_macro_f1": result["classifier"]["heldout_macro_f1"]}
    for group, kinds in result["groups"].items():
        out |= {
            f"{group}_macro_f1": kinds["plain"]["macro_f1"],
            f"{group}_robust_macro_f1": kinds["robust"]["macro_f1"],
        }
    return out
