"""Folding an adapter into the base: a full model folder that loads with AutoModelForCausalLM and gives
PEFT's logits, sharded like the base or resharded, with a tied head untied when the adapter changes it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from adapters import make_adapter

from character.errors import UserError
from character.weights.fold import fold_adapter, parse_size
from character.weights.safetensors_io import read_header, tensor_nbytes

IDS = torch.tensor([[1, 7, 42, 300, 512, 9, 88, 3]])


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*(tie_word_embeddings|save_embedding_layers).*:UserWarning"),
]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return make_adapter(
        base,
        tmp_path_factory.mktemp("a") / "ad",
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )


def test_fold_equals_peft_merge_and_unload(base, adapter, tmp_path, tiny_dir):
    from peft import PeftModel

    out = fold_adapter(str(adapter), tmp_path / "full", base_model=str(tiny_dir))
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00001.safetensors",
        "character_fold.json",
    } <= names
    merged = PeftModel.from_pretrained(copy.deepcopy(base), adapter).merge_and_unload()
    got, want = logits(load(out)), logits(merged)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert not torch.allclose(got, logits(base), atol=1e-3)  # the adapter did change something
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tiny_dir).chat_template


def test_reshard_by_size_gives_same_model(base, adapter, tmp_path, tiny_dir):
    one = fold_adapter(str(adapter), tmp_path / "one", base_model=str(tiny_dir))
    many = fold_adapter(str(adapter), tmp_path / "many", base_model=str(tiny_dir), max_shard_size="300KB")
    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    header = read_header(tiny_dir / "model.safetensors", "base")
    assert len(shards) > 3
    for s in shards:  # within the limit, unless one tensor alone is larger (it then gets a shard of its own)
        keys = [k for k, f in index["weight_map"].items() if f == s]
        assert sum(tensor_nbytes(*header[k]) for k in keys) <= 300_000 or len(keys) == 1
    assert index["metadata"]["total_size"] == sum(tensor_nbytes(*spec) for spec in header.values())
    assert set(index["weight_map"]) == set(header)
    assert torch.equal(logits(load(one)), logits(load(many)))


@pytest.fixture(scope="module")
def tied(tiny_dir, tmp_path_factory):
    """(folder, model): the tiny model with its output layer tied to its embedding, as most small
    Llamas ship (tiny itself is untied: its copy circuit needs the two apart)."""
    import shutil

    model = load(tiny_dir)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    folder = tmp_path_factory.mktemp("tied") / "tiny-tied"
    model.save_pretrained(folder)
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder, load(folder)


@pytest.mark.parametrize("side", ["lm_head", "embed_tokens"])
def test_tied_embeddings_are_untied_and_match_the_adapted_model(tied, tmp_path, side):
    """PEFT's merge_and_unload would fold one side's update into the shared matrix, changing both."""
    from peft import PeftModel

    folder, base = tied
    ad = make_adapter(base, tmp_path / "ad", seed=5, targets=("q_proj", side))
    out = fold_adapter(str(ad), tmp_path / "full", base_model=str(folder))
    cfg = json.loads((out / "config.json").read_text())
    assert base.config.tie_word_embeddings and cfg["tie_word_embeddings"] is False
    folded = load(out)
    untouched = folded.get_input_embeddings() if side == "lm_head" else folded.get_output_embeddings()
    assert torch.equal(untouched.weight, base.get_input_embeddings().weight)
    adapted = PeftModel.from_pretrained(copy.deepcopy(base), ad)
    got, want = logits(folded), logits(adapted)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_folded_model_works_as_a_sampling_checkpoint(adapter, tmp_path, workdir):
    from tinker import types

    from character.backend.local import LocalService
    from character.settings import Workspace

    out = fold_adapter(str(adapter), tmp_path / "full", base_model="tiny", workdir=workdir)
    svc = LocalService(Workspace(workdir), device="cpu")
    seq = types.ModelInput.from_ints([int(x) for x in IDS[0]])
    a = svc.create_sampling_client(model_path=str(adapter)).compute_logprobs(seq).result()
    b = svc.create_sampling_client(model_path=out.as_uri()).compute_logprobs(seq).result()
    assert a[0] is None and b[0] is None
    assert max(abs(x - y) for x, y in zip(a[1:], b[1:])) < 1e-4


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size("300KB") == 300_000
    with pytest.raises(UserError, match="max-shard-size"):
        parse_size("lots")


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "character.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_fold(adapter, tmp_path, workdir):
    proc = cli("fold", adapter, "--base-model", "tiny", "--workdir", workdir, "--output", tmp_path / "full")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "full" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("case", ["output exists", "missing adapter", "wrong base model"])
def test_cli_fold_errors_are_one_line_and_write_nothing(adapter, tmp_path, workdir, case):
    out = tmp_path / "out"
    args = [adapter, "--base-model", "tiny", "--workdir", workdir]
    needle = {
        "output exists": "already exists",
        "missing adapter": "not found",
        "wrong base model": "not a local Hugging Face model folder",
    }[case]
    if case == "output exists":
        out.mkdir()
    elif case == "missing adapter":
        args[0] = tmp_path / "nope"
    else:
        args[2] = tmp_path / "no-model"
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = cli("fold", *args, "--output", out)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
