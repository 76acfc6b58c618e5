"""The house rules that a reader relies on: ruff-clean and formatted, modules one person can hold in
their head, functions that hold one idea. An exception is allowed where the code says why, at its top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("character", "flows", "tasks", "deployments")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
REASON = "Long because"


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _ruff(*args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("ruff")
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_finds_nothing_to_fix():
    res = _ruff("check", "--no-cache", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_tree_is_formatted():
    res = _ruff("format", "--check", "--no-cache", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_modules_stay_small_or_say_why():
    big = []
    for path in _sources():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > MAX_MODULE_LINES and REASON not in doc:
            big.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
    assert not big, f"modules over {MAX_MODULE_LINES} lines without '{REASON} ...' in their docstring: {big}"


def long_functions(source: str) -> list[tuple[int, str, int]]:
    """(line, name, length) of each function over the limit that does not say why at its top."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES and REASON not in (ast.get_docstring(node) or ""):
                found.append((node.lineno, node.name, n))
    return found


def test_functions_hold_one_idea_or_say_why():
    long = [
        f"{path.relative_to(ROOT)}:{line} {name} ({n} lines)"
        for path in _sources()
        for line, name, n in long_functions(path.read_text())
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without '{REASON} ...' in their docstring: {long}"


def test_the_function_rule_flags_a_long_function_unless_it_says_why():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n") == [(1, "f", MAX_FUNCTION_LINES + 1)]
    assert long_functions(f'def f():\n    """{REASON} it is a table."""\n{body}\n') == []
    assert long_functions("def g():\n    return 1\n") == []
