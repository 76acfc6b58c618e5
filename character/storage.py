"""Files that survive crashes: atomic writes, append-only JSONL, and checkpoint URIs."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

from character.errors import UserError


class DiskFull(UserError):
    """The device filled up (or went read-only) while a build wrote to it. Every write here is whole or
    absent, so what was written before is intact and a rerun of the same build resumes from it."""


_LOW_SPACE = 64 * 1024  # bytes: after a failed write, less than this free means the disk is what failed


def _disk_full(target: Path, exc: BaseException) -> DiskFull | None:
    """The one-line error for a write that failed because the device is full or read-only; None otherwise.
    Torch and safetensors report a full disk in their own exception types, so the free space decides."""
    code = getattr(exc, "errno", None)
    if code == errno.EROFS:
        reason = "the file system became read-only"
    elif code in (errno.ENOSPC, errno.EDQUOT) or _free_bytes(target) < _LOW_SPACE:
        reason = "no space left on the device"
    else:
        return None
    return DiskFull(
        f"{reason} while writing {target}: everything written before is kept; "
        "free some space and run the same command again to resume"
    )


def _free_bytes(path: Path) -> int:
    for folder in (Path(path), *Path(path).parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free
    return 1 << 62


@contextlib.contextmanager
def _one_line_if_disk_full(target: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's "file write failed"
        full = _disk_full(target, e)
        if full is None:
            raise
        raise full from e


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside the target, fsync, then rename over it."""
    path = Path(path)
    with _one_line_if_disk_full(path):
        _write_text_atomic(path, text)


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the target still holds its previous content
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `final` in one rename, on failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        full = (
            _disk_full(final, e) if isinstance(e, (OSError, RuntimeError)) else None
        )  # before the cleanup frees space
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from e
        raise
    try:
        if final.exists():
            old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: Path, rows: dict | list[dict]) -> None:
    """Append finished rows in one write; a crash can at worst leave a torn last line, which readers skip."""
    rows = [rows] if isinstance(rows, dict) else rows
    if not rows:
        return
    path = Path(path)
    with _one_line_if_disk_full(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(path)
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:  # unbuffered, so that nothing is left to be flushed after a failure
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:  # a full disk: take back the part of these rows that made it, keep the rest
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
        finally:
            os.close(fd)


def drop_torn_tail(path: Path) -> None:
    """A crash mid-append can leave half a line; cut it so the next append starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn write from a crash: the row was never finished
                break
            raise UserError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def file_uri(path: Path) -> str:
    return Path(path).resolve().as_uri()


def uri_to_path(uri: str) -> Path:
    """`file://` URIs and plain paths give a local path; anything else is refused clearly."""
    if "://" not in uri:
        return Path(uri)
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise UserError(f"{uri}: not a local checkpoint (expected file:// or a path)")
    return Path(unquote(parsed.path))


def checkpoint_folder(checkpoint: str) -> Path:
    """A local checkpoint (path or file:// URI) that is an adapter folder or a model folder; anything else is
    one UserError. Light on purpose: the command line asks before it loads a model library."""
    path = uri_to_path(checkpoint)
    if not path.is_dir():
        raise UserError(
            f"checkpoint {checkpoint}: not found (give an adapter or model folder, a tinker:// path, 'base' or 'tiny')"
        )
    if not ((path / "adapter_config.json").is_file() or (path / "config.json").is_file()):
        raise UserError(
            f"checkpoint {checkpoint}: neither an adapter folder (adapter_config.json) nor a model folder (config.json)"
        )
    return path
