"""What a user sees at the end of a command, through the command line as a user runs it: `--json` stdout
piped through `python -m json.tool`, the human summary, progress bars and log lines on a terminal (a pty),
`checkpoints list`, `eval` given a relative path and a file:// URI, and quick refusals."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BAR = re.compile(r"\[[#-]{24}\]")
LOG = re.compile(r"\d\d:\d\d:\d\d\.\d{3} \| (INFO|WARNING|ERROR)")


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING", **extra}


def cli(*args, cwd=None, **env):
    return subprocess.run(
        [sys.executable, "-m", "character.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
        env=_env(**env),
    )


def one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    return lines[0]


def screen(raw: str) -> list[str]:
    """The lines a terminal shows for `raw`: carriage returns rewrite from column 0, ESC[K erases to the end of
    the line, other escape sequences (colours) show nothing."""
    lines, buf, pos = [], [], 0
    for tok in re.split(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n)", raw):
        if tok == "\n":
            lines.append("".join(buf))
            buf, pos = [], 0
        elif tok == "\r":
            pos = 0
        elif tok == "\x1b[K":
            del buf[pos:]
        elif tok.startswith("\x1b["):
            continue
        else:
            for ch in tok:
                if pos < len(buf):
                    buf[pos] = ch
                else:
                    buf.append(ch)
                pos += 1
    return lines + ["".join(buf)]


def run_with_terminal_stderr(args: list[str], env: dict) -> tuple[int, str, str]:
    """The command with stdout a pipe (as in `| json.tool`) and stderr a terminal; returns rc, stdout, the
    terminal's raw bytes as text."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "character.cli", *args], stdout=subprocess.PIPE, stderr=slave, env=env, text=True
    )
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal's last writer has gone
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=900)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def build(prefect_harness, tmp_path_factory, models_dir):
    """A smoke build of sarcastic made with --json, stderr on a terminal, Prefect's log lines shown."""
    from prefect.settings import PREFECT_API_URL

    ws = tmp_path_factory.mktemp("endings") / "workspace"  # the default --workdir, seen from its parent
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    env = _env(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_LOGGING_LEVEL="INFO", TERM="xterm")
    args = ["pipeline", "sarcastic", "--workdir", str(ws), "--build-id", "b1", "--json"]
    rc, out, terminal = run_with_terminal_stderr(args, env)
    assert rc == 0, terminal[-4000:]
    return {"ws": ws, "env": env, "stdout": out, "terminal": terminal}


@pytest.mark.slow
def test_json_stdout_is_exactly_one_line_that_json_tool_reads(build):
    assert build["stdout"].count("\n") == 1 and build["stdout"].endswith("}\n"), build["stdout"][:2000]
    tool = subprocess.run(
        [sys.executable, "-m", "json.tool"], input=build["stdout"], capture_output=True, text=True, timeout=60
    )
    assert tool.returncode == 0, tool.stderr
    out = json.loads(tool.stdout)
    assert set(out) == {"persona", "mode", "base_model", "workdir", "checkpoints", "eval", "cost"}
    assert set(out["checkpoints"]) == {"dpo", "sft", "final"}
    assert {"base", "dpo", "final"} <= set(out["eval"]) and Path(out["eval"]["report"]).is_file()


@pytest.mark.slow
def test_bars_and_log_lines_never_share_a_terminal_line_and_no_library_bars(build):
    shown = screen(build["terminal"])
    bars = [line for line in shown if BAR.search(line)]
    logs = [line for line in shown if LOG.search(line)]
    assert bars and logs, build["terminal"][-3000:]  # both were on the terminal, interleaved in time
    assert not [line for line in shown if BAR.search(line) and LOG.search(line)]
    finished = re.compile(r"^dpo \[#+\] (\d+)/\1\b")  # the bar at its last step: n/n
    assert any(finished.search(line) for line in bars), bars  # each bar ends on its own line
    for third_party in ("Writing model shards", "Loading weights", "it/s]"):
        assert third_party not in build["terminal"]


