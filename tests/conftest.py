"""Shared fixtures: Prefect settings for tests, the tiny model built once per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Prefect reads these at import; set them before anything imports it.
_PREFECT_TMP = Path(tempfile.mkdtemp(prefix="character-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_PREFECT_TMP / "results")
os.environ["PREFECT_HOME"] = str(_PREFECT_TMP / "home")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("TINKER_API_KEY", None)  # no test may reach the network

import pytest  # noqa: E402


def _model_cache() -> Path:
    """Built models outlive a test session: the tiny model takes minutes to build on a busy 2-core
    machine, and its folder name is the digest of its recipe, so a changed recipe builds anew."""
    root = os.environ.get("CHARACTER_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "character-tests"
    )
    return Path(root) / "models"


# Every build a test starts, subprocesses included, finds the tiny model in the test cache, never in ~/.cache.
os.environ["CHARACTER_MODEL_CACHE"] = str(_model_cache())


@pytest.fixture(autouse=True)
def _threads_kept():
    """A test that runs a command in-process sets torch's threads (character.settings.apply_threads): put them
    back, so the next test computes as the session started (bit-for-bit comparisons depend on it)."""
    import sys

    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The tiny model, built once per recipe (cached across sessions) and shared by every workspace;
    two sessions at once build it once (tiny_model_path locks)."""
    from character.backend.tiny import tiny_model_path

    root = _model_cache()
    tiny_model_path(root)
    return root


@pytest.fixture
def workdir(tmp_path, models_dir) -> Path:
    """A fresh workspace whose model cache points at the session's tiny model."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "models").symlink_to(models_dir, target_is_directory=True)
    return ws


@pytest.fixture(scope="session")
def tiny_dir(models_dir) -> Path:
    from character.backend.tiny import tiny_model_path

    return tiny_model_path(models_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread: two busy processes on two cores slow each other badly (OpenMP spinning)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tiny_dir):
    """The tiny model as plain transformers loads it, for reference computations."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    shutil.rmtree(_PREFECT_TMP, ignore_errors=True)
