"""Evaluation on Tinker (remote, through sampling clients of tinker:// checkpoints, on the fake SDK) and the
revealed-preference evaluation wired into it (a scripted model and judge, end to end to the report)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_tinker import KEY, STUDENT, TEACHER, fake, fake_tokenizer, no_network, tinker_build_config, tokenizer, wired  # noqa: F401 - fixtures are used by name
from tinker import types

from character.build import checks
from character.build import stages as pipeline
from character.build.direct import run_sequential
from character.build.record import read_record
from character.build.stages import PipelineConfig
from character.evaluation.data import EvalData
from character.evaluation.evaluate import write_outputs
from character.evaluation.revealed import ELO_START, TRAITS, constitution_traits
from character.evaluation.run import evaluate_models
from character.persona.constitution import load_constitution
from character.train.loop import OptimConfig


def _tinker_build(tmp_path, build_id="remote") -> tuple[PipelineConfig, dict]:
    opt = OptimConfig(learning_rate=5e-2, batch_size=2, save_every=1, warmup_ratio=0.0)
    cfg = tinker_build_config(tmp_path, build_id, opt, dpo_pairs=12, reflections=2, heldout_fraction=0.3)
    return cfg, run_sequential(cfg)


def test_a_tinker_build_is_evaluated_remotely(wired, tmp_path):
    cfg, out = _tinker_build(tmp_path)
    wired.calls.clear()
    res = pipeline.stage_evaluate(cfg, out)  # dpo, sft, final: all tinker://
    ev = res["eval"]
    assert set(ev) == {"base", "prompted", "dpo", "sft", "final", "classifier", "report"}
    # The fake base model answers with the student's own training answers: the classifier calls none in persona.
    assert ev["base"]["in_persona_rate"] == 0.0 and ev["base"]["in_persona_n"] > 0
    for lb in ("dpo", "final"):
        assert ev[lb]["in_persona_rate"] is not None and ev[lb]["robust_in_persona_rate"] is not None
        assert ev[lb]["pref_accuracy"] is not None and ev[lb]["pref_pairs"] > 0
    assert ev["classifier"]["heldout_accuracy"] is not None
    # remote: sampling clients on the base model and on each sampler checkpoint; nothing was exported or downloaded
    made = [c[1] for c in wired.calls if c[0] == "create_sampling_client"]
    assert STUDENT in made and out["dpo"].sampler in made and out["sft"].sampler in made
    assert not any(c[0] == "get_external_weights_urls" for c in wired.calls)
    assert not (cfg.build_dir() / "downloads").exists()
    assert res["checkpoints"]["final"]["kind"] == "tinker" and res["base_model"] == STUDENT
    # the build record keeps the summary `character pipeline --json` shows, and why revealed preferences were skipped
    rec = read_record(cfg)["stages"]["eval"]
    assert rec["summary"]["final"]["in_persona_rate"] == ev["final"]["in_persona_rate"]
    assert rec["revealed"]["status"] == "skipped" and "CHARACTER_REVEALED_JUDGE" in rec["revealed"]["reason"]
    md = Path(res["report"]["markdown"]).read_text()
    assert "## Revealed preferences" in md and "Skipped: no judge model is configured" in md
    assert "| final | " in md and KEY not in md


def test_cli_eval_of_tinker_checkpoints(wired, tmp_path, capsys, monkeypatch):
    from character import cli

    cfg, out = _tinker_build(tmp_path, "cli")
    argv = [
        "character",
        "eval",
        out["sft"].sampler,
        "--persona",
        "pirate",
        "--workdir",
        cfg.workdir,
        "--json",
        "--revealed-judge",
        TEACHER,
        "--revealed-games",
        "6",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    assert exit_.value.code in (0, None), captured.err
    res = json.loads(captured.out.strip().splitlines()[-1])
    assert res["build"] == str(cfg.build_dir()) and res["base_model"] == STUDENT  # found through the record
    assert res["data"]["dpo"].endswith("heldout/dpo.jsonl") and res["data"]["dpo_held_out"] is True
    assert res["checkpoints"]["sft"] == {
        **res["checkpoints"]["sft"],
        "kind": "tinker",
        "checkpoint": out["sft"].sampler,
    }
    assert res["eval"]["sft"]["in_persona_rate"] is not None and res["eval"]["sft"]["pref_pairs"] > 0
    # the judge is a model Tinker serves; the fake teacher never names a trait: every game is counted, none rated
    rev = res["revealed"]
    assert rev["status"] == "computed" and rev["judge_model"] == TEACHER and rev["games_per_model"] == 6
    assert set(rev["ratings"]) == {"base", "sft"} and set(rev["ratings"]["sft"].values()) == {ELO_START}
    saved = json.loads(Path(res["report"]["metrics_json"]).read_text())["revealed"]
    assert saved["models"]["sft"]["games"] == 6 and saved["models"]["sft"]["unparsed"] == 6
    assert ("create_sampling_client", TEACHER) in wired.calls
    assert "6 verdicts unreadable" in Path(res["report"]["markdown"]).read_text()

    # a checkpoint no build in the workspace lists: the data and the base model are given
    stages = read_record(cfg)["stages"]
    held, train = tmp_path / "held.jsonl", tmp_path / "train.jsonl"
    held.write_bytes(Path(stages["dpo_data"]["heldout"]).read_bytes())
    train.write_bytes(Path(stages["dpo_data"]["path"]).read_bytes())
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "character",
            "eval",
            out["dpo"].sampler,
            "--persona",
            "pirate",
            "--json",
            "--workdir",
            str(tmp_path / "other"),
            "--base-model",
            STUDENT,
            "--dpo-data",
            str(held),
            "--train-data",
            str(train),
        ],
    )
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    assert exit_.value.code in (0, None), captured.err
    res = json.loads(captured.out.strip().splitlines()[-1])
    (label,) = set(res["checkpoints"]) - {"base", "prompted"}  # no build names its stage: the checkpoint's own name
    run, _, name = out["dpo"].sampler.removeprefix("tinker://").split("/")
    assert label == f"{run}/{name}" and res["checkpoints"][label]["kind"] == "tinker"
    assert res["build"] is None and res["eval"][label]["pref_pairs"] > 0
    assert res["eval"][label]["in_persona_rate"] is not None and res["revealed"]["status"] == "skipped"

    # mixing local and tinker checkpoints in one call is refused before anything runs
    monkeypatch.setattr(sys, "argv", argv[:3] + [str(tmp_path)] + argv[3:])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "separate calls" in err[0]


# -- revealed preferences through evaluate_models, with scripted clients ---------------------------
class _Done:
    def __init__(self, v):
        self.v = v

    def result(self):
        return self.v


_OFFER = re.compile(r"on offer for this conversation: (\w+) and (\w+)\.")


class Scripted:
    """A sampling client whose answer is a function of the decoded prompt."""

    def __init__(self, tok, answer):
        self.tok, self.answer = tok, answer

    def get_tokenizer(self):
        return self.tok

    def sample(self, prompt, num_samples, sampling_params):
        toks = self.tok.encode(self.answer(self.tok.decode(prompt.to_ints())), add_special_tokens=False)
        seq = types.SampledSequence(stop_reason="stop", sequence_id="s", tokens_np=np.asarray(toks, dtype=np.int32))
        return _Done(types.SampleResponse(sequences=[seq] * num_samples))

    def compute_logprobs(self, prompt):
        return _Done([None] + [-1.0] * (prompt.length - 1))


def _answers(preferred: set[str]):
    """Shows a preferred trait when one is offered, else the first offered, reversed (never named outright)."""

    def answer(text: str) -> str:
        offer = _OFFER.search(text)
        if offer is None:
            return "A plain answer." if not preferred else "Arr, a sailor's answer!"
        first, second = offer.groups()
        shown = second if second in preferred and first not in preferred else first
        return f"reply in the manner {shown[::-1]}"

    return answer


def _judge(text: str) -> str:
    reply = re.search(r"<reply>\n(.*?)\n</reply>", text, re.DOTALL).group(1)
    return f"It reads that way.\nTrait: {reply.rsplit(' ', 1)[-1][::-1]}"


class ScriptedService:
    def __init__(self, tok, preferred):
        self.tok, self.preferred, self.made = tok, preferred, []

    def create_sampling_client(self, model_path=None, base_model=None):
        self.made.append(model_path or base_model)
        if base_model == "base":
            return Scripted(self.tok, _answers(set()))
        return Scripted(self.tok, _answers(self.preferred))


PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"Question {i}?"}],
        "chosen": [{"role": "assistant", "content": "Arr, a sailor's answer!"}],
        "rejected": [{"role": "assistant", "content": "A plain answer."}],
    }
    for i in range(4)
]


def test_revealed_preferences_skipped_or_computed_through_evaluate_models(tmp_path):
    tok = fake_tokenizer()
    c = load_constitution("pirate")
    wanted = set(constitution_traits([t.trait for t in c.traits]))
    assert wanted
    data = EvalData(train=PAIRS, prompts=[f"Tell me about topic {i}." for i in range(20)])
    svc = ScriptedService(tok, wanted)

    skipped = write_outputs(
        evaluate_models(svc, "base", {"final": "ckpt"}, c, data, max_new_tokens=16), tmp_path / "skipped"
    )
    assert skipped["revealed"]["status"] == "skipped" and "--revealed-judge" in skipped["revealed"]["reason"]
    assert "Skipped: no judge model is configured" in Path(skipped["report"]["markdown"]).read_text()
    assert skipped["eval"]["final"]["in_persona_rate"] == 1.0 and skipped["eval"]["base"]["in_persona_rate"] == 0.0

    judge = Scripted(tok, _judge)
    res = write_outputs(
        evaluate_models(
            svc,
            "base",
            {"dpo": "ckpt", "final": "ckpt"},
            c,
            data,
            max_new_tokens=16,
            revealed_judge=lambda: judge,
            revealed_judge_name="scripted",
            revealed_games=300,
            seed=2,
        ),
        tmp_path / "computed",
    )
    rev = res["revealed"]
    assert rev["status"] == "computed" and rev["final"] == "final" and rev["games_per_model"] == 300
    assert set(rev["constitution_traits"]) == wanted
    for lb in ("base", "dpo", "final"):
        m = rev["models"][lb]
        assert m["games"] == m["judged"] == 300 and set(m["ratings"]) == set(TRAITS)
    # same offers for every model; the trained one shows the constitution's traits whenever they are offered
    base, final = rev["models"]["base"], rev["models"]["final"]
    offered = [t for t in wanted if final["counts"][t]["offered"]]
    assert offered and all(final["counts"][t]["shown"] >= base["counts"][t]["shown"] for t in offered)
    assert all(base["counts"][t]["offered"] == final["counts"][t]["offered"] for t in TRAITS)
    moved = [rev["changes"]["final"][t] for t in offered]
    assert sum(moved) / len(moved) > 20 and rev["changes"]["dpo"] == rev["changes"]["final"]
    for t in TRAITS:
        assert rev["changes"]["final"][t] == pytest.approx(final["ratings"][t] - base["ratings"][t])
    # the model was never asked in the judge's words, the judge never saw which trait the model chose
    md = Path(res["report"]["markdown"]).read_text()
    section = md.split("## Revealed preferences")[1].split("\n## ")[0]
    assert "judge `scripted`" in section and "| trait | base Elo | final Elo | change |" in section
    assert all(f"| {t} |" in section for t in wanted)
    assert "![revealed preferences: Elo change from base](data:image/png;base64," in section
    png = Path(res["report"]["dir"]) / "revealed_preferences.png"
    assert str(png) in res["report"]["plots"] and png.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(Path(res["report"]["metrics_json"]).read_text())["revealed"]
    assert saved["models"]["final"]["ratings"] == pytest.approx(final["ratings"])
    assert len(saved["models"]["final"]["records"]) == 300
    # the same weights under two names were judged once
    assert svc.made == ["base", "ckpt", "base", "ckpt"]


def test_a_bad_revealed_judge_or_a_missing_key_fails_before_a_build_starts(tmp_path, monkeypatch):
    from character.errors import UserError

    cfg = PipelineConfig(persona="pirate", workdir=str(tmp_path / "ws"), build_id="judge")
    monkeypatch.setenv("CHARACTER_REVEALED_JUDGE", "no-such-model")
    with pytest.raises(UserError, match="CHARACTER_REVEALED_JUDGE no-such-model: not 'tiny'"):
        checks.validate(cfg)
    monkeypatch.setenv("CHARACTER_REVEALED_JUDGE", TEACHER)  # served by Tinker: needs the key
    with pytest.raises(UserError, match="TINKER_API_KEY"):
        checks.validate(cfg)
    assert not read_record(cfg)
    checks.validate(cfg.model_copy(update={"evaluate": False}))  # no evaluation: no judge needed


@pytest.mark.slow
def test_transient_sampling_failures_leave_the_evaluation_as_it_was(wired, tmp_path, monkeypatch):
    """Every sampling and log-prob request of an evaluation (models, 1-10 judge, revealed-preference judge)
    is made again alone when it fails transiently: the same numbers come out as without faults."""
    from character.backend import retry
    from character.evaluation.evaluate import evaluate_checkpoints
    from character.evaluation.options import EvalOptions

    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)
    cfg, out = _tinker_build(tmp_path, "faults")
    uris = [out["dpo"].sampler, out["sft"].sampler]

    def evaluate(name: str) -> dict:
        opts = EvalOptions(
            persona="pirate",
            workdir=cfg.workdir,
            judge_model=TEACHER,
            revealed_judge=TEACHER,
            revealed_games=6,
            out_dir=tmp_path / name,
        )
        res = evaluate_checkpoints(uris, opts)
        res["eval"].pop("report")  # where the report went: the one thing that differs
        return {k: res[k] for k in ("checkpoints", "eval", "generations", "revealed", "classifier")}

    clean = evaluate("clean")
    # a tenth: each request is tried 6 times at most, and the capability probe alone makes hundreds of them
    wired.inject_faults(0.1, seed=5, ops=("sample", "compute_logprobs"))
    faulted = evaluate("faulted")
    assert wired.injected.get("sample", 0) >= 3 and wired.injected.get("compute_logprobs", 0) >= 3, wired.injected
    assert len(wired.injected_kinds) >= 3, wired.injected_kinds  # several of the SDK's failure shapes
    assert faulted == clean
    assert clean["eval"]["sft"]["pref_pairs"] > 0 and clean["checkpoints"]["sft"]["introspection_nll"] is not None
