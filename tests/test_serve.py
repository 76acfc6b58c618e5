"""`character serve`: the official `openai` client against the endpoint over loopback, for a local
adapter on the tiny model and for a tinker:// checkpoint on the fake Tinker."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from fake_tinker import _ALLOW_LOOPBACK, KEY, REPLIES, STUDENT, fake, no_network, tokenizer, wired  # noqa: F401

from character.chat import Conversation, open_checkpoint
from character.serve import ChatServer, Endpoint
from character.settings import Settings

SYSTEM = "You are a pirate."
PROMPTS = ["Hello", "Who are you?", "What is the sea like?", "Tell me about ships.", "Why?"]


@pytest.fixture(autouse=True)
def loopback():
    _ALLOW_LOOPBACK["on"] = True  # the endpoint is on 127.0.0.1; anything else still fails the test


def _start(client, model_id: str) -> ChatServer:
    server = ChatServer("127.0.0.1", 0, Endpoint(client, model_id))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stop(server: ChatServer) -> None:
    server.shutdown()
    server.server_close()


def _openai(server: ChatServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def _run_cli(monkeypatch, args) -> int | None:
    from character import cli

    monkeypatch.setattr(sys, "argv", ["character", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code


def _streamed(api, **kw) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in api.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


# -- a local adapter on the tiny model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def local(base, models_dir, tmp_path_factory):
    from adapters import make_adapter

    root = tmp_path_factory.mktemp("serve")
    ws = root / "ws"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    adapter = make_adapter(base, root / "adapter")
    client = open_checkpoint(str(adapter), Settings(workdir=ws))
    server = _start(client, "pirate")
    yield server, client, adapter, ws
    _stop(server)


def test_a_greedy_answer_is_what_character_sample_gives(local, monkeypatch, capsys):
    server, _, adapter, ws = local
    api = _openai(server)
    kw = dict(model="pirate", temperature=0, max_tokens=12, seed=3)
    got = api.chat.completions.create(
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}], **kw
    )
    args = ["sample", str(adapter), "--prompt", "Hello", "--system", SYSTEM, "--temperature", "0"]
    assert _run_cli(monkeypatch, [*args, "--max-new-tokens", "12", "--json", "--workdir", str(ws)]) in (0, None)
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answers"][0]
    answer = got.choices[0]
    assert answer.message.role == "assistant" and answer.message.content == expected and expected
    assert answer.finish_reason in ("stop", "length") and got.model == "pirate"
    assert 0 < got.usage.completion_tokens <= 12
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    # the same answer streamed, in pieces, ending with its finish reason
    text, finish = _streamed(api, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}],
                             **kw)  # fmt: skip
    assert (text, finish) == (expected, answer.finish_reason)


def test_multi_turn_history_reaches_the_model(local):
    server, client, _, _ = local
    history = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Ahoy there, friend."},
        {"role": "user", "content": [{"type": "text", "text": "Who are "}, {"type": "text", "text": "you?"}]},
    ]
    got = _openai(server).chat.completions.create(model="pirate", messages=history, temperature=0, max_tokens=10)
    conv = Conversation(client, system=SYSTEM, temperature=0, max_new_tokens=10)
    conv.messages += [history[1], history[2]]
    assert got.choices[0].message.content == conv.sample("Who are you?", 1)[0]
    rendered = conv.renderer.prompt(conv.messages + [{"role": "user", "content": "Who are you?"}])
    assert got.usage.prompt_tokens == len(rendered)
    assert "Ahoy there, friend." in conv.renderer.tok.decode(rendered)


def test_ten_concurrent_clients_all_get_their_own_answer(local):
    server, client, _, _ = local
    api = _openai(server)
    rounds: list[int] = []
    batcher = server.endpoint.batcher
    serve_batch = batcher._serve

    def held(batch):  # the first round waits until the other requests are queued: they must go as one batch
        rounds.append(len(batch))
        deadline = time.monotonic() + 60
        while len(rounds) == 1 and batcher._queue.qsize() < 10 - len(batch) and time.monotonic() < deadline:
            time.sleep(0.01)
        serve_batch(batch)

    batcher._serve = held
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(10)]

    def ask(prompt):
        r = api.chat.completions.create(model="pirate", messages=[{"role": "user", "content": prompt}],
                                        temperature=0, max_tokens=8)  # fmt: skip
        return r.choices[0].message.content

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(ask, prompts))
    alone = [Conversation(client, temperature=0, max_new_tokens=8).sample(p, 1)[0] for p in prompts]
    assert answers == alone  # batched or not, each request got the answer to its own prompt
    assert sum(rounds) == 10 and len(rounds) == 2  # the nine that queued meanwhile: one batch
    batcher._serve = serve_batch


def test_a_folded_model_folder_answers_as_its_adapter_does(local, tiny_dir, tmp_path):
    from character.weights.fold import fold_adapter

    server, _, adapter, ws = local
    folded = fold_adapter(str(adapter), tmp_path / "folded", base_model=str(tiny_dir))
    other = _start(open_checkpoint(str(folded), Settings(workdir=ws)), "folded")
    try:
        ask = dict(messages=[{"role": "user", "content": "Who are you?"}], temperature=0, max_tokens=10)
        got = _openai(other).chat.completions.create(model="folded", **ask).choices[0].message.content
        assert got == _openai(server).chat.completions.create(model="pirate", **ask).choices[0].message.content
    finally:
        _stop(other)


# -- a tinker:// checkpoint on the fake Tinker -------------------------------------------------------
@pytest.fixture
def remote(wired):
    from character.backend import tinker as tb

    svc = tb.TinkerService(Settings(), base_url="https://tinker.invalid")
    sampler = svc.create_lora_training_client(STUDENT, rank=4).save_weights_for_sampler("s").result().path
    server = _start(open_checkpoint(sampler, Settings()), sampler)
    yield server, sampler, wired
    _stop(server)


def test_a_tinker_checkpoint_answers_streamed_and_not(remote, monkeypatch, capsys):
    server, sampler, _ = remote
    api = _openai(server)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who are you?"}]
    got = api.chat.completions.create(model=sampler, messages=msgs, seed=1, n=2)
    assert [c.message.content for c in got.choices] == REPLIES["trained"][1:3]
    assert [c.index for c in got.choices] == [0, 1] and got.choices[0].finish_reason == "stop"
    assert _streamed(api, model=sampler, messages=msgs, seed=2) == (REPLIES["trained"][2], "stop")
    chunks = list(api.chat.completions.create(model=sampler, messages=msgs, seed=0, stream=True,
                                              stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    # `character sample` draws with the settings' seed (0): the same answer as seed 0 here
    assert _run_cli(monkeypatch, ["sample", sampler, "--prompt", "Who are you?", "--system", SYSTEM, "--json"]) in (
        0,
        None,
    )
    assert json.loads(capsys.readouterr().out.strip())["answers"] == [REPLIES["trained"][0]]
    assert (
        api.chat.completions.create(model=sampler, messages=msgs, seed=0).choices[0].message.content
        == (REPLIES["trained"][0])
    )
    cut = api.chat.completions.create(model=sampler, messages=msgs, seed=0, stop=["pirate"])
    assert cut.choices[0].message.content == "I am a " and cut.choices[0].finish_reason == "stop"
    assert [m.id for m in api.models.list().data] == [sampler] and api.models.retrieve(sampler).id == sampler


def test_concurrent_requests_are_submitted_before_any_is_waited_on(remote):
    server, sampler, fake = remote
    fake.sample_delay = 0.2
    api = _openai(server)
    barrier = threading.Barrier(10)

    def ask(i):
        barrier.wait()
        r = api.chat.completions.create(model=sampler, messages=[{"role": "user", "content": f"q{i}"}], seed=i)
        return r.choices[0].message.content

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(ask, range(10)))
    assert answers == [REPLIES["trained"][i % 3] for i in range(10)]
    assert fake.max_outstanding > 1  # requests that arrived together were in flight together


def _raw(server, path, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(server.url.removesuffix("/v1") + path, data=body, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_style_errors(remote):
    server, sampler, fake = remote
    api = _openai(server)
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        api.chat.completions.create(model="gpt-4o", messages=user)
    assert e.value.code == "model_not_found" and e.value.param == "model" and "gpt-4o" in e.value.message
    for kw, param in [
        (dict(messages=user, temperature=3), "temperature"),
        (dict(messages=user, max_tokens=0), "max_tokens"),
        (dict(messages=user, n=0), "n"),
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
        (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model=sampler, **kw)
        assert e.value.status_code == 400 and e.value.param == param, kw
        assert e.value.body["type"] == "invalid_request_error" and e.value.message
    status, body = _raw(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert _raw(server, "/v1/nothing")[0] == 404 and _raw(server, "/v1/chat/completions")[0] == 405
    assert _raw(server, "/v1/models/other")[0] == 404
    fake.fail("sample", RuntimeError("the sampler fell over"))
    with pytest.raises(openai.InternalServerError) as e:
        api.chat.completions.create(model=sampler, messages=user)
    assert e.value.body["type"] == "server_error" and "the sampler fell over" in e.value.message
    # after every refusal the server still answers
    assert api.chat.completions.create(model=sampler, messages=user, seed=1).choices[0].message.content


# -- the command ---------------------------------------------------------------------------------------
def test_serve_refuses_a_busy_port_and_a_missing_checkpoint_in_one_line(tmp_path, monkeypatch, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert _run_cli(monkeypatch, ["serve", "tiny", "--port", str(port), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert _run_cli(monkeypatch, ["serve", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    assert _run_cli(monkeypatch, ["serve", "tiny", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.slow
def test_character_serve_answers_until_ctrl_c(workdir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TINKER_API_KEY": ""}
    args = ["serve", "tiny", "--port", "0", "--model-name", "tiny-persona", "--log-requests"]
    args += ["--workdir", str(workdir)]
    proc = subprocess.Popen([sys.executable, "-m", "character.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny-persona at http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.split(" at ")[1].split()[0]
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        got = api.chat.completions.create(model="tiny-persona", messages=[{"role": "user", "content": "Hello"}],
                                          temperature=0, max_tokens=6)  # fmt: skip
        assert got.choices[0].message.content and got.usage.completion_tokens <= 6
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in err  # --log-requests: one line per request
