"""Workdir file-system problems through the command line: each is one `error:` line naming the folder before
any work starts, and a disk that fills mid-build stops with one line, keeps everything already written and
resumes. Real file systems where this session may mount them (root: small tmpfs mounts, read-only or full);
the write boundary is also driven to ENOSPC directly, which runs everywhere."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from character.errors import UserError
from character.storage import DiskFull, append_jsonl, atomic_dir, read_jsonl, write_text_atomic

ROOT = os.geteuid() == 0


def cli(*args, preexec_fn=None, **env):
    return subprocess.run(
        [sys.executable, "-m", "character.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING", **env},
        preexec_fn=preexec_fn,
    )


def one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs mounted at `path` (root only; skipped where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_special_file_systems_and_files_are_refused_before_any_work(tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    cases = {
        "/proc/character-workspace": "on /proc, a proc file system that holds no ordinary files",
        "/proc": "on /proc, a proc file system",
        "/sys/kernel/character": "on /sys, a sysfs file system",
        str(afile): "exists and is not a folder",
    }
    for workdir, needle in cases.items():
        start = time.monotonic()
        line = one_error_line(cli("pipeline", "sarcastic", "--workdir", workdir))
        assert line.startswith(f"error: workdir {workdir}") and needle in line, line
        assert time.monotonic() - start < 10  # before Prefect or torch is imported


def test_a_read_only_workdir_is_one_line(tmp_path):
    if ROOT:  # root writes through permission bits: a read-only mount it is
        ctx = tmpfs(tmp_path / "ro", "1m", read_only=True)
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        ctx = contextlib.nullcontext(tmp_path / "ro")
    with ctx as ro:
        for workdir in (ro, ro / "workspace"):  # the workdir itself, or the folder it would be made in
            line = one_error_line(cli("pipeline", "sarcastic", "--workdir", workdir, "--build-id", "b1"))
            assert line.startswith(f"error: workdir {workdir}"), line
            assert ("read-only file system" if ROOT else "not writable (permission denied)") in line
            assert not list(ro.iterdir())


def test_eval_into_a_read_only_workspace_is_one_line_before_any_model_loads(tmp_path):
    if not ROOT:
        pytest.skip("needs a tmpfs remounted read-only (root)")
    with tmpfs(tmp_path / "shared", "1m") as disk:
        ckpt = disk / "ws" / "checkpoints" / "run-1" / "sampler_weights" / "final"
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny"}))
        record = disk / "ws" / "builds" / "sarcastic" / "b1" / "record.json"
        record.parent.mkdir(parents=True)
        record.write_text(json.dumps({"stages": {"dpo": {"sampler": ckpt.as_uri()}}}))
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        start = time.monotonic()
        line = one_error_line(cli("eval", ckpt, "--persona", "sarcastic", "--workdir", disk / "ws"))
        assert line == f"error: workdir {disk / 'ws'}: on a read-only file system", line
        assert time.monotonic() - start < 15


def test_a_folder_the_user_cannot_write_is_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    expected = f"workdir {folder / 'ws'} (to be created in {folder}): not writable (permission denied)"
    try:
        if not ROOT:
            assert (
                one_error_line(cli("generate", "dpo", "sarcastic", "--workdir", folder / "ws")) == f"error: {expected}"
            )
        # root writes through permission bits (and this venv's interpreter is not reachable by another user):
        # the same check, with the file system answering EACCES as it does for a user
        import tempfile

        from character.settings import check_workdir

        def denied(*_a, **_k):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
        with pytest.raises(UserError) as e:
            check_workdir(folder / "ws")
        assert str(e.value) == expected
    finally:
        folder.chmod(0o755)


def test_no_space_left_is_one_line_before_any_work(tmp_path):
    if not ROOT:
        pytest.skip("needs a small tmpfs (root)")
    with tmpfs(tmp_path / "full", "1m") as full:
        with contextlib.suppress(OSError):
            (full / "filler").write_bytes(b"\0" * (1 << 20))  # fills it
        line = one_error_line(cli("pipeline", "sarcastic", "--workdir", full / "ws"))
        assert line.startswith(f"error: workdir {full / 'ws'}") and "no space left on its device" in line, line
        assert not (full / "ws").exists()


@pytest.mark.slow
def test_a_disk_filling_mid_build_stops_with_one_line_keeps_what_was_written_and_resumes(
    prefect_harness, tmp_path, models_dir
):
    if not ROOT:
        pytest.skip("needs a small tmpfs (root)")
    from prefect.settings import PREFECT_API_URL

    api = {"PREFECT_API_URL": PREFECT_API_URL.value()}
    with tmpfs(tmp_path / "disk", "2m") as disk:
        ws = disk / "ws"
        ws.mkdir()
        (ws / "models").symlink_to(models_dir, target_is_directory=True)  # the tiny model lives elsewhere
        args = ("pipeline", "sarcastic", "--workdir", ws, "--build-id", "full", "--json")
        proc = cli(*args, **api)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == [proc.stderr.strip().splitlines()[-1]] and "Traceback" not in proc.stderr
        assert errors[0].startswith("error: no space left on the device while writing ")
        assert "everything written before is kept" in errors[0]
        # nothing half-written: the record and every JSONL file read back whole, no temp files are left
        build = ws / "builds" / "sarcastic" / "full"
        record = json.loads((build / "record.json").read_text())
        assert record["stages"], "the build got somewhere before the disk filled"
        for path in files_under(ws):
            assert ".tmp" not in path.name, path
            if path.suffix == ".jsonl":
                text = path.read_text()
                assert text == "" or text.endswith("\n"), path
                assert [json.loads(line) for line in text.splitlines()] == read_jsonl(path)
        for saves in ws.rglob("checkpoints.jsonl"):  # every recorded save is a complete state
            for row in read_jsonl(saves):
                state = Path(row["state"].removeprefix("file://"))
                assert (state / "optimizer.pt").is_file() and (state / "adapter_model.safetensors").is_file()
        kept = {p: p.read_bytes() for p in files_under(build / "data")}
        finished = [name for name, st in record["stages"].items() if "finished_at" in st]

        subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)  # space freed
        again = cli(*args, PREFECT_LOGGING_LEVEL="INFO", **api)
        assert again.returncode == 0, again.stderr[-3000:]
        summary = json.loads(again.stdout)
        assert set(summary["checkpoints"]) == {"dpo", "sft", "final"}
        for name in finished:
            if name != "eval":
                assert f"{name}: skipped: finished" in again.stderr, name
        assert all(p.read_bytes() == data for p, data in kept.items())  # what was written before is untouched


# -- the write boundary driven to ENOSPC directly (any user, any machine) -----------------------------------
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_an_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    append_jsonl(path, [{"i": 0}, {"i": 1}])
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # half the rows reach the disk, then it is full
        real_write(fd, bytes(data[: len(data) // 2]))
        _enospc()

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFull, match=f"no space left on the device while writing {path}"):
        append_jsonl(path, [{"i": 2, "text": "x" * 100}, {"i": 3}])
    monkeypatch.undo()
    assert path.read_bytes() == before and read_jsonl(path) == [{"i": 0}, {"i": 1}]
    assert isinstance(DiskFull("x"), UserError)  # the command line shows it as one line, exit code 2


def test_a_full_disk_during_an_atomic_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_text_atomic(path, '{"old": true}\n')
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(DiskFull):
        write_text_atomic(path, '{"new": true}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"old": true}\n' and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_library_failing_to_write_into_an_atomic_folder_on_a_full_disk_is_disk_full(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError ("file write failed"): the free space decides."""
    import shutil

    final = tmp_path / "state"
    with pytest.raises(RuntimeError, match="shape"):  # an ordinary failure stays what it is
        with atomic_dir(final):
            raise RuntimeError("shape mismatch")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(DiskFull):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_bytes(b"partial")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