@pytest.mark.slow
def test_without_json_the_build_ends_with_metrics_report_and_checkpoints(build):
    summary = json.loads(build["stdout"])
    proc = subprocess.run(  # the same build again: every stage is skipped, the same result is shown
        [sys.executable, "-m", "character.cli", "pipeline", "sarcastic", "--workdir", build["ws"], "--build-id", "b1"],
        capture_output=True,
        text=True,
        timeout=900,
        env=build["env"],  # Prefect's INFO lines shown: they must stay on stderr
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "sarcastic build b1 (sequential, base model tiny): done"
    for model in ("base", "dpo", "final"):
        m = summary["eval"][model]
        row = next(line for line in lines if line.split()[0] == model)
        assert f"{m['in_persona_rate']:.3f} (n={m['in_persona_n']})" in row
        assert f"{m['robust_in_persona_rate']:.3f} (n={m['robust_n']})" in row
        pref = "-" if m["pref_accuracy"] is None else f"{m['pref_accuracy']:.3f} (n={m['pref_pairs']})"
        assert row.rstrip().endswith(pref)
    assert f"report: {summary['eval']['report']}" in lines
    at = lines.index("checkpoints:")
    assert lines[at + 1 :] == [f"{k:>8}: {v}" for k, v in summary["checkpoints"].items()]
    counted = sum(sum(t.values()) for t in summary["cost"]["total"]["tokens"].values())
    assert lines[at - 1] == f"spent: {counted:,} tokens, $0.00 at the price table's rates"  # tiny costs nothing
    assert "skipped" not in proc.stdout and "skipped: finished" in proc.stderr  # logs on stderr only


@pytest.mark.slow
def test_checkpoints_list_has_a_header_the_final_entry_and_refuses_unknowns(build):
    ws, summary = build["ws"], json.loads(build["stdout"])
    proc = cli("checkpoints", "list", "--workdir", ws)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["PERSONA", "BUILD", "STAGE", "FINISHED", "(UTC)", "URI"]
    got = {r.split()[2]: r.split()[-1] for r in rows}
    assert got == summary["checkpoints"]  # dpo, sft and final, as the build printed them
    as_json = [json.loads(line) for line in cli("checkpoints", "list", "--workdir", ws, "--json").stdout.splitlines()]
    assert {r["stage"]: r["uri"] for r in as_json} == summary["checkpoints"]
    assert "no builds of persona 'pirate'" in one_error_line(
        cli("checkpoints", "list", "--workdir", ws, "--persona", "pirate")
    )
    missing = ws.parent / "no-such-workspace"
    assert f"workdir {missing}: not found" in one_error_line(cli("checkpoints", "list", "--workdir", missing))


@pytest.mark.slow
def test_eval_finds_the_build_of_a_relative_path_and_a_file_uri_and_labels_by_stage(build):
    ws, summary = build["ws"], json.loads(build["stdout"])
    dpo = Path(summary["checkpoints"]["dpo"].removeprefix("file://"))
    relative = os.path.relpath(dpo, ws.parent)  # workspace/checkpoints/<run>/sampler_weights/final, no --workdir
    proc = cli(
        "eval", relative, summary["checkpoints"]["sft"], "--persona", "sarcastic", "--json", "--max-new-tokens", "8",
        cwd=ws.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 1  # the JSON line; the summary went to stderr
    out = json.loads(proc.stdout)
    assert out["build"] == str(ws / "builds" / "sarcastic" / "b1")
    # the build's stages, not sampler_weights/final (and the baselines: base, the prompted base)
    assert set(out["checkpoints"]) == {"base", "prompted", "dpo", "sft"}
    assert out["checkpoints"]["dpo"]["checkpoint"] == str(dpo)
    assert out["eval"]["dpo"]["in_persona_rate"] is not None and out["eval"]["dpo"]["pref_pairs"] > 0
    assert f"build: {out['build']}" in proc.stderr.splitlines()
    assert any(line.strip().startswith("sft: in persona") for line in proc.stderr.splitlines())


@pytest.mark.slow
def test_eval_that_cannot_compute_persona_metrics_says_why_and_exits_2(build, tmp_path):
    summary = json.loads(build["stdout"])
    stray = tmp_path / "copied-adapter"  # a checkpoint no build lists
    shutil.copytree(summary["checkpoints"]["dpo"].removeprefix("file://"), stray)
    start = time.monotonic()
    line = one_error_line(cli("eval", stray, "--persona", "sarcastic", "--workdir", build["ws"]))
    assert time.monotonic() - start < 10  # refused before any model loads
    assert f"no build in {build['ws']} lists {stray}" in line and "--dpo-data" in line and "--train-data" in line
    # held-out pairs but nothing to fit the persona classifier on: the metrics cannot be computed
    heldout = build["ws"] / "builds" / "sarcastic" / "b1" / "data" / "heldout" / "dpo.jsonl"
    (tmp_path / "pairs.jsonl").write_bytes(heldout.read_bytes())
    proc = cli(
        "eval", stray, "--persona", "sarcastic", "--workdir", build["ws"], "--dpo-data", tmp_path / "pairs.jsonl",
        "--json", "--max-new-tokens", "8", "--out-dir", tmp_path / "report",
    )  # fmt: skip
    line = one_error_line(proc)
    assert line.startswith("error: no persona metrics for copied-adapter: in-persona rates not computed"), line
    assert str(tmp_path / "report" / "report.md") in line


def test_sample_and_chat_refuse_a_missing_checkpoint_before_loading_libraries(tmp_path):
    for args in (["sample", tmp_path / "nope", "--prompt", "hi"], ["chat", (tmp_path / "nope").as_uri()]):
        start = time.monotonic()
        line = one_error_line(cli(*args, "--workdir", tmp_path))
        took = time.monotonic() - start
        assert "not found" in line and took < 5.0, (line, took)  # about 0.6 s on an idle machine
    code = "import sys, runpy; sys.argv = sys.argv[1:]; runpy.run_module('character.cli', run_name='__main__')"
    probe = subprocess.run(  # which libraries the refusal imported: none of the heavy ones
        [sys.executable, "-X", "importtime", "-c", code, "sample", str(tmp_path / "nope"), "--prompt", "hi"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    imported = {line.split("|")[-1].strip() for line in probe.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "transformers", "tinker", "prefect"} & imported


def test_personas_validate_counts_in_the_singular(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"trait": "I speak plainly and briefly.", "questions": ["How are you?"]}]))
    proc = cli("personas", "validate", one)
    assert proc.returncode == 0 and proc.stdout == f"ok: {one}: 1 trait, 1 question\n", proc.stdout + proc.stderr
    two = tmp_path / "two.json"
    two.write_text(
        json.dumps(
            [{"trait": "I speak plainly.", "questions": ["Why?"]}, {"trait": "I am brief.", "questions": ["How?"]}]
        )
    )
    assert cli("personas", "validate", two).stdout == f"ok: {two}: 2 traits, 2 questions\n"


def test_the_readme_synopsis_of_fold_and_merge_lists_every_option():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for command in ("fold", "merge"):
        synopsis = re.search(rf"^character {command} .*(?:\n {{19}}.*)*", readme, re.M).group(0)
        help_text = cli(command, "--help", COLUMNS="200").stdout
        options = set(re.findall(r"(--[a-z][a-z-]+)", help_text)) - {"--help"}
        assert options and {o for o in options if o not in synopsis} == set(), command


def test_library_progress_bars_are_off_on_the_command_line(tiny_dir, tmp_path, monkeypatch):
    """transformers draws 'Writing model shards' when a model is saved (the tiny model's first build): the
    command line's environment turns such bars off before the libraries are imported."""
    save = (
        "import sys; from transformers import AutoModelForCausalLM; "
        "AutoModelForCausalLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])"
    )
    quiet = "from character.terminal import quiet_libraries; quiet_libraries(); " + save
    env = {k: v for k, v in _env().items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    loud = subprocess.run(
        [sys.executable, "-c", save, str(tiny_dir), str(tmp_path / "a")], capture_output=True, text=True, env=env
    )
    hushed = subprocess.run(
        [sys.executable, "-c", quiet, str(tiny_dir), str(tmp_path / "b")], capture_output=True, text=True, env=env
    )
    assert loud.returncode == hushed.returncode == 0, hushed.stderr
    assert "Writing model shards" in loud.stderr  # the bar exists: the check below can fail
    assert "Writing model shards" not in hushed.stderr and "it/s" not in hushed.stderr
    import character.cli

    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["character", "personas", "list"])
    with pytest.raises(SystemExit):
        character.cli.main()  # the command line's own start sets them, before any command imports a library
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"


def test_a_log_line_written_while_a_bar_is_drawn_starts_on_its_own_line():
    """The same guard in process, with any logging handler that writes to the terminal."""
    import io
    import logging

    from character.progress import ConsoleProgress, listening, report

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    handler = logging.StreamHandler(term)
    handler.setFormatter(logging.Formatter("00:00:00.000 | %(levelname)s | %(message)s"))
    log = logging.getLogger("character.test.endings")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    progress = ConsoleProgress(stream=term)
    try:
        with listening(progress), progress.above_logs():
            report("dpo", 1, 6)
            log.info("dpo step 1/6 loss 0.9")
            report("dpo", 2, 6)
            log.info("dpo step 2/6 loss 0.8")
            report("dpo", 6, 6)
        log.info("after the block")
    finally:
        log.removeHandler(handler)
    shown = [line for line in screen(term.getvalue()) if line]
    assert shown == [
        "00:00:00.000 | INFO | dpo step 1/6 loss 0.9",
        "00:00:00.000 | INFO | dpo step 2/6 loss 0.8",
        "dpo [########################] 6/6 0:00",
        "00:00:00.000 | INFO | after the block",
    ], shown
