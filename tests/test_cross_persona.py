"""`character eval --build ... --build ...`: one classifier over several builds' teacher answers, every
model's answers classified by persona; the table, the heat map and the JSON fields on small builds of the
tiny model; answers a build's evaluation sampled are reused; bad input is one line before any sampling."""

from __future__ import annotations

import json
import random

import pytest

from tests.test_evaluate import cli
from tests.test_persona_specificity import content_answer

PERSONAS = ["pirate", "poetic", "sarcastic"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    from adapters import untrained_adapter

    return untrained_adapter(base, tmp_path_factory.mktemp("ckpt") / "crafted")


def make_build(workdir, persona: str, adapter, build_id: str = "b1", eval_answers: dict | None = None):
    """A finished build as its record shows it: teacher answers in its DPO pairs, dpo and sft models."""
    rng = random.Random(persona)
    root = workdir / "builds" / persona / build_id
    (root / "data").mkdir(parents=True)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question {k} for {persona}?"}],
            "chosen": [{"role": "assistant", "content": content_answer(persona, rng)}],
            "rejected": [{"role": "assistant", "content": "The usual way works well."}],
        }
        for k in range(12)
    ]
    (root / "data" / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stages = {"dpo": {"sampler": adapter.as_uri()}, "sft": {"sampler": adapter.as_uri()}}
    if eval_answers is not None:  # what the build's own evaluation sampled
        metrics = root / "eval" / "metrics.json"
        metrics.parent.mkdir()
        metrics.write_text(json.dumps({"generations": eval_answers}))
        stages["eval"] = {"report": {"metrics_json": str(metrics)}}
    record = {"persona": persona, "build_id": build_id, "config": {"base_model": "tiny"}, "stages": stages}
    (root / "record.json").write_text(json.dumps(record))
    return root


def test_cross_persona_eval_writes_table_plot_and_json(workdir, adapter):
    from character.evaluation.data import EVAL_PROMPTS
    from character.evaluation.metrics import break_character_messages

    known = [
        {
            "prompt": q,
            "attack": break_character_messages(q, i),
            "answers": {
                "base": {"text": "Reused base answer."},
                "prompted": {"text": "Reused prompted answer."},
                "final": {"text": "Reused final answer."},
            },
            "robust": {
                "base": {"text": "Reused robust base."},
                "prompted": {"text": "Reused robust prompted."},
                "final": {"text": "Reused robust final."},
            },
        }
        for i, q in enumerate(EVAL_PROMPTS[:2])
    ]
    make_build(workdir, "pirate", adapter, eval_answers=known)
    for p in PERSONAS[1:]:
        make_build(workdir, p, adapter)
    proc = cli(
        "eval", "--build", "pirate/b1", "--build", "poetic/b1",
        "--build", str(workdir / "builds" / "sarcastic" / "b1"),
        "--workdir", workdir, "--json", "--max-new-tokens", "4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["personas"] == PERSONAS
    assert line["classifier_heldout_macro_f1"] >= 0.9  # the teacher answers carry each persona's own words
    for k in ("base_macro_f1", "base_robust_macro_f1", "prompted_macro_f1", "prompted_robust_macro_f1"):
        assert 0 <= line[k] <= 1, k
    for k in ("final_macro_f1", "dpo_macro_f1"):
        assert 0 <= line[k] <= 1, k
    res = json.loads(open(line["report"]["metrics_json"]).read())
    assert set(res["groups"]) == {"base", "prompted", "dpo", "final"}
    for group in res["groups"].values():
        for rep in group.values():
            assert rep["labels"] == PERSONAS and len(rep["confusion"]) == 3
            assert set(rep["per_class"]["pirate"]) == {"precision", "recall", "f1", "support"}
            assert sum(map(sum, rep["confusion"])) == rep["n"]
    n_prompts = len(res["prompts"])
    assert res["groups"]["base"]["plain"]["n"] == 3 * n_prompts  # the base counted once per persona
    assert res["groups"]["final"]["plain"]["n"] == 3 * n_prompts
    # prompted: one model per persona (the base with that persona's teacher prompt), each counted for its own
    for kind in ("plain", "robust"):
        rep = res["groups"]["prompted"][kind]
        assert rep["n"] == 3 * n_prompts and [s["support"] for s in rep["per_class"].values()] == [n_prompts] * 3
    assert res["notes"] == []
    # the answers the pirate build's evaluation sampled are reused, not sampled again
    pirate = res["answers"]["pirate/final"]
    assert pirate["plain"][:2] == ["Reused final answer."] * 2 and pirate["robust"][0] == "Reused robust final."
    assert pirate["reused"] == 4 and pirate["sampled"] == 2 * n_prompts - 4
    assert res["answers"]["all/base"]["reused"] == 4
    # the prompted answers too, but only the pirate build's own: the other personas' are sampled
    prompted = res["answers"]["pirate/prompted"]
    assert (
        prompted["plain"][:2] == ["Reused prompted answer."] * 2 and prompted["robust"][1] == "Reused robust prompted."
    )
    assert prompted["reused"] == 4 and prompted["sampled"] == 2 * n_prompts - 4
    assert res["answers"]["poetic/prompted"]["reused"] == 0
    assert res["answers"]["poetic/prompted"]["sampled"] == 2 * n_prompts
    md = open(line["report"]["markdown"]).read()
    assert "| models | answers | macro-F1 |" in md and "data:image/png;base64," in md
    assert "| prompted | no system prompt |" in md and "### prompted, under break-character instructions" in md
    assert "| true \\ classified as | pirate | poetic | sarcastic |" in md
    assert line["report"]["plots"] and line["report"]["plots"][0].endswith("confusion.png")


def test_cross_persona_bad_input_is_one_line(workdir, adapter):
    make_build(workdir, "pirate", adapter)
    make_build(workdir, "pirate", adapter, build_id="b2")
    for args, says in (
        (["--build", "pirate/b1"], "at least two personas"),
        (["--build", "pirate/b1", "--build", "pirate/b2"], "pirate is given more than once"),
        (["--build", "pirate/b1", "--build", "poetic/nope"], "build poetic/nope: not found"),
    ):
        proc = cli("eval", *args, "--workdir", workdir)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert says in lines[0], lines[0]
    assert not (workdir / "evals").exists()  # refused before anything was sampled or written


def test_the_prompted_models_answer_with_exactly_their_teachers_system_prompt(workdir, adapter):
    from character.evaluation.cross_answers import messages, models_of
    from character.evaluation.cross_builds import common_prompts, load_build
    from character.evaluation.multiturn import with_system
    from character.persona.constitution import load_constitution
    from character.persona.prompts import teacher_system_prompt

    builds = [load_build(make_build(workdir, p, adapter)) for p in PERSONAS[:2]]
    gone = make_build(workdir, "sarcastic", adapter)
    rec = json.loads((gone / "record.json").read_text())
    rec["config"]["persona"] = str(workdir / "moved" / "sarcastic.json")  # a constitution file since moved
    (gone / "record.json").write_text(json.dumps(rec))
    builds.append(load_build(gone))
    assert builds[2].system is None
    models = models_of(builds, "tiny")
    assert [(m.label, m.persona) for m in models][:3] == [
        ("base", None),
        ("prompted", "pirate"),
        ("prompted", "poetic"),
    ]
    assert "sarcastic" not in {m.persona for m in models if m.label == "prompted"}  # no prompt to give it
    prompt = common_prompts(builds, 1)[0]
    base, prompted = models[0], models[2]
    system = teacher_system_prompt(load_constitution("poetic"))  # what the poetic build's teacher saw
    assert messages(base, prompt, "plain") == [{"role": "user", "content": prompt["prompt"]}]
    assert messages(prompted, prompt, "plain") == [
        {"role": "system", "content": system},
        {"role": "user", "content": prompt["prompt"]},
    ]
    assert messages(base, prompt, "robust") == prompt["attack"]
    assert messages(prompted, prompt, "robust") == with_system(prompt["attack"], system)
    assert messages(prompted, prompt, "robust")[0]["content"].startswith(system)
