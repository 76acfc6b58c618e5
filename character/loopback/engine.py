"""Where the loopback service computes: requests become pending results, run in order by the local
backend on the embedded model, and are fetched by request id.

Two worker threads: one runs every training request in arrival order (the SDK submits a training
client's requests strictly in sequence), the other runs sampling, draining whatever has queued up
into one batch as the local sampling client likes. A request submitted again under the same
(client, sequence number), as the SDK does when a response was lost, gets its first request id
back and is not run twice.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from character.backend.local import LocalService
from character.loopback.registry import Registry


class Failed(Exception):
    """A request that ran and failed; `category` is Tinker's (user: do not retry; server: may retry)."""

    def __init__(self, message: str, category: str = "user"):
        super().__init__(message)
        self.category = category


@dataclass
class Pending:
    label: str  # stable across runs (no session ids): the wire faults are drawn from it
    done: threading.Event = field(default_factory=threading.Event)
    json: dict | None = None
    proto: bytes | None = None
    error: Failed | None = None


class _Space:
    """The two folders LocalService uses from a Workspace."""

    def __init__(self, models: Path, checkpoints: Path):
        self.models, self.checkpoints, self.root = Path(models), Path(checkpoints), Path(checkpoints).parent


class Engine:
    def __init__(self, registry: Registry, models_dir: Path, device: str = "cpu", seed: int = 0):
        self.registry = registry
        self.local = LocalService(_Space(models_dir, registry.checkpoints_dir), device=device, seed=seed)
        self.results: dict[str, Pending] = {}
        self._seen: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self._queues = {"train": queue.Queue(), "sample": queue.Queue()}
        self._stop = threading.Event()
        self._next_id = 0
        self._workers = [
            threading.Thread(target=self._train_loop, name="loopback-train", daemon=True),
            threading.Thread(target=self._sample_loop, name="loopback-sample", daemon=True),
        ]
        for w in self._workers:
            w.start()

    def close(self) -> None:
        self._stop.set()
        for q in self._queues.values():
            q.put(None)

    # -- submission and retrieval ---------------------------------------------------------------
    def submit(self, key: tuple, label: str, fn: Callable[[], Any], sample: bool = False) -> str:
        """A request id for `fn`; the same `key` again returns the first id without running it twice.

        `fn` returns a JSON-able dict, or bytes for a protobuf result, or raises Failed."""
        with self._lock:
            if key in self._seen:
                return self._seen[key]
            self._next_id += 1
            rid = f"req-{self._next_id}-{self.registry.data['restarts']}"
            self._seen[key] = rid
            self.results[rid] = p = Pending(label)
        self._queues["sample" if sample else "train"].put((p, fn))
        return rid

    def done_now(self, key: tuple, label: str, value: dict) -> str:
        """A request whose result is known at once (still fetched as a future, as on Tinker)."""
        return self.submit(key, label, lambda: value)

    def wait(self, rid: str, timeout: float) -> Pending | None:
        p = self.results.get(rid)
        if p is not None:
            p.done.wait(timeout)
        return p

    @staticmethod
    def _run(p: Pending, fn) -> None:
        try:
            out = fn()
            if isinstance(out, bytes):
                p.proto = out
            else:
                p.json = out
        except Failed as e:
            p.error = e
        except Exception as e:  # noqa: BLE001 - a bug or bad input surfaces as a failed request, not a dead worker
            p.error = Failed(f"{type(e).__name__}: {e}", "user" if isinstance(e, ValueError) else "server")
        p.done.set()

    def _train_loop(self) -> None:
        q = self._queues["train"]
        while not self._stop.is_set():
            job = q.get()
            if job is None:
                return
            self._run(*job)

    def _sample_loop(self) -> None:
        """Sampling jobs submit to their local clients first and are waited on after, so what queued
        up together runs as padded batches."""
        q = self._queues["sample"]
        while not self._stop.is_set():
            job = q.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < 256:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop.set()
                    break
                batch.append(nxt)
            staged = []
            for p, fn in batch:  # fn() submits and returns a finisher
                try:
                    staged.append((p, fn()))
                except Exception as e:  # noqa: BLE001 - reported as that request's failure
                    staged.append((p, _raiser(e)))
            for p, finish in staged:
                self._run(p, finish)


def _raiser(e: Exception):
    def finish():
        raise e

    return finish
