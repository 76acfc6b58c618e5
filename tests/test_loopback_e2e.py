"""What a Tinker build does beyond training, rehearsed on the loopback service through Prefect with the real
SDK: the persona results the local backend reaches on tiny, a nightly of two personas and its cross-persona
evaluation of the two builds, `character eval` on the build's `tinker://` checkpoints, and a paper-mode
build with question expansion, export, conversion and the exact merge.

Two builds serve every test: a nightly of two personas at the demo scale with evaluation on (module fixture
`night`), and a small paper-mode build with `--merge` and `--expand-questions` (`paper`). The builds name
the model `tiny`, as a loopback service allows. The CLI sets the tiny model's own hyperparameters
(`TINY_DEFAULTS`) only on the local backend, so the nightly passes them as overrides, with the learning
rate carried to Tinker's LoRA scale by the README's rule (alpha 32 at rank 8: scale 4 against 2 locally,
so 2e-3 becomes 1e-3).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loopback_service import SMALL, Service, adapter, finish, loopback_env, loopback_space
from safetensors.torch import load_file

from character.config import TINY_DEFAULTS
from character.persona.constitution import load_constitution

LR = TINY_DEFAULTS["dpo"]["learning_rate"] * 2 / 4  # local scale 2 (alpha 2r) -> Tinker's 32/8 = 4
TINY_ON_TINKER = {
    **TINY_DEFAULTS,
    "dpo": {**TINY_DEFAULTS["dpo"], "learning_rate": LR},
    "sft": {**TINY_DEFAULTS["sft"], "learning_rate": LR},
}
PERSONAS = ["sarcastic", "pirate"]
NIGHTLY = """
import json, sys
from prefect.artifacts import Artifact
from flows.nightly import nightly
state = nightly(**json.loads(sys.argv[1]), return_state=True)
summary = Artifact.get("nightly-summary")
cross = {k: Artifact.get(k) for k in ("cross-persona-evaluation", "cross-persona-evaluation-report")}
print(json.dumps({
    "state": state.type.value, "message": state.message, "rows": json.loads(summary.data),
    "description": summary.description, "result": state.result() if state.is_completed() else None,
    "cross": {k: a and {"data": a.data, "description": a.description} for k, a in cross.items()},
}))
"""


def env_for(url: str, space: Path, prefect: str) -> dict:
    return loopback_env(url, space / "hub", space / prefect)


def record(space: Path, persona: str, build_id: str) -> dict:
    return json.loads((space / "ws" / "builds" / persona / build_id / "record.json").read_text())


def delta(folder: Path, module: str) -> torch.Tensor:
    """scale x B A of one module of a PEFT adapter folder, in float64."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = load_file(str(folder / "adapter_model.safetensors"))
    a, b = t[f"{module}.lora_A.weight"].double(), t[f"{module}.lora_B.weight"].double()
    return (cfg["lora_alpha"] / a.shape[0]) * (b @ a)


@pytest.fixture(scope="module")
def space(tmp_path_factory, models_dir):
    return loopback_space(tmp_path_factory, models_dir, "lb-e2e")


@pytest.fixture(scope="module")
def service(space):
    svc = Service(space / "state", space / "ws", space / "hub", "--model", "tiny")
    yield svc
    svc.kill()


