"""The command line: one-line errors with exit code 2, personas commands, the pipeline's JSON."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "character.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


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
    "duplicate.json": (
        '[{"trait": "I am kind.", "questions": ["q"]}, {"trait": "I am  KIND.", "questions": ["r"]}]',
        "entry 2, field 'trait': duplicate of entry 1",
    ),
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


@pytest.mark.parametrize(
    "args,needle",
    [
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
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, args, needle):
    with_ws = args[0] in ("pipeline", "generate")
    assert_one_line_error(cli(*args, "--workdir", str(tmp_path / "ws")) if with_ws else cli(*args), needle)


def test_personas_list_and_show():
    out = cli("personas", "list")
    assert out.returncode == 0
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert {
        "sarcastic",
        "humorous",
        "remorseful",
        "loving",
        "nonchalant",
        "impulsive",
        "sycophantic",
        "mathematical",
        "poetic",
        "goodness",
        "pirate",
    } <= set(names)
    show = cli("personas", "show", "pirate")
    assert show.returncode == 0 and show.stdout.count("\n     - ") == 50


def test_shipped_personas_are_valid():
    from character.persona.constitution import load_constitution, shipped_personas

    for name in shipped_personas():
        c = load_constitution(name)
        assert len(c.traits) == 10 and all(len(t.questions) == 5 for t in c.traits), name


# The pipeline's JSON summary, its progress lines and a quiet rerun of a finished build are checked
# through the command line in test_reliability.py (test_killed_during_dpo_the_cli_resumes_from_the_last_save),
# on the build that test has to make anyway.
