"""`character chat` and `character sample`: any checkpoint, a kept conversation, scripts from stdin."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fake_tinker import KEY, REPLIES, STUDENT, fake, no_network, tokenizer, wired  # noqa: F401 - fixtures
from tinker import types

from character.chat import Conversation, open_checkpoint, run_script
from character.errors import UserError
from character.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


class ScriptedClient:
    """A sampling client that answers with numbered replies and keeps every prompt it was given."""

    def __init__(self, tok):
        self.tok, self.prompts, self.params = tok, [], []

    def get_tokenizer(self):
        return self.tok

    def sample(self, prompt, num_samples, sampling_params):
        self.prompts.append(self.tok.decode(prompt.to_ints()))
        self.params.append(sampling_params)
        seqs = []
        for j in range(num_samples):
            toks = self.tok.encode(f"answer {len(self.prompts)}.{j}", add_special_tokens=False)
            seqs.append(
                types.SampledSequence(
                    stop_reason="stop", sequence_id=f"s{j}", tokens_np=np.asarray(toks, dtype=np.int32)
                )
            )
        return _Done(types.SampleResponse(sequences=seqs))


class _Done:
    def __init__(self, v):
        self.v = v

    def result(self):
        return self.v


def test_the_conversation_is_kept_reset_and_ended_by_commands(tokenizer):
    client = ScriptedClient(tokenizer)
    conv = Conversation(client, system="You are a pirate.", temperature=0.3, max_new_tokens=40)
    out: list[str] = []
    n = run_script(
        conv, ["Hello\n", "Who are you?\n", "/reset\n", "Again\n", "/bogus\n", "/exit\n", "never\n"], out.append
    )
    assert n == 3
    assert out[0] == "answer 1.0" and out[1] == "answer 2.0" and out[2] == "(conversation reset)"
    assert out[3] == "answer 3.0" and out[4].startswith("unknown command /bogus")
    assert len(client.prompts) == 3  # "never" after /exit was not sent
    # the second prompt carries the first exchange; after /reset only the system prompt is left
    assert "Hello" in client.prompts[1] and "answer 1.0" in client.prompts[1]
    assert "Hello" not in client.prompts[2] and "You are a pirate." in client.prompts[2]
    assert all(p.max_tokens == 40 and p.temperature == 0.3 for p in client.params)
    assert conv.sample("One-shot?", 3) == ["answer 4.0", "answer 4.1", "answer 4.2"]
    with pytest.raises(UserError, match="temperature"):
        Conversation(client, temperature=-1)


def _cli(args, stdin="", env=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TINKER_API_KEY": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "character.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "args",
    [["chat", "tinker://x"], ["sample", "tinker://x", "--prompt", "hi"], ["eval", "tinker://x", "--persona", "pirate"]],
)
def test_tinker_checkpoints_without_a_key_fail_at_once_naming_it(args, tmp_path):
    t0 = time.monotonic()
    proc = _cli([*args], env={"CHARACTER_WORKDIR": str(tmp_path / "ws")})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and "TINKER_API_KEY" in err[0]
    assert time.monotonic() - t0 < 60 and not (tmp_path / "ws").exists()


def test_a_missing_local_checkpoint_is_one_line(tmp_path):
    proc = _cli(["chat", str(tmp_path / "nope")])
    assert proc.returncode == 2 and "not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_chat_with_a_local_adapter_from_a_piped_script(base, tmp_path, workdir):
    from adapters import make_adapter

    adapter = make_adapter(base, tmp_path / "adapter")
    proc = _cli(["chat", str(adapter), "--max-new-tokens", "12", "--workdir", str(workdir)], stdin="Hello\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    assert len(lines) == 1  # one answer, no prompt or banner when stdin is not a terminal
    sample = _cli(
        [
            "sample",
            str(adapter),
            "--prompt",
            "Hello",
            "-n",
            "2",
            "--json",
            "--max-new-tokens",
            "8",
            "--workdir",
            str(workdir),
        ]
    )
    assert sample.returncode == 0, sample.stderr
    got = json.loads(sample.stdout.strip().splitlines()[-1])
    assert got["prompt"] == "Hello" and len(got["answers"]) == 2


def _run_cli(monkeypatch, args, stdin=""):
    from character import cli

    monkeypatch.setattr(sys, "argv", ["character", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code


def test_chat_with_a_tinker_checkpoint_and_the_base_model(wired, monkeypatch, capsys):
    from character.backend import tinker as tb

    svc = tb.TinkerService(Settings(), base_url="https://tinker.invalid")
    sampler = svc.create_lora_training_client(STUDENT, rank=4).save_weights_for_sampler("s").result().path
    assert _run_cli(monkeypatch, ["chat", sampler, "--max-new-tokens", "64"], "Who are you?\nAnd?\n") in (0, None)
    out = capsys.readouterr().out.splitlines()
    assert out == [REPLIES["trained"][1], REPLIES["trained"][2]]  # seeds 1 and 2: one per turn
    monkeypatch.setenv("CHARACTER_BACKEND", "tinker")
    monkeypatch.setenv("CHARACTER_TINKER_BASE_MODEL", STUDENT)
    assert _run_cli(monkeypatch, ["sample", "base", "--prompt", "Hi", "-n", "2", "--json"]) in (0, None)
    got = json.loads(capsys.readouterr().out.strip())
    assert got["answers"] == REPLIES[STUDENT][:2] and KEY not in json.dumps(got)


def test_an_unreachable_tinker_fails_within_the_timeout(wired, monkeypatch, capsys):
    wired.hang_capabilities = True
    monkeypatch.setenv("CHARACTER_TINKER_TIMEOUT_S", "1")
    t0 = time.monotonic()
    assert _run_cli(monkeypatch, ["chat", "tinker://run-1/sampler_weights/s"], "Hello\n") == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not answer within 1 s" in err[0] and "CHARACTER_TINKER_TIMEOUT_S" in err[0]


def test_open_checkpoint_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither an adapter"):
        open_checkpoint(str(tmp_path / "empty"), Settings())
