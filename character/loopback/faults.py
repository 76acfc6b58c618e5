"""Faults at the wire, by rate and seed: which HTTP exchange fails, and how.

A decision is a hash of the seed, the exchange's stable label (the endpoint, the training client's
number and sequence number, the poll's iteration: no session ids, which differ from run to run) and
how many times that label has been seen, so one seed fails the same submissions in every run however
the threads interleave (how often a pending result is polled depends on timing, so polls vary a
little). Kinds, as Tinker produces them:
- `500`, `503`: server errors (the SDK retries them, at submission and while polling);
- `429`: rate limited, with `retry-after` (a short one, so tests stay quick);
- `408`: a poll that timed out on the server (the SDK polls again);
- `410`: a result that expired (polling only: the SDK raises `RetryableException` to the caller);
- `reset`: the connection is reset; on a submission after the request was accepted, so the SDK's
  resubmission must not run it twice;
- `stall`: the response never comes within the caller's bound (drawn with its own rate).
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter

SUBMIT_KINDS = ("500", "503", "429", "408", "reset")
POLL_KINDS = ("500", "503", "429", "408", "410", "reset")


class WireFaults:
    def __init__(self, rate: float = 0.0, seed: int = 0, stall_rate: float = 0.0, only: tuple[str, ...] = ()):
        if not (0.0 <= rate < 1.0 and 0.0 <= stall_rate < 1.0):
            raise ValueError("fault and stall rates must be in [0, 1)")
        self.rate, self.seed, self.stall_rate = rate, seed, stall_rate
        self.only = tuple(only)
        self._seen: Counter = Counter()
        self._lock = threading.Lock()
        self.injected: Counter = Counter()

    @property
    def exchanges(self) -> int:
        """How many exchanges were drawn for (faulted or not)."""
        return sum(self._seen.values())

    def _draw(self, label: str, attempt: int, salt: str) -> float:
        h = hashlib.sha256(f"{self.seed}|{salt}|{label}|{attempt}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    def decide(self, label: str, polling: bool) -> str | None:
        """The fault for this exchange, or None."""
        if not (self.rate or self.stall_rate):
            return None
        with self._lock:
            attempt = self._seen[label]
            self._seen[label] += 1
        kind = None
        if self.stall_rate and self._draw(label, attempt, "stall") < self.stall_rate:
            kind = "stall"
        elif self.rate and self._draw(label, attempt, "fault") < self.rate:
            kinds = [k for k in (POLL_KINDS if polling else SUBMIT_KINDS) if not self.only or k in self.only]
            kind = kinds[int(self._draw(label, attempt, "kind") * len(kinds))] if kinds else None
        if kind:
            with self._lock:
                self.injected[kind] += 1
        return kind
