"""The command line: one-line errors with exit code 2, personas commands, the pipeline's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "character.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


BAD = {
    "not-json.json": ('[{"trait": "x", ', "not valid JSON"),
    "not-list.json": ('{"trait": "x"}', "expected a JSON array"),
    "empty.json": ("[]", "no traits"),
    "no-questions.json": ('[{"trait": "I am kind."}]', "entry 0, field 'questions'"),
    "blank-trait.json": ('[{"trait": "  ", "questions": ["q"]}]', "entry 0, field 'trait'"),
    "wrong-type.json": ('[{"trait": "I am kind.", "questions": [1, 2]}]', "entry 0, field 'questions.0'"),
    "extra-field.json": ('[{"trait": "I am kind.", "questions": ["q"], "tone": "x"}]', "field 'tone'"),
    "bad.yaml": ("- trait: I am calm.\n  questions: [a, b\n", "not valid YAML"),
    "yaml-missing.yaml": ("- trait: I am calm.\n", "entry 0, field 'questions'"),
    "not-utf8.json": (b'[{"trait": "caf\xe9", "questions": ["q"]}]', "not UTF-8"),
    "duplicate.json": ('[{"trait": "I am kind.", "questions": ["q"]}, {"trait": "I am  KIND.", "questions": ["r"]}]',
                       "entry 1, field 'trait': duplicate of entry 0"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_constitution_is_one_line_error(tmp_path, name):
    text, needle = BAD[name]
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_one_line_error(cli("personas", "validate", str(path)), str(path), needle)


def test_pipeline_refuses_a_malformed_constitution_before_doing_anything(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"trait": "I am kind.", "questions": "not a list"}]')
    ws = tmp_path / "ws"
    proc = cli("pipeline", str(path), "--workdir", str(ws))
    assert_one_line_error(proc, str(path), "field 'questions'")
    assert not ws.exists()  # nothing built, nothing written


@pytest.mark.parametrize("args,needle", [
    (["pipeline", "nosuch"], "unknown persona 'nosuch'"),
    (["pipeline", "bad name!"], "not a safe name"),
    (["pipeline", "../etc"], "../etc: constitution file not found"),
    (["pipeline", "/etc/passwd"], "must end in .json, .yaml or .yml"),
    (["generate", "dpo", "nosuch"], "unknown persona"),
    (["generate", "banana", "pirate"], "unknown stage 'banana'"),
    (["pipeline", "pirate", "--dpo-pairs", "0"], "--dpo-pairs"),
    (["pipeline", "pirate", "--merge"], "--merge needs --paper-mode"),
    (["merge", "tinker://run-1/weights/final", "tinker://run-1/weights/sft", "--output", "m"], "no Tinker API key"),
    (["pipeline", "pirate", "--scale", "huge"], "--scale"),
    (["pipeline", "pirate", "--base-model", "/no/such/model"], "base model '/no/such/model'"),
    (["pipeline", "pirate", "--build-id", "a/b"], "build id"),
    (["personas", "show", "nosuch"], "unknown persona"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, needle):
    with_ws = args[0] in ("pipeline", "generate")
    assert_one_line_error(cli(*args, "--workdir", str(tmp_path / "ws")) if with_ws else cli(*args), needle)


def test_personas_list_and_show():
    out = cli("personas", "list")
    assert out.returncode == 0
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert {"sarcastic", "humorous", "remorseful", "loving", "nonchalant", "impulsive", "sycophantic",
            "mathematical", "poetic", "goodness", "pirate"} <= set(names)
    show = cli("personas", "show", "pirate")
    assert show.returncode == 0 and show.stdout.count("\n     - ") == 50


def test_shipped_personas_are_valid():
    from character.constitution import load_constitution, shipped_personas

    for name in shipped_personas():
        c = load_constitution(name)
        assert len(c.traits) == 10 and all(len(t.questions) == 5 for t in c.traits), name


@pytest.mark.slow
def test_pipeline_cli_prints_json_last(tmp_path, models_dir):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    proc = cli("pipeline", "pirate", "--workdir", str(ws), "--json", "--build-id", "cli",
               env={"PREFECT_HOME": str(tmp_path / "prefect")}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["persona"] == "pirate" and summary["mode"] == "sequential" and summary["base_model"] == "tiny"
    assert summary["workdir"] == str(ws.resolve())
    assert set(summary["checkpoints"]) == {"dpo", "sft", "final"}
    for uri in summary["checkpoints"].values():
        assert uri.startswith("file://")
    ev = summary["eval"]  # the evaluation's headline metrics, with their n and the reasons for any null
    assert {"base", "final", "classifier", "report"} <= set(ev) and set(ev["classifier"]) == {"heldout_accuracy", "n"}
    assert list(ev["final"]) == ["in_persona_rate", "in_persona_n", "robust_in_persona_rate", "robust_n",
                                 "pref_accuracy", "pref_margin", "pref_pairs", "notes"]
    assert ev["base"]["pref_accuracy"] is None and ev["base"]["notes"] and ev["report"].endswith("report.md")
