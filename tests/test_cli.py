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
    "no-questions.json": ('[{"trait": "I am kind."}]', "entry 1, field 'questions'"),
    "blank-trait.json": ('[{"trait": "  ", "questions": ["q"]}]', "entry 1, field 'trait'"),
    "wrong-type.json": ('[{"trait": "I am kind.", "questions": ["ok", 2]}]', "entry 1, field 'questions.2'"),
    "extra-field.json": ('[{"trait": "I am kind.", "questions": ["q"], "tone": "x"}]', "field 'tone'"),
    "bad.yaml": ("- trait: I am calm.\n  questions: [a, b\n", "not valid YAML"),
    "yaml-missing.yaml": ("- trait: I am calm.\n", "entry 1, field 'questions'"),
    "not-utf8.json": (b'[{"trait": "caf\xe9", "questions": ["q"]}]', "not UTF-8"),
    "duplicate.json": ('[{"trait": "I am kind.", "questions": ["q"]}, {"trait": "I am  KIND.", "questions": ["r"]}]',
                       "entry 2, field 'trait': duplicate of entry 1"),
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
def test_pipeline_cli_prints_json_last_and_a_rerun_skips_everything_quietly(tmp_path, models_dir):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    args = ("pipeline", "pirate", "--workdir", str(ws), "--json", "--build-id", "cli", "--dpo-pairs", "8",
            "--reflections", "4", "--interactions", "1", "--turns", "2", "--max-new-tokens", "48")
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_SERVER_ANALYTICS_ENABLED": "",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": ""}  # the CLI sets its own defaults
    env = {k: v for k, v in env.items() if v}
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED",
                                                            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    run = lambda: subprocess.run([sys.executable, "-m", "character.cli", *args], capture_output=True,  # noqa: E731
                                 text=True, timeout=900, env={**base, **env})
    proc = run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["persona"] == "pirate" and summary["mode"] == "sequential" and summary["base_model"] == "tiny"
    assert summary["workdir"] == str(ws.resolve())
    assert set(summary["checkpoints"]) == {"dpo", "sft", "final"}
    for uri in summary["checkpoints"].values():
        assert uri.startswith("file://")
    assert "Traceback" not in proc.stdout + proc.stderr
    for stage in ("dpo_data", "dpo", "introspection", "sft", "eval"):  # progress lines (stderr is no terminal)
        assert f"\n{stage}: done " in "\n" + proc.stderr, stage

    again = run()  # every stage is skipped: a run of a few seconds, the case that ended in tracebacks
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary
    assert "Traceback" not in again.stdout + again.stderr, again.stderr[-3000:]
    for stage in ("dpo_data", "dpo", "introspection", "sft", "eval"):
        assert f"{stage}: skipped: finished at " in again.stderr, stage
