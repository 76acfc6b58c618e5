"""What the loopback service keeps on disk: sessions, sampling sessions, training runs and checkpoints.

Everything lives under the state folder: `registry.json` (written atomically on every change) and
`checkpoints/<run>/{weights,sampler_weights,external_weights}/<name>`, the local backend's layout.
A restarted service reads the registry back, so saved checkpoints, sessions and sampling sessions
survive; live training runs and results still pending do not (as on Tinker, a run resumes from
its last saved state).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from tinker import types

from character.storage import write_json_atomic

SEGMENTS = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}


class UnknownPath(ValueError):
    """A tinker:// path this service has no checkpoint for."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.checkpoints_dir = self.root / "checkpoints"
        self.file = self.root / "registry.json"
        self._lock = threading.RLock()
        self.data = {"sessions": {}, "samplers": {}, "runs": {}, "checkpoints": {}, "restarts": 0}
        if self.file.is_file():
            self.data.update(json.loads(self.file.read_text()))
            self.data["restarts"] += 1
        self.root.mkdir(parents=True, exist_ok=True)
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.file, self.data)

    def _put(self, table: str, key: str, value: dict) -> None:
        with self._lock:
            self.data[table][key] = value
            self._save()

    # -- sessions and sampling sessions -------------------------------------------------------
    def new_session(self, metadata: dict) -> str:
        sid = f"lb{uuid.uuid4().hex[:10]}"
        self._put("sessions", sid, {"created": time.time(), "metadata": metadata})
        return sid

    def has_session(self, sid: str) -> bool:
        return sid in self.data["sessions"]

    def new_sampler(self, session_id: str, seq: int, base_model: str, model_path: str | None) -> str:
        sampler_id = f"{session_id}:sample:{seq}"
        self._put("samplers", sampler_id, {"base_model": base_model, "model_path": model_path})
        return sampler_id

    def sampler(self, sampler_id: str) -> dict | None:
        return self.data["samplers"].get(sampler_id)

    # -- runs and checkpoints ------------------------------------------------------------------
    def put_run(self, run_id: str, info: dict) -> None:
        self._put("runs", run_id, {**info, "created": time.time()})

    def run(self, run_id: str) -> dict | None:
        return self.data["runs"].get(run_id)

    def folder(self, run_id: str, kind: str, name: str) -> Path:
        return self.checkpoints_dir / run_id / SEGMENTS[kind] / name

    def add_checkpoint(self, run_id: str, kind: str, name: str) -> str:
        path = f"tinker://{run_id}/{SEGMENTS[kind]}/{name}"
        folder = self.folder(run_id, kind, name)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        self._put("checkpoints", path, {"run": run_id, "type": kind, "time": now_iso(), "size_bytes": size})
        return path

    def resolve(self, tinker_path: str) -> tuple[types.ParsedCheckpointTinkerPath, Path]:
        """The parsed path and its folder on disk; UnknownPath if this service never saved it."""
        try:
            parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        except ValueError as e:
            raise UnknownPath(str(e)) from None
        folder = self.folder(parsed.training_run_id, parsed.checkpoint_type, parsed.checkpoint_id.split("/", 1)[1])
        if tinker_path not in self.data["checkpoints"] or not folder.is_dir():
            raise UnknownPath(f"checkpoint {tinker_path} not found")
        return parsed, folder

    def delete_checkpoint(self, tinker_path: str) -> None:
        _, folder = self.resolve(tinker_path)
        shutil.rmtree(folder, ignore_errors=True)
        with self._lock:
            self.data["checkpoints"].pop(tinker_path, None)
            self._save()

    def checkpoints(self, run_id: str | None = None) -> list[types.Checkpoint]:
        out = []
        for path, info in sorted(self.data["checkpoints"].items()):
            if run_id is not None and info["run"] != run_id:
                continue
            parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(path)
            out.append(
                types.Checkpoint(
                    checkpoint_id=parsed.checkpoint_id,
                    checkpoint_type=info["type"],
                    time=info["time"],
                    tinker_path=path,
                    size_bytes=info.get("size_bytes"),
                )
            )
        return out
