"""An OpenAI-compatible HTTP endpoint for one checkpoint: `/v1/chat/completions` (streamed as server-sent
events or not) and `/v1/models`, on the standard library's threaded HTTP server.

Every request thread hands its prompt to one `Batcher`, whose single thread submits everything queued
to the sampling client before waiting on any of it: the local backend then decodes concurrent requests
as one padded batch, and Tinker runs them side by side. Prompts are rendered and answers decoded by
the checkpoint's renderer, with its end-of-turn stop tokens and the pipeline's sampling defaults, so a
greedy answer here is the one `character sample` gives. Neither backend streams tokens: a streamed
answer is sent in word-sized chunks once it is complete.
"""

from __future__ import annotations

import json
import queue
import re
import socket
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tinker import types

from character.backend import SamplingClient
from character.train.families import renderer_for
from character.train.renderer import Messages

# The pipeline's defaults (`character chat`/`sample`), for what a request leaves out.
DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_MAX_TOKENS = 0.7, 0.95, 512
MAX_N = 16
MAX_BODY_BYTES = 8 * 1024 * 1024
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request answered with OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class ChatRequest:
    """A validated `/v1/chat/completions` body, the pipeline's defaults filled in."""

    messages: Messages
    n: int = 1
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}, not {value!r}", name, "invalid_type")
    if not lo <= value <= hi:
        raise _bad(f"'{name}' must be between {lo:g} and {hi:g}, not {value!r}", name)
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
    raise _bad(f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_type")


def _messages(body: dict) -> Messages:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty list of messages", "messages", "missing_required_parameter")
    out: Messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise _bad(f"messages[{i}].role {role!r}: one of {', '.join(_ROLES)}", f"messages[{i}].role")
        out.append({"role": _ROLES[m["role"]], "content": _content(m, i)})
    if out[-1]["role"] == "assistant":
        raise _bad("the last message must not be the assistant's: there is nothing to answer", "messages")
    return out


def parse_chat_request(body, model_id: str) -> ChatRequest:
    """The body checked as OpenAI checks it (400 for bad values, 404 for another model's name)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required", "model", "missing_required_parameter")
    if model != model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_id}'", "model",
                       "model_not_found")  # fmt: skip
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise _bad("'stop' must be a string or a list of non-empty strings", "stop", "invalid_type")
    if len(stop or ()) > 4:
        raise _bad("'stop' takes at most 4 sequences", "stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatRequest(
        messages=_messages(body),
        n=_number(body, "n", 1, 1, MAX_N, integer=True),
        temperature=_number(body, "temperature", DEFAULT_TEMPERATURE, 0, 2),
        top_p=_number(body, "top_p", DEFAULT_TOP_P, 1e-9, 1),
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", DEFAULT_MAX_TOKENS, 1, 1 << 20, integer=True),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stop=tuple(stop or ()),
        stream=bool(body.get("stream", False)),
        include_usage=bool(options.get("include_usage", False)),
    )


class Batcher:
    """One thread between the request threads and the sampling client: it takes every request queued,
    submits them all, then waits for their results, so concurrent requests share the backend's batches
    (and the client, which is not thread-safe locally, is used from one thread only)."""

    def __init__(self, client: SamplingClient):
        self.client = client
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="character-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], n: int, params: types.SamplingParams) -> Future:
        fut: Future = Future()
        self._queue.put((prompt, n, params, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [b for b in batch if b is not None]
            self._serve(items)
            if len(items) < len(batch):  # closed
                return

    def _serve(self, batch) -> None:
        submitted = []
        for prompt, n, params, fut in batch:
            try:
                submitted.append((self.client.sample(types.ModelInput.from_ints(prompt), n, params), fut))
            except Exception as e:  # noqa: BLE001 - the request's answer, not this thread's end
                fut.set_exception(e)
        for pending, fut in submitted:
            try:
                fut.set_result(pending.result())
            except Exception as e:  # noqa: BLE001
                fut.set_exception(e)


@dataclass
class Choice:
    text: str
    finish_reason: str
    tokens: int


class Endpoint:
    """The chat-completions logic, independent of HTTP: requests in, OpenAI-shaped objects out."""

    def __init__(self, client: SamplingClient, model_id: str, base_model: str | None = None):
        self.model_id, self.created = model_id, int(time.time())
        self.renderer = renderer_for(client.get_tokenizer(), base_model)
        self.batcher = Batcher(client)

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "character"}

    def complete(self, req: ChatRequest) -> tuple[list[Choice], int]:
        """The request's answers and its prompt's length in tokens."""
        prompt = self.renderer.prompt(req.messages)
        params = self.renderer.sampling_params(
            max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed
        )
        try:
            out = self.batcher.submit(prompt, req.n, params).result()
        except Exception as e:  # noqa: BLE001 - the backend's failure, told to the client as OpenAI does
            raise ApiError(500, f"sampling failed: {type(e).__name__}: {e}", code="sampling_failed") from e
        return [self._choice(s, req.stop) for s in out.sequences], len(prompt)

    def _choice(self, seq, stop: tuple[str, ...]) -> Choice:
        tokens = list(seq.tokens)
        text = self.renderer.decode(tokens)
        finish = "length" if seq.stop_reason == "length" else "stop"
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:  # the request's own stop strings, on top of the renderer's end-of-turn tokens
            text, finish = text[: min(cuts)], "stop"
        return Choice(text, finish, len(tokens))

    def completion(self, req: ChatRequest, choices: list[Choice], prompt_tokens: int) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ],  # fmt: skip
            "usage": _usage(choices, prompt_tokens),
        }

    def chunks(self, req: ChatRequest, choices: list[Choice], prompt_tokens: int):
        """The streamed form: per choice its role, its text in word-sized pieces, its finish reason;
        then the usage when asked for."""
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_id}  # fmt: skip

        def chunk(i, delta, finish=None):
            return {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        for i, c in enumerate(choices):
            yield chunk(i, {"role": "assistant", "content": ""})
            for piece in re.findall(r"\s*\S+\s*|\s+", c.text):
                yield chunk(i, {"content": piece})
            yield chunk(i, {}, c.finish_reason)
        if req.include_usage:
            yield {**head, "choices": [], "usage": _usage(choices, prompt_tokens)}


def _usage(choices: list[Choice], prompt_tokens: int) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


class _Handler(BaseHTTPRequestHandler):
    server: "ChatServer"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, work) -> None:
        try:
            work()
        except ApiError as e:
            self._send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):  # the client left; nothing to tell it
            pass
        except Exception as e:  # noqa: BLE001 - a bug here is one request's 500, not a dropped connection
            self._send_json(500, ApiError(500, f"internal error: {type(e).__name__}: {e}").body())

    def do_GET(self):  # noqa: N802 - http.server's name
        self._answer(self._get)

    def do_POST(self):  # noqa: N802
        self._answer(self._post)

    def _get(self) -> None:
        endpoint, path = self.server.endpoint, self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            return self._send_json(200, endpoint.models())
        if path.startswith("/v1/models/"):
            asked = urllib.parse.unquote(path[len("/v1/models/") :])
            if asked != endpoint.model_id:
                raise ApiError(404, f"The model '{asked}' does not exist", "model", "model_not_found")
            return self._send_json(200, endpoint.model_card())
        if path == "/v1/chat/completions":
            raise ApiError(405, "use POST for /v1/chat/completions", code="method_not_allowed")
        raise ApiError(404, f"no route {self.path}", code="unknown_url")

    def _post(self) -> None:
        if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
            raise ApiError(404, f"no route {self.path}", code="unknown_url")
        endpoint = self.server.endpoint
        req = parse_chat_request(self._body(), endpoint.model_id)
        choices, prompt_tokens = endpoint.complete(req)
        if not req.stream:
            return self._send_json(200, endpoint.completion(req, choices, prompt_tokens))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        for chunk in endpoint.chunks(req, choices, prompt_tokens):
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _bad("bad Content-Length header", None, "invalid_request") from None
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}", None, "invalid_json") from None


class ChatServer(ThreadingHTTPServer):
    """The threaded HTTP server; `endpoint` is attached once the checkpoint is open (the port is taken
    first, so a busy port is reported before a model is loaded)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, endpoint: Endpoint | None = None, log=None):
        self.endpoint, self.log = endpoint, log
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"

    def server_close(self) -> None:
        super().server_close()
        if self.endpoint is not None:
            self.endpoint.batcher.close()
