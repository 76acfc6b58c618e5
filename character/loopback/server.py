"""The loopback service's HTTP side: routes, the API key, results by long poll, and wire faults.

A thread per connection (HTTP/1.1 keep-alive, as httpx uses it). A result that is not ready is held
for up to `POLL_HOLD_S` and then answered `try_again`, as Tinker's queue does; an unknown request id
(one from before a restart) is `410`, a promise that is gone.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from character.loopback.api import Api
from character.loopback.engine import Engine, Failed
from character.loopback.faults import WireFaults
from character.loopback.hub import publish_tokenizer
from character.loopback.registry import Registry, UnknownPath
from character.loopback.wire import read_forward_backward

log = logging.getLogger(__name__)

POLL_HOLD_S = 10.0
PROTO = "application/x-protobuf"
# Server flags the SDK reads at start: plain API keys (no JWT exchange), plain httpx, per-request polling,
# client-side custom losses (forward_backward_custom sends a forward and then a weighted backward).
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}
_STABLE_FIELDS = ("model_id", "seq_id", "model_seq_id", "sampling_session_seq_id", "sampling_session_id", "path")
_CHECKPOINT = re.compile(
    r"^/api/v1/training_runs/([^/]+)/checkpoints/(weights|sampler_weights|external_weights)/(.+?)$"
)


class Loopback:
    """One service: its state folder, models, faults and HTTP server. `start()` serves on a thread."""

    def __init__(
        self,
        state: Path,
        models_dir: Path,
        port: int = 0,
        faults: WireFaults | None = None,
        echo_key: bool = False,
        served: tuple[str, ...] = ("tiny",),
        stall_s: float = 600.0,
        device: str = "cpu",
        hub: Path | None = None,
        poll_hold_s: float = POLL_HOLD_S,
    ):
        """`hub`: the Hugging Face Hub cache that receives the served names' tokenizer (default: the user's)."""
        self.registry = Registry(state)
        self.engine = Engine(self.registry, models_dir, device=device)
        self.api = Api(self.registry, self.engine, list(served))
        for name in served:
            publish_tokenizer(name, self.api.model_folder(), hub)
        self.faults = faults or WireFaults()
        self.echo_key, self.stall_s, self.poll_hold_s = echo_key, stall_s, poll_hold_s
        self.stopping = threading.Event()
        self.httpd = _Server(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.loopback = self
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None
        self.conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def start(self) -> "Loopback":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="loopback-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop every open connection (kept-alive ones too), as a process exit would."""
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._conns_lock:
            conns, self.conns = list(self.conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.engine.close()

    def __enter__(self) -> "Loopback":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that went away (it gave up on a stalled answer, or this side reset it) is no error."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


def _label(path: str, body: dict) -> str:
    """The exchange without the session id, for the fault draw."""
    parts = [path]
    for k in _STABLE_FIELDS:
        v = body.get(k) if isinstance(body, dict) else None
        if v is not None:
            parts.append(f"{k}={str(v).rsplit(':', 1)[-1] if isinstance(v, str) else v}")
    return "|".join(parts)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tinker-loopback"

    def log_message(self, fmt, *args):  # one debug line per exchange, never the headers (they hold the key)
        log.debug("%s %s", self.command, fmt % args)

    @property
    def lb(self) -> Loopback:
        return self.server.loopback

    # -- replies --------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        if self.lb.echo_key:  # a careless service: the caller must keep this out of every message and log
            message = f"{message} (request authenticated with X-API-Key: {self.headers.get('X-API-Key', '')})"
        self._json({"detail": message, "error": message}, status, headers)

    def _reset(self) -> None:
        """Drop the connection with a TCP reset: the client sees a connection error, not an answer."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def setup(self):
        super().setup()
        with self.lb._conns_lock:
            self.lb.conns.add(self.connection)

    def finish(self):
        with self.lb._conns_lock:
            self.lb.conns.discard(self.connection)
        try:
            super().finish()
        except OSError:  # a connection this side reset
            pass

    def _fault(self, kind: str | None) -> bool:
        """Answer with the fault `kind` (except a reset, which comes after the work); True if answered."""
        if kind is None or kind == "reset":
            return False
        if kind == "stall":
            self.lb.stopping.wait(self.lb.stall_s)
            self._reset()
        elif kind == "429":
            self._error(429, "rate limited, slow down", {"retry-after": "0.2"})
        elif kind == "408":
            self._json({"type": "try_again", "queue_state": "active", "detail": "poll timed out"}, 408)
        else:
            self._error(int(kind), {"410": "promise expired", "500": "internal error"}.get(kind, "service unavailable"))
        return True

    # -- requests -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        if self.lb.stopping.is_set():
            return self._reset()
        url = urlparse(self.path)
        path = url.path
        raw = self._body()
        if path.startswith("/files/"):
            return self._file(path)
        if not (self.headers.get("X-API-Key") or "").startswith(("tml-", "eyJ")):
            return self._error(401, "missing or invalid API key")
        fb = read_forward_backward(raw) if path == "/api/v1/forward_backward" else None
        body = {"model_id": fb.model_id, "seq_id": fb.seq_id} if fb else (json.loads(raw) if raw else {})
        polling = path == "/api/v1/retrieve_future"
        quiet = path in ("/api/v1/telemetry", "/api/v1/cancel_future")
        kind = None
        if not quiet:
            label = _label(path, body)
            if polling:
                p = self.lb.engine.results.get(body.get("request_id"))
                label = f"poll|{p.label if p else body.get('request_id')}"
            kind = self.lb.faults.decide(label, polling)
            if kind == "stall" and not polling:
                kind = None  # stalls hold results back; submissions and session calls answer
            if polling and kind == "410" and p is not None and p.done.is_set():
                kind = None  # only a pending result expires
        if self._fault(kind):
            return
        try:
            status, out, ctype = self._route(method, path, body, fb, url.query)
        except _Gone:
            return self._error(410, "promise expired: no such pending request (the service restarted?)")
        except (UnknownPath, KeyError) as e:
            return self._error(404, str(e).strip("'"))
        except Failed as e:
            return self._error(400, str(e))
        except Exception as e:  # noqa: BLE001 - a handler bug answers 500, the service keeps serving
            log.exception("loopback handler failed")
            return self._error(500, f"{type(e).__name__}: {e}")
        if kind == "reset":
            return self._reset()
        if isinstance(out, bytes):
            return self._send(status, out, ctype)
        self._json(out, status)

    def _file(self, path: str) -> None:
        root = self.lb.registry.checkpoints_dir.resolve()
        f = (root / unquote(path[len("/files/") :])).resolve()
        if not f.is_relative_to(root) or not f.is_file():
            return self._error(404, "no such file")
        self._send(200, f.read_bytes(), "application/octet-stream")

    def _poll(self, body: dict):
        p = self.lb.engine.wait(body["request_id"], self.lb.poll_hold_s)
        if p is None:
            raise _Gone()
        if not p.done.is_set():
            return 200, {"type": "try_again", "request_id": body["request_id"], "queue_state": "active"}, None
        if p.error is not None:
            msg = str(p.error)
            if self.lb.echo_key:
                msg = f"{msg} (key {self.headers.get('X-API-Key', '')})"
            return 200, {"error": msg, "category": p.error.category}, None
        return (200, p.proto, PROTO) if p.proto is not None else (200, p.json, None)

    def _route(self, method: str, path: str, body: dict, fb, query: str):
        """(status, JSON object or bytes, content type) for one API call. Long because it is the route table."""
        api, reg = self.lb.api, self.lb.registry
        if path == "/api/v1/retrieve_future":
            return self._poll(body)
        simple = {
            "/api/v1/healthz": lambda: {"status": "ok"},
            "/api/v1/get_server_capabilities": api.capabilities,
            "/api/v1/client/config": lambda: CLIENT_CONFIG,
            "/api/v1/client/dynamic_config": lambda: {"refresh_interval_sec": 300},
            "/api/v1/create_session": lambda: {"type": "create_session", "session_id": reg.new_session(body)},
            "/api/v1/session_heartbeat": lambda: {"type": "session_heartbeat"},
            "/api/v1/telemetry": lambda: {"status": "accepted"},
            "/api/v1/cancel_future": lambda: {},
            "/api/v1/create_model": lambda: api.create_model(body),
            "/api/v1/get_info": lambda: api.get_info(body),
            "/api/v1/forward_backward": lambda: api.forward_backward(fb),
            "/api/v1/optim_step": lambda: api.optim_step(body),
            "/api/v1/save_weights": lambda: api.save_weights(body, "training"),
            "/api/v1/save_weights_for_sampler": lambda: api.save_weights(body, "sampler"),
            "/api/v1/save_weights_external": lambda: api.save_weights(body, "external"),
            "/api/v1/load_weights": lambda: api.load_weights(body),
            "/api/v1/weights_info": lambda: api.weights_info(body),
            "/api/v1/create_sampling_session": lambda: api.create_sampler(body),
            "/api/v1/asample": lambda: api.asample(body),
            "/api/v1/checkpoints": lambda: _listing(reg.checkpoints()),
        }
        if path in simple:
            return 200, simple[path](), None
        if re.fullmatch(r"/api/v1/sessions/[^/]+/finish", path):
            return 200, {}, None
        m = re.fullmatch(r"/api/v1/samplers/([^/]+)", path)
        if m:
            info = reg.sampler(unquote(m[1]))
            if info is None:
                raise UnknownPath(f"sampler {m[1]} not found")
            return 200, {"sampler_id": unquote(m[1]), **info}, None
        m = re.fullmatch(r"/api/v1/training_runs/([^/]+)/checkpoints", path)
        if m:
            return 200, _listing(reg.checkpoints(unquote(m[1]))), None
        m = _CHECKPOINT.fullmatch(unquote(path).removesuffix("/external_weights_urls"))
        if m:
            tinker_path = f"tinker://{m[1]}/{m[2]}/{m[3]}"
            if path.endswith("/external_weights_urls"):
                expires = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
                return 200, {"urls": api.external_files(tinker_path, self.lb.url), "expires": expires}, None
            if method == "DELETE":
                reg.delete_checkpoint(tinker_path)
                return 200, {}, None
        raise UnknownPath(f"{method} {path}: no such endpoint on the loopback service")


class _Gone(Exception):
    pass


def _listing(rows) -> dict:
    return {
        "checkpoints": [r.model_dump(mode="json") for r in rows],
        "cursor": {"offset": 0, "limit": len(rows), "total_count": len(rows)},
    }


def wait_until_up(url: str, timeout: float = 30.0) -> None:
    """Block until something listens at `url` (for a service started in another process)."""
    p = urlparse(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((p.hostname, p.port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
