"""Reading back what W&B wrote in offline mode: the records of a run's .wandb file, no network.

The file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
header: CRC, length, type) of wandb's protobuf `Record`s; wandb ships no Python reader of its own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK, _FULL, _FIRST, _LAST = 32 * 1024, 1, 2, 4


def records(path: Path) -> list:
    """Every Record in one run's .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding
            pos += room
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def offline_runs(wandb_dir: Path) -> dict[str, list[Path]]:
    """Run id -> its offline run folders, oldest first (a resumed run writes a new folder, same id).
    `run.finish()` may return before wandb's service has written the run's last records: stopping the
    service first (it starts again at the next `wandb.init`) makes the files complete."""
    import wandb

    wandb.teardown()
    runs: dict[str, list[Path]] = {}
    for folder in sorted(Path(wandb_dir).glob("wandb/offline-run-*")):
        # the run file names the id: the folder's name gets a "-1" when two runs of one id start in one second
        run_id = next(folder.glob("run-*.wandb")).stem.removeprefix("run-")
        runs.setdefault(run_id, []).append(folder)
    return runs


def history(folder: Path) -> list[dict]:
    """The history rows logged in one offline run folder, values decoded."""
    rows = []
    for rec in records(next(folder.glob("run-*.wandb"))):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def run_info(folder: Path):
    """The run record (id, group, job type, config) of one offline run folder."""
    for rec in records(next(folder.glob("run-*.wandb"))):
        if rec.WhichOneof("record_type") == "run":
            return rec.run
    raise AssertionError(f"no run record in {folder}")
