"""Constitution limits: sizes, counts and control characters, each one line naming entry and field;
`personas validate` lists every problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from character.errors import UserError
from character.persona import constitution as C

OK_Q = ["What should I cook tonight?"]


def _problems(tmp_path, entries) -> list[str]:
    path = tmp_path / "persona.json"
    path.write_text(json.dumps(entries))
    c, problems = C.check_constitution(str(path))
    assert (c is None) == bool(problems)
    return problems


@pytest.mark.parametrize(
    "entries,needle",
    [
        (
            [{"trait": "x" * (C.MAX_TRAIT_CHARS + 1), "questions": OK_Q}],
            f"entry 1, field 'trait': is {C.MAX_TRAIT_CHARS + 1} characters long; the limit is {C.MAX_TRAIT_CHARS}",
        ),
        (
            [{"trait": "I am kind.", "questions": OK_Q + ["q" * (C.MAX_QUESTION_CHARS + 1)]}],
            f"entry 1, field 'questions.2': is {C.MAX_QUESTION_CHARS + 1} characters long",
        ),
        (
            [{"trait": "I am kind.", "questions": [f"q{i}" for i in range(C.MAX_QUESTIONS_PER_TRAIT + 1)]}],
            f"entry 1, field 'questions': {C.MAX_QUESTIONS_PER_TRAIT + 1} questions; the limit is",
        ),
        (
            [{"trait": "I am kind.", "questions": OK_Q}, {"trait": "I am\x00 calm.", "questions": OK_Q}],
            "entry 2, field 'trait': contains the control character U+0000",
        ),
        (
            [{"trait": "I am kind.", "questions": ["Which is \u202eright?"]}],
            "entry 1, field 'questions.1': contains the control character U+202E",
        ),
        ([{"trait": "I am kind.", "questions": ["a \u2066hidden\u2069 part"]}], "U+2066"),
        ([{"trait": "I am kind.\x1b[31m", "questions": OK_Q}], "U+001B"),
        ([{"trait": "I am kind.", "questions": ["lone \ud800 surrogate"]}], "U+D800"),
    ],
)
def test_each_limit_is_one_line_naming_entry_and_field(tmp_path, entries, needle):
    problems = _problems(tmp_path, entries)
    assert len(problems) == 1 and needle in problems[0], problems
    assert "\n" not in problems[0] and problems[0].startswith(str(tmp_path / "persona.json"))
    with pytest.raises(UserError, match="entry"):
        C.load_constitution(str(tmp_path / "persona.json"))


def test_too_many_traits_is_refused_before_any_entry_is_read(tmp_path):
    entries = [{"trait": f"I am trait {i}.", "questions": OK_Q} for i in range(20_000)]
    path = tmp_path / "many.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(UserError, match=f"20000 traits; the limit is {C.MAX_TRAITS}"):
        C.check_constitution(str(path))


def test_what_a_persona_may_contain_is_still_accepted(tmp_path):
    entries = [
        {
            "trait": "Je suis \u00e9l\u00e9gant \u2014 \u6570\u5b66 \U0001f642\tand\nkind.",
            "questions": ["x" * C.MAX_QUESTION_CHARS] * 1 + ["Why?"] * (C.MAX_QUESTIONS_PER_TRAIT - 1),
        },
        {"trait": "t" * C.MAX_TRAIT_CHARS, "questions": ["\u05e9\u05dc\u05d5\u05dd \u200f?"]},
    ]  # RTL text
    assert _problems(tmp_path, entries) == []


def test_personas_validate_lists_every_problem_numbered_from_one_up_to_a_cap(tmp_path):
    entries = [
        {"trait": "I am kind.", "questions": OK_Q},
        {"trait": "", "questions": OK_Q},
        {"trait": "I am\x00 calm.", "questions": ["ok", "bad\u202e"]},
        {"trait": "I am KIND.", "questions": OK_Q},
    ]
    entries += [{"trait": f"bad {i}\x07", "questions": OK_Q} for i in range(40)]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(entries))
    proc = subprocess.run(
        [sys.executable, "-m", "character.cli", "personas", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == C.MAX_PROBLEMS and all(x.startswith(f"error: {path}: entry ") for x in lines)
    assert "entry 2, field 'trait'" in lines[0]
    assert "entry 3, field 'trait': contains the control character U+0000" in lines[1]
    assert "entry 3, field 'questions.2': contains the control character U+202E" in lines[2]
    assert "entry 4, field 'trait': duplicate of entry 1" in lines[3]
    assert "entry 5, field 'trait'" in lines[4]
    # the pipeline gives the first problem alone, on one line
    proc = subprocess.run(
        [sys.executable, "-m", "character.cli", "pipeline", str(path), "--workdir", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "entry 2, field 'trait'" in proc.stderr and "more: `character personas validate`" in proc.stderr
    assert not (tmp_path / "ws").exists()


def test_a_teacher_prompt_too_long_for_the_model_fails_before_generation_naming_the_limit(workdir, tmp_path):
    from character.build import checks
    from character.build import stages as pipeline
    from character.build.stages import PipelineConfig

    entries = [{"trait": f"I am trait number {i}. " + "very " * 170 + "long.", "questions": OK_Q} for i in range(30)]
    path = tmp_path / "verbose.json"
    path.write_text(json.dumps(entries))
    cfg = PipelineConfig(persona=str(path), workdir=str(workdir), build_id="long", dpo_pairs=4, max_new_tokens=64)
    checks.validate(cfg)  # within every per-field limit
    with pytest.raises(UserError, match=r"does not fit the teacher's context of 4096 tokens: its traits take \d+"):
        pipeline.stage_dpo_data(cfg)
    assert not (cfg.build_dir() / "data" / "dpo.jsonl").exists()  # nothing generated
