"""The embedded tiny model is built once per user, not once per workspace, and once when two start at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from character.backend.local_model import resolve_model
from character.backend.tiny import recipe_digest
from character.settings import Workspace, model_cache


def test_the_cache_follows_xdg_and_the_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("CHARACTER_MODEL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache() == tmp_path / "home" / ".cache" / "character" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: a relative path is ignored
    assert model_cache() == tmp_path / "home" / ".cache" / "character" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache() == tmp_path / "xdg" / "character" / "models"
    monkeypatch.setenv("CHARACTER_MODEL_CACHE", str(tmp_path / "mine"))
    assert model_cache() == tmp_path / "mine"


def test_a_workspace_copy_from_before_the_shared_cache_is_used_as_it_is(tmp_path, monkeypatch, models_dir):
    monkeypatch.setenv("CHARACTER_MODEL_CACHE", str(tmp_path / "empty-cache"))
    ws = Workspace(tmp_path / "ws")
    ws.models.mkdir(parents=True)
    (ws.models / f"tiny-{recipe_digest()}").symlink_to(models_dir / f"tiny-{recipe_digest()}")
    assert resolve_model("tiny", ws) == ws.models / f"tiny-{recipe_digest()}"
    assert not (tmp_path / "empty-cache").exists()  # nothing built, not even the lock


@pytest.mark.slow
def test_a_second_workspace_does_not_rebuild_the_tiny_model(tmp_path, models_dir):
    """Two fresh workspaces (no models/ of their own) sample from `tiny` through the CLI: both use the one
    model in the user cache (CHARACTER_MODEL_CACHE, set for every test by conftest), which stays untouched."""
    tiny = models_dir / f"tiny-{recipe_digest()}"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [tiny, *tiny.iterdir()]}
    for name in ("first", "second"):
        ws = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "character.cli", "sample", "base", "--prompt", "Hi", "--max-new-tokens", "4"]
            + ["--json", "--workdir", str(ws)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "CHARACTER_BACKEND": "local", "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)["answers"]) == 1
        assert "building the tiny model" not in proc.stderr
        assert not list(ws.glob("models/tiny-*"))  # nothing copied or built into the workspace
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [tiny, *tiny.iterdir()]} == before


_RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import character.backend.tiny as tiny

    def slow_build(out):  # the real build takes minutes; this one is slow enough for the other to arrive
        with open(sys.argv[2], "a") as log:
            log.write("built\\n")
        time.sleep(1.5)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    tiny.build_tiny_model = slow_build
    tiny.shipped_digest = lambda: None  # as for a recipe with no shipped copy: each racer would build
    Path(sys.argv[3]).touch()
    while len(list(Path(sys.argv[3]).parent.glob("ready-*"))) < 2:  # start together
        time.sleep(0.01)
    print(tiny.tiny_model_path(Path(sys.argv[1])))
    """
)


def test_two_first_runs_at_once_build_it_once(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    (tmp_path / "sync").mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(cache), str(log), str(tmp_path / "sync" / f"ready-{i}")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(cache / f"tiny-{recipe_digest()}")] * 2
    assert log.read_text() == "built\n"  # one build; the other waited for it and used it


# -- the shipped copy -------------------------------------------------------------------------------
def test_the_shipped_model_belongs_to_the_current_recipe():
    from character.backend.tiny import SHIPPED, shipped_digest

    assert shipped_digest() == recipe_digest(), "the recipe changed: rebuild with `character tiny build --ship`"
    recorded = json.loads((SHIPPED / "character_recipe.json").read_text())
    from character.backend.tiny_recipe import TINY_RECIPE

    assert recorded["recipe"] == TINY_RECIPE


def test_an_empty_cache_gets_the_shipped_copy_and_builds_nothing(tmp_path, monkeypatch):
    import character.backend.tiny as tiny

    def no_build(out):
        raise AssertionError("built although the shipped model is the current recipe's")

    monkeypatch.setattr(tiny, "build_tiny_model", no_build)
    path = tiny.tiny_model_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / f"tiny-{recipe_digest()}"
    shipped = {f.name: f.read_bytes() for f in tiny.SHIPPED.iterdir()}
    assert {f.name: f.read_bytes() for f in path.iterdir()} == shipped
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(path).chat_template == tiny.CHAT_TEMPLATE
    assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size == 2048


def test_a_shipped_model_of_another_recipe_is_not_used(tmp_path, monkeypatch):
    import character.backend.tiny as tiny

    monkeypatch.setattr(tiny, "shipped_digest", lambda: "0123456789ab")
    built = []

    def fake_build(out):
        built.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(tiny, "build_tiny_model", fake_build)
    path = tiny.tiny_model_path(tmp_path / "cache")
    assert built == [path] and sorted(f.name for f in path.iterdir()) == ["config.json"]


def test_tiny_check_says_whether_the_shipped_copy_is_current(tmp_path):
    env = {**os.environ, "CHARACTER_MODEL_CACHE": str(tmp_path / "cache")}
    ok = subprocess.run(
        [sys.executable, "-m", "character.cli", "tiny", "check"], capture_output=True, text=True, env=env, timeout=120
    )
    assert ok.returncode == 0 and f"digest {recipe_digest()}" in ok.stdout, ok.stderr
    stale = textwrap.dedent(
        """
        import sys
        import character.backend.tiny as tiny
        tiny.shipped_digest = lambda: "0123456789ab"
        from character.cli import main
        sys.argv = ["character", "tiny", "check"]
        main()
        """
    )
    bad = subprocess.run([sys.executable, "-c", stale], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1, bad.stderr
    assert "from recipe 0123456789ab" in bad.stdout and "character tiny build --ship" in bad.stdout


@pytest.mark.parametrize("device, says", [("tpu", "use cpu or cuda"), ("cuda", "no CUDA device here")])
def test_tiny_build_refuses_a_device_it_cannot_use_before_building(tmp_path, device, says):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    env = {**os.environ, "CHARACTER_MODEL_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, "-m", "character.cli", "tiny", "build", "--device", device],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: --device") and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "cache").exists()
