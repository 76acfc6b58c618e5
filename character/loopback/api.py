"""What each Tinker API call does on the loopback service, on JSON bodies as the SDK sends them.

Calls that Tinker answers with a future (`create_model`, `forward_backward`, `optim_step`,
`save_weights*`, `load_weights`, `asample`) return `{"request_id": ...}` at once and queue the work
on the engine; the rest answer directly. Every served model name runs the embedded `tiny` model;
its tokenizer id is the model's local folder, so the SDK's `get_tokenizer()` needs no Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tinker import types

from character.backend.local_model import resolve_model
from character.loopback.engine import Engine, Failed
from character.loopback.registry import Registry, UnknownPath
from character.loopback.wire import ForwardBackward, forward_backward_output, sample_response
from character.storage import atomic_dir, file_uri

# Tinker chooses LoRA alpha itself, whatever the caller configures; the export's adapter_config.json
# records it. The loopback fixes it the same way, so a build sees the same mismatch it would on Tinker.
LORA_ALPHA = 32
CONTEXT_LENGTH = 2048


class Api:
    def __init__(self, registry: Registry, engine: Engine, served: list[str]):
        self.registry, self.engine = registry, engine
        self.served = list(served)
        self.models: dict[str, object] = {}  # model_id -> LocalTrainingClient (live runs; lost on restart)
        self._samplers: dict[str, object] = {}  # model path or base name -> LocalSamplingClient

    # -- capabilities and models ----------------------------------------------------------------
    def capabilities(self) -> dict:
        rows = [
            {"model_name": n, "max_context_length": CONTEXT_LENGTH, "trainable": True, "sampleable": True}
            for n in self.served
        ]
        return {"supported_models": rows}

    def _local_name(self, name: str | None) -> str:
        if name not in self.served:
            raise Failed(f"model {name!r} is not served here (served: {', '.join(self.served)})")
        return "tiny"

    def model_folder(self) -> Path:
        return resolve_model("tiny", self.engine.local.ws)

    def _client(self, model_id: str):
        client = self.models.get(model_id)
        if client is None:
            # Live runs are in memory: after a restart the run is gone, and the caller resumes from a save.
            raise Failed(
                f"training run {model_id} is not loaded (the service restarted?); resume from a saved state", "server"
            )
        return client

    def _adopt(self, client, model_id: str, info: dict) -> None:
        client.meta["run"] = model_id
        client.run_dir = self.registry.checkpoints_dir / model_id
        self.models[model_id] = client
        self.registry.put_run(model_id, info)

    def create_model(self, body: dict) -> dict:
        lora = body.get("lora_config") or {}
        base = body["base_model"]
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"

        def run() -> dict:
            self._local_name(base)
            rank = int(lora.get("rank", 32))
            flags = {k: bool(lora.get(k, True)) for k in ("train_mlp", "train_attn", "train_unembed")}
            client = self.engine.local.create_lora_training_client(
                "tiny", rank=rank, seed=lora.get("seed"), alpha=LORA_ALPHA, **flags
            )
            self._adopt(client, model_id, {"base_model": base, "rank": rank, **flags, "from": None})
            return {"model_id": model_id, "type": "create_model"}

        key = ("create", body["session_id"], body["model_seq_id"])
        return {"request_id": self.engine.submit(key, f"create:{body['model_seq_id']}", run), "model_id": model_id}

    def get_info(self, body: dict) -> dict:
        run = self.registry.run(body["model_id"])
        if run is None:
            raise UnknownPath(f"model {body['model_id']} not found")
        data = {"arch": "llama", "model_name": run["base_model"], "tokenizer_id": str(self.model_folder())}
        return {
            "type": "get_info",
            "model_id": body["model_id"],
            "model_data": data,
            "is_lora": True,
            "lora_rank": run["rank"],
            "model_name": run["base_model"],
        }

    # -- training -----------------------------------------------------------------------------
    def forward_backward(self, req: ForwardBackward) -> dict:
        def run() -> bytes:
            if req.loss_fn != "cross_entropy":
                raise Failed(f"loss {req.loss_fn!r} is not supported here (only cross_entropy)")
            client = self._client(req.model_id)
            if req.forward_only:
                with torch.no_grad():
                    lps = client._logprobs(client._sequences(req.data), grad=False)
                lps = [lp.detach().float().cpu().numpy() for lp in lps]
                metrics = {"loss:sum": 0.0}
            else:
                out = client.forward_backward(req.data, "cross_entropy").result()
                lps = [o["logprobs"].to_numpy().astype(np.float32) for o in out.loss_fn_outputs]
                metrics = dict(out.metrics)
            losses = [-lp * d.loss_fn_inputs["weights"].to_numpy() for lp, d in zip(lps, req.data)]
            if req.forward_only:
                metrics["loss:sum"] = float(sum(x.sum() for x in losses))
            return forward_backward_output(lps, losses, metrics)

        kind = "fwd" if req.forward_only else "fwdbwd"
        label = f"{kind}:{_run_label(req.model_id)}:{req.seq_id}"
        return {"request_id": self.engine.submit(("train", req.model_id, req.seq_id), label, run)}

    def optim_step(self, body: dict) -> dict:
        params = types.AdamParams(**(body.get("adam_params") or {}))
        model_id = body["model_id"]

        def run() -> dict:
            out = self._client(model_id).optim_step(params).result()
            return {"metrics": {"grad_norm": float(out["grad_norm"])}}

        label = f"optim:{_run_label(model_id)}:{body.get('seq_id')}"
        return {"request_id": self.engine.submit(("train", model_id, body.get("seq_id")), label, run)}

    # -- checkpoints ----------------------------------------------------------------------------
    def save_weights(self, body: dict, kind: str) -> dict:
        model_id = body["model_id"]
        name = body.get("path") or f"ephemeral-{body.get('sampling_session_seq_id')}"

        def run() -> dict:
            client = self._client(model_id)
            if kind == "training":
                client.save_state(name).result()
            elif kind == "sampler":
                client.save_weights_for_sampler(name).result()
            else:
                self._export(client, self.registry.folder(model_id, "external", name))
            path = self.registry.add_checkpoint(model_id, kind, name)
            if kind == "sampler" and not body.get("path"):  # an unnamed save opens a sampling session
                session = model_id.split(":train:")[0]
                base = self.registry.run(model_id)["base_model"]
                sid = self.registry.new_sampler(session, body["sampling_session_seq_id"], base, path)
                return {"sampling_session_id": sid, "type": "save_weights_for_sampler"}
            return {"path": path, "type": _SAVE_TYPE[kind]}

        label = f"save-{kind}:{_run_label(model_id)}:{body.get('seq_id')}"
        return {"request_id": self.engine.submit(("train", model_id, body.get("seq_id")), label, run)}

    def _export(self, client, folder: Path) -> None:
        """The adapter with Tinker's tensor names and the alpha Tinker used (what `save_weights_external` gives)."""
        from safetensors.torch import load_file, save_file

        from character.weights.tinker_export import tinker_name

        with atomic_dir(folder) as tmp:
            client.model.save_pretrained(tmp / "peft", safe_serialization=True, save_embedding_layers=False)
            tensors = load_file(str(tmp / "peft" / "adapter_model.safetensors"))
            peft_cfg = json.loads((tmp / "peft" / "adapter_config.json").read_text())
            lora = {tinker_name(k): v for k, v in tensors.items() if ".lora_" in k}  # not a tied head's copy
            save_file(lora, str(tmp / "adapter_model.safetensors"))
            cfg = {
                "r": peft_cfg["r"],
                "lora_alpha": peft_cfg["lora_alpha"],
                "base_model": client.meta.get("base_model"),
            }
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
            for f in (tmp / "peft").iterdir():
                f.unlink()
            (tmp / "peft").rmdir()

    def load_weights(self, body: dict) -> dict:
        """Into a new training client (session_id + model_seq_id) or an existing one (model_id)."""
        path, with_opt = body["path"], bool(body.get("optimizer"))
        if body.get("model_id"):
            model_id, key = body["model_id"], ("train", body["model_id"], body.get("seq_id"))
        else:
            model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
            key = ("create", body["session_id"], body["model_seq_id"])

        def run() -> dict:
            try:
                parsed, folder = self.registry.resolve(path)
            except UnknownPath as e:
                raise Failed(str(e)) from None
            if parsed.checkpoint_type != "training":
                raise Failed(f"{path} is not a training state (tinker://<run>/weights/<name>)")
            uri = file_uri(folder)
            local = self.engine.local
            client = (
                local.create_training_client_from_state_with_optimizer(uri)
                if with_opt
                else local.create_training_client_from_state(uri)
            )
            source = self.registry.run(parsed.training_run_id) or {}
            info = {k: source.get(k) for k in ("base_model", "rank", "train_mlp", "train_attn", "train_unembed")}
            self._adopt(client, model_id, {**info, "from": path, "optimizer": with_opt})
            return {"path": path, "model_id": model_id, "type": "load_weights"}

        return {"request_id": self.engine.submit(key, f"load:{path.rsplit('/', 1)[-1]}", run), "model_id": model_id}

    def weights_info(self, body: dict) -> dict:
        parsed, _ = self.registry.resolve(body["tinker_path"])
        run = self.registry.run(parsed.training_run_id) or {}
        return {
            "base_model": run.get("base_model", self.served[0]),
            "is_lora": True,
            "lora_rank": run.get("rank"),
            **{k: run.get(k) for k in ("train_mlp", "train_attn", "train_unembed")},
        }

    def external_files(self, tinker_path: str, base_url: str) -> dict[str, str]:
        _, folder = self.registry.resolve(tinker_path)
        rel = folder.relative_to(self.registry.checkpoints_dir)
        return {f.name: f"{base_url}/files/{rel}/{f.name}" for f in sorted(folder.iterdir()) if f.is_file()}

    # -- sampling -----------------------------------------------------------------------------
    def create_sampler(self, body: dict) -> dict:
        path, base = body.get("model_path"), body.get("base_model")
        if path:
            try:
                parsed, _ = self.registry.resolve(path)
            except UnknownPath as e:
                raise Failed(str(e)) from None
            base = (self.registry.run(parsed.training_run_id) or {}).get("base_model", self.served[0])
        else:
            self._local_name(base)
        sid = self.registry.new_sampler(body["session_id"], body["sampling_session_seq_id"], base, path)
        return {"type": "create_sampling_session", "sampling_session_id": sid}

    def _sampler(self, sampler_id: str):
        info = self.registry.sampler(sampler_id)
        if info is None:
            raise Failed(f"sampling session {sampler_id} not found")
        key = info["model_path"] or info["base_model"]
        if key not in self._samplers:
            if len(self._samplers) >= 4:  # a few models in memory at most
                self._samplers.pop(next(iter(self._samplers)))
            if info["model_path"]:
                _, folder = self.registry.resolve(info["model_path"])
                self._samplers[key] = self.engine.local.create_sampling_client(model_path=file_uri(folder))
            else:
                self._samplers[key] = self.engine.local.create_sampling_client(base_model="tiny")
        return self._samplers[key]

    def asample(self, body: dict) -> dict:
        sampler_id, seq = body["sampling_session_id"], body.get("seq_id")
        prompt = types.ModelInput.model_validate(body["prompt"])
        params = types.SamplingParams.model_validate(body.get("sampling_params") or {})
        n, want_prompt = int(body.get("num_samples", 1)), bool(body.get("prompt_logprobs"))

        def submit():
            client = self._sampler(sampler_id)
            fut = client.sample(prompt, n, params)
            lp = client.compute_logprobs(prompt) if want_prompt else None
            return lambda: sample_response(fut.result().sequences, lp.result() if lp else None)

        label = f"sample:{sampler_id.rsplit(':', 1)[-1]}:{seq}"
        rid = self.engine.submit(("sample", sampler_id, seq), label, submit, sample=True)
        return {"request_id": rid, "sample_sequence_ids": [f"{rid}-{j}" for j in range(n)]}


_SAVE_TYPE = {"training": "save_weights", "sampler": "save_weights_for_sampler", "external": "save_weights_external"}


def _run_label(model_id: str) -> str:
    """`<session>:train:<n>` without the session, which differs from run to run."""
    return model_id.rsplit(":", 1)[-1]
