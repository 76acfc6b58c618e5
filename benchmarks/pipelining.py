"""4. Remote-call pipelining: DPO through a backend that adds a fixed latency to every call.

`LatencyService` wraps the local backend the way a remote service behaves: one server works
through calls in the order they arrive; a call reaches it `latency/2` after it is sent and its
answer comes back `latency/2` after it is done. Our loop (character.train.dpo.run_dpo) sends every
reference log-prob request before waiting on any, and each step's forward/backward and optimizer
step together; the naive loop waits on each call before sending the next. Both run the same
pairs, loss and optimizer, and end with the same adapter (checked).

On Tinker, forward_backward_custom is itself two round trips (forward, then backward with the
loss gradients); here it counts as one call on both sides.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from pathlib import Path

from benchmarks.measure import Row, alternate

LATENCY_S, PAIRS, BATCH, RANK = 0.1, 32, 8, 16


class _Remote:
    """One server thread: calls run in arrival order, each answer delivered after the return trip."""

    def __init__(self, latency: float):
        self.latency = latency
        self.calls = 0
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            sent, fn, fut = self._q.get()
            _sleep_until(sent + self.latency / 2)
            try:
                fut._value, fut._error = fn(), None
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                fut._value, fut._error = None, e
            fut._ready_at = time.perf_counter() + self.latency / 2
            fut._done.set()

    def submit(self, fn) -> "_Future":
        self.calls += 1
        fut = _Future()
        self._q.put((time.perf_counter(), fn, fut))
        return fut

    def call(self, fn):
        return self.submit(fn).result()


class _Future:
    def __init__(self):
        self._done = threading.Event()

    def result(self):
        self._done.wait()
        _sleep_until(self._ready_at)
        if self._error is not None:
            raise self._error
        return self._value


def _sleep_until(t: float) -> None:
    left = t - time.perf_counter()
    if left > 0:
        time.sleep(left)


class _Client:
    def __init__(self, inner, remote: _Remote):
        self._inner, self._remote = inner, remote

    def get_tokenizer(self):
        return self._inner.get_tokenizer()

    def _send(self, name, *args):
        return self._remote.submit(lambda: getattr(self._inner, name)(*args).result())

    def forward_backward_custom(self, data, loss_fn):
        return self._send("forward_backward_custom", data, loss_fn)

    def optim_step(self, adam):
        return self._send("optim_step", adam)

    def save_state(self, name):
        return self._send("save_state", name)

    def save_weights_for_sampler(self, name):
        return self._send("save_weights_for_sampler", name)

    def compute_logprobs(self, prompt):
        return self._send("compute_logprobs", prompt)


class LatencyService:
    def __init__(self, inner, latency: float):
        self._inner, self.remote = inner, _Remote(latency)

    def get_tokenizer(self, base_model):
        return self._inner.get_tokenizer(base_model)

    def create_lora_training_client(self, *args, **kwargs):
        return _Client(self.remote.call(lambda: self._inner.create_lora_training_client(*args, **kwargs)), self.remote)

    def create_sampling_client(self, *args, **kwargs):
        return _Client(self.remote.call(lambda: self._inner.create_sampling_client(*args, **kwargs)), self.remote)

    def create_training_client_from_state_with_optimizer(self, path):
        return _Client(
            self.remote.call(lambda: self._inner.create_training_client_from_state_with_optimizer(path)), self.remote
        )


def _setup(workdir: str, latency: float, pairs: int):
    import torch

    from benchmarks.data import preference_rows
    from character.backend.local import LocalService
    from character.settings import Workspace
    from character.train.loop import OptimConfig
    from character.train.losses import DPOCoefficients
    from character.train.renderer import Renderer

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the server thread does the compute; keep it comparable run to run
    data = Path(workdir) / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(pairs)))
    svc = LatencyService(LocalService(Workspace(workdir), device="cpu"), latency)
    cfg = OptimConfig(learning_rate=5e-5, batch_size=BATCH, save_every=10**9)
    return svc, Renderer(svc.get_tokenizer("tiny")), data, cfg, DPOCoefficients()


def ours(workdir: str, latency: float = LATENCY_S, pairs: int = PAIRS) -> dict:
    from character.train.dpo import run_dpo

    shutil.rmtree(Path(workdir) / "dpo", ignore_errors=True)
    svc, renderer, data, cfg, coef = _setup(workdir, latency, pairs)
    t0 = time.perf_counter()
    result = run_dpo(
        svc,
        start=lambda: svc.create_lora_training_client("tiny", rank=RANK, seed=0),
        reference=lambda: svc.create_sampling_client(base_model="tiny"),
        renderer=renderer,
        data_path=data,
        run_dir=Path(workdir) / "dpo",
        cfg=cfg,
        coef=coef,
        max_length=512,
    )
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "step_seconds": sorted(m["seconds"] for m in result.metrics)[len(result.metrics) // 2],
        "calls": svc.remote.calls,
        "adapter": result.sampler,
    }


def naive(workdir: str, latency: float = LATENCY_S, pairs: int = PAIRS) -> dict:
    """The loop a user writes first: every call awaited before the next is sent."""
    from tinker import types

    from character.storage import read_jsonl
    from character.train.dpo import pair_sequences
    from character.train.loop import batch_order, lr_at
    from character.train.losses import make_dpo_loss_fn
    from character.train.renderer import to_datum

    svc, renderer, data, cfg, coef = _setup(workdir, latency, pairs)
    t0 = time.perf_counter()
    seqs = [pair_sequences(renderer, r, 512) for r in read_jsonl(data)]
    sampler = svc.create_sampling_client(base_model="tiny")
    refs = [
        [float(x) for x in sampler.compute_logprobs(types.ModelInput.from_ints(t)).result()[1:]]
        for pair in seqs
        for t, _ in pair
    ]
    client = svc.create_lora_training_client("tiny", rank=RANK, seed=0)
    batches = batch_order(len(seqs), cfg)
    step_seconds = []
    for step, idx in enumerate(batches):
        t1 = time.perf_counter()
        datums = [to_datum(*s) for i in idx for s in seqs[i]]
        ref = [refs[2 * i + k] for i in idx for k in (0, 1)]
        client.forward_backward_custom(datums, make_dpo_loss_fn(ref, coef)).result()
        client.optim_step(
            types.AdamParams(
                learning_rate=lr_at(step, len(batches), cfg),
                beta1=cfg.beta1,
                beta2=cfg.beta2,
                eps=cfg.eps,
                weight_decay=cfg.weight_decay,
                grad_clip_norm=cfg.grad_clip_norm,
            )
        ).result()
        step_seconds.append(time.perf_counter() - t1)
    client.save_state("final").result()
    adapter = client.save_weights_for_sampler("final").result().path
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "step_seconds": sorted(step_seconds)[len(step_seconds) // 2],
        "calls": svc.remote.calls,
        "adapter": adapter,
    }


def max_difference(a: str, b: str) -> float:
    from safetensors.numpy import load_file

    from character.storage import uri_to_path

    x = load_file(uri_to_path(a) / "adapter_model.safetensors")
    y = load_file(uri_to_path(b) / "adapter_model.safetensors")
    return max(float(abs(x[k] - y[k]).max()) for k in x)


def compare(root: Path, models: Path, repeats: int) -> list[Row]:
    from benchmarks.data import workspace

    wd = {side: str(workspace(root / f"pipelining-{side}", models)) for side in ("ours", "naive")}
    s = alternate({side: (f"benchmarks.pipelining:{side}", dict(workdir=wd[side])) for side in wd}, repeats)
    diff = max_difference(s["ours"].runs[-1]["adapter"], s["naive"].runs[-1]["adapter"])
    name = f"4. remote-call pipelining ({LATENCY_S * 1000:.0f} ms per call, DPO {PAIRS} pairs, batch {BATCH})"
    note = f"{s['ours'].runs[-1]['calls']} calls each side; same final adapter (max abs difference {diff:.1e})"
    return [
        Row(
            name,
            "DPO wall time (reference log-probs + training + save)",
            s["ours"].median("seconds"),
            s["naive"].median("seconds"),
            "naive loop (waits on every call)",
            "s",
            "<= 0.6",
            note,
        ),
        Row(
            name,
            "one training step (forward/backward + optimizer step)",
            s["ours"].median("step_seconds"),
            s["naive"].median("step_seconds"),
            "naive loop (waits on every call)",
            "s",
            "",
            "bounded below by (L + c) / (2L + c) for latency L and server compute c per step; c is this CPU's",
        ),
    ]