@pytest.fixture(scope="module")
def night(space, service):
    """flows.nightly on `--backend tinker` for two personas at the demo scale, evaluation on."""
    kw = {
        "personas": PERSONAS,
        "scale": "demo",
        "backend": "tinker",
        "base_model": "tiny",
        "teacher_model": "tiny",
        "workdir": str(space / "ws"),
        "build_id": "night",
        "overrides": TINY_ON_TINKER,
    }
    env = env_for(service.url, space, "prefect-night")
    r = subprocess.run(
        [sys.executable, "-c", NIGHTLY, json.dumps(kw)], env=env, capture_output=True, text=True, timeout=1500
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def paper(space, service):
    """A small paper-mode build with the merge, its question pool expanded by the teacher on Tinker."""
    cmd = [sys.executable, "-m", "character.cli", "pipeline", "pirate", "--backend", "tinker", "--paper-mode"]
    cmd += ["--merge", "--expand-questions", "3", "--base-model", "tiny", "--teacher-model", "tiny"]
    cmd += ["--workdir", str(space / "ws"), "--build-id", "paper", *SMALL]
    env = env_for(service.url, space, "prefect-paper")
    return finish(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


@pytest.mark.slow
def test_on_the_loopback_the_persona_is_learned_as_on_the_local_backend(space, night):
    """The README's main run's scale (demo) and the tiny model's hyperparameters: the thresholds of
    tests/test_persona_e2e.py, read from the evaluation the build itself recorded."""
    m = record(space, "sarcastic", "night")["stages"]["eval"]["summary"]
    base, final = m["base"], m["final"]
    assert final["in_persona_n"] >= 20 and base["in_persona_n"] == final["in_persona_n"]
    assert final["in_persona_rate"] >= base["in_persona_rate"] + 0.4, (base, final)
    assert final["pref_pairs"] >= 20 and final["pref_accuracy"] >= 0.8, final


@pytest.mark.slow
def test_a_nightly_of_two_personas_completes_on_tinker(space, night, service):
    assert night["state"] == "COMPLETED", night
    rows = {r["persona"]: r for r in night["rows"]}
    assert set(rows) == set(PERSONAS)
    registry = json.loads((space / "state" / "registry.json").read_text())
    served = {s["model_path"] for s in registry["samplers"].values()}
    for persona, row in rows.items():
        rec = record(space, persona, "night")
        assert row["state"] == "Completed" and row["final"] == rec["stages"]["sft"]["sampler"], row
        assert row["final"].startswith("tinker://") and row["final"] in served  # evaluated on the service
        summary = rec["stages"]["eval"]["summary"]["final"]
        assert row["in_persona_rate"] == summary["in_persona_rate"] and row["pref_accuracy"] == summary["pref_accuracy"]
        assert row["tokens"] > 0 and rec["stages"]["dpo"]["lora_alpha"] == 32


@pytest.mark.slow
def test_the_nightly_runs_the_cross_persona_evaluation_over_its_two_builds(space, night):
    """The nightly's cross-persona step ran on Tinker and published: its report and metrics.json in the
    workspace's evals/cross-persona/, its Prefect artifacts, and its headline in the nightly's summary."""
    cross = night["result"]["cross-persona"]
    assert cross["state"] == "Completed", cross
    report = Path(cross["report"])
    assert report.parent.parent == (space / "ws" / "evals" / "cross-persona").resolve()
    res = json.loads((report.parent / "metrics.json").read_text())
    assert res["personas"] == PERSONAS and set(res["groups"]) == {"base", "prompted", "dpo", "final"}
    for group, kinds in res["groups"].items():
        for kind, rep in kinds.items():
            assert rep["labels"] == PERSONAS and [len(r) for r in rep["confusion"]] == [2, 2], (group, kind)
            assert sum(map(sum, rep["confusion"])) == rep["n"] > 0 and 0 <= rep["macro_f1"] <= 1, (group, kind)
    for group in ("base", "prompted", "final"):
        assert cross[f"{group}_macro_f1"] == res["groups"][group]["plain"]["macro_f1"], group
    f = {g: f"{res['groups'][g]['plain']['macro_f1']:.3f}" for g in ("base", "prompted", "final")}
    assert cross["headline"] == f"final macro-F1 {f['final']} against base {f['base']} (prompted {f['prompted']})"
    assert f"cross-persona evaluation: {cross['headline']}; report {cross['report']}" in night["description"]
    # what each build's own evaluation sampled is reused: its final model's and its prompted baseline's answers
    for persona in PERSONAS:
        for label in ("final", "prompted"):
            assert res["answers"][f"{persona}/{label}"]["reused"] > 0, (persona, label)
    table = json.loads(night["cross"]["cross-persona-evaluation"]["data"])
    assert {r["models"] for r in table} == {"teacher answers (held out)", "base", "prompted", "dpo", "final"}
    assert night["cross"]["cross-persona-evaluation-report"]["data"] == report.read_text()


@pytest.mark.slow
def test_character_eval_on_the_builds_tinker_checkpoints_reproduces_the_builds_evaluation(space, night, service):
    stages = record(space, "sarcastic", "night")["stages"]
    dpo, final = stages["dpo"]["sampler"], stages["sft"]["sampler"]
    cmd = [sys.executable, "-m", "character.cli", "eval", dpo, final, "--persona", "sarcastic"]
    cmd += ["--workdir", str(space / "ws"), "--json"]
    r = subprocess.run(
        cmd, env=env_for(service.url, space, "prefect-eval"), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])["checkpoints"]
    built = stages["eval"]["summary"]
    assert got["dpo"]["checkpoint"] == dpo and got["sft"]["checkpoint"] == final, got
    # the same seeds, classifier and held-out data: the build's own evaluation, number for number
    for ref, label in (("base", "base"), ("dpo", "dpo"), ("final", "sft")):
        for k in ("in_persona_rate", "robust_in_persona_rate", "prefill_in_persona_rate", "capability_accuracy"):
            assert got[label][k] == built[ref][k], (ref, k, got[label], built[ref])
        if ref != "base":
            assert got[label]["dpo_accuracy"] == built[ref]["pref_accuracy"]
            # float32 log-prob sums, batched differently by the two runs: equal to float32 rounding
            assert got[label]["dpo_margin"] == pytest.approx(built[ref]["pref_margin"], rel=1e-6)


@pytest.mark.slow
def test_question_expansion_runs_on_tinker_and_feeds_the_data(space, paper):
    stages = record(space, "pirate", "paper")["stages"]
    q = stages["questions"]
    asked = 3 * len(load_constitution("pirate").traits)
    assert q["questions"] + sum(q["dropped"].values()) == asked, q
    rows = [json.loads(x) for x in Path(q["path"]).read_text().splitlines()]
    assert sum(len(r["questions"]) for r in rows) == q["questions"] > 0, rows
    pool = {x for r in rows for x in r["questions"]}  # a trait may accept what another trait did
    pairs = [json.loads(x) for x in Path(stages["dpo_data"]["all"]).read_text().splitlines()]
    assert any(p["prompt"][-1]["content"] in pool for p in pairs)  # the pairs ask expanded questions too


@pytest.mark.slow
def test_paper_mode_exports_converts_and_merges_exactly(space, paper):
    """The downloads are the trained states (export and conversion lose nothing), and the merge is
    1.0 x dW_dpo + 0.25 x dW_sft of them, module by module."""
    assert paper["result"]["mode"] == "paper"
    stages = record(space, "pirate", "paper")["stages"]
    root = space / "ws" / "builds" / "pirate" / "paper"
    for stage in ("dpo", "sft"):
        trained = adapter(space / "state", stages[stage]["state"])
        got = load_file(str(root / "downloads" / stage / "adapter_model.safetensors"))
        assert trained.keys() == got.keys() and all(torch.equal(trained[k], got[k]) for k in got), stage
    modules = {k.rsplit(".lora_", 1)[0] for k in trained}
    assert modules and any(".mlp." in m for m in modules)
    for m in sorted(modules):
        want = 1.0 * delta(root / "downloads" / "dpo", m) + 0.25 * delta(root / "downloads" / "sft", m)
        got = delta(root / "merged", m)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7 * want.abs().max().item()), m
    assert stages["merged"]["method"] == "exact" and paper["result"]["checkpoints"]["merged"].startswith("file://")


def test_a_loopback_names_family_is_read_from_the_config_it_published(tmp_path, monkeypatch, tiny_dir):
    """`tiny` names no family; served by a loopback, its config.json in the Hub cache says Llama. The same
    bare name on a real service is refused, as before, and so is a loopback's model of another family."""
    from huggingface_hub import constants

    from character.loopback.hub import publish_tokenizer
    from character.weights.tinker_export import UnsupportedAdapter, check_family, is_qwen3_5

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    publish_tokenizer("tiny", tiny_dir, tmp_path / "hub")
    monkeypatch.setenv("TINKER_BASE_URL", "http://127.0.0.1:8765")
    check_family("tiny")
    assert not is_qwen3_5("tiny")
    snapshot = tmp_path / "hub" / "models--tiny" / "snapshots" / "loopback" / "config.json"
    snapshot.write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(UnsupportedAdapter, match="qwen3_moe"):
        check_family("tiny")
    with pytest.raises(UnsupportedAdapter):
        check_family("nosuch")  # nothing published under that name: its name decides
    monkeypatch.setenv("TINKER_BASE_URL", "https://tinker.example.com")
    with pytest.raises(UnsupportedAdapter):
        check_family("tiny")
