"""Adapter merging: exact equals the dense weighted sum, linear equals PEFT bit for bit, svd's error
equals the discarded singular values, merged adapters load in PEFT, and every bad input is one line."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapters import make_adapter
from safetensors.torch import load_file, save_file

from character.errors import UserError
from character.weights.adapter import load_adapter
from character.weights.merge import merge_adapters

# Two cores are shared with other jobs: one thread avoids OpenMP oversubscription (100x slower here).
ENV_1T = {"OMP_NUM_THREADS": "1"}


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*tie_word_embeddings.*:UserWarning"),
]


def deltas(base, folder: Path) -> dict[str, torch.Tensor]:
    """Each module's dW as PEFT itself computes it (its own scaling, patterns included), in float64."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    return {
        name.removeprefix("base_model.model."): m.get_delta_weight("default").double()
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        # Different ranks and alphas, per-module patterns and rsLoRA: every scaling rule at once.
        "dpo": make_adapter(base, root / "dpo", r=4, alpha=8, seed=0),
        "sft": make_adapter(
            base, root / "sft", r=8, alpha=4, seed=1, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}
        ),
        "sft_rs": make_adapter(base, root / "sft_rs", r=6, alpha=5, seed=2, use_rslora=True),
        "sft4": make_adapter(base, root / "sft4", r=4, alpha=3, seed=3, alpha_pattern={"down_proj": 5}),
        "q_only": make_adapter(base, root / "q_only", r=4, alpha=8, seed=4, targets=("q_proj",)),
    }


@pytest.mark.parametrize("other,w", [("sft", (1.0, 0.25)), ("sft_rs", (0.7, -0.4))])
def test_exact_equals_dense_weighted_sum(base, adapters, tmp_path, other, w):
    res = merge_adapters(str(adapters["dpo"]), str(adapters[other]), tmp_path / "m", *w)
    d1, d2, dm = deltas(base, adapters["dpo"]), deltas(base, adapters[other]), deltas(base, tmp_path / "m")
    assert dm.keys() == d1.keys() and len(dm) == 12
    for name in d1:
        want = w[0] * d1[name] + w[1] * d2[name]
        assert torch.allclose(dm[name], want, rtol=1e-5, atol=1e-7), name
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == res.rank and not cfg["use_rslora"]
    assert (
        cfg["base_model_name_or_path"]
        == json.loads((adapters["dpo"] / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    prov = json.loads((tmp_path / "m" / "character_merge.json").read_text())
    assert prov["method"] == "exact" and prov["weights"] == {"dpo": w[0], "sft": w[1]} and not prov["normalized"]
    assert [s["role"] for s in prov["sources"]] == ["dpo", "sft"]


def test_merged_adapter_gives_logits_of_base_plus_dense_sum(base, adapters, tmp_path):
    from peft import PeftModel

    merge_adapters(str(adapters["dpo"]), "file://" + str(adapters["sft"]), tmp_path / "m")
    d1, d2 = deltas(base, adapters["dpo"]), deltas(base, adapters["sft"])
    dense = copy.deepcopy(base)
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for name in d1:
            params[f"{name}.weight"] += (1.0 * d1[name] + 0.25 * d2[name]).float()
    ids = torch.tensor([[1, 7, 42, 300, 512, 9, 88]])
    with torch.no_grad():
        got = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "m")(ids).logits
        want = dense(ids).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


@pytest.mark.parametrize("w", [(1.0, 0.25), (0.6, -0.3)])
def test_linear_matches_peft_add_weighted_adapter_bit_for_bit(base, adapters, tmp_path, w):
    from peft import PeftModel, get_peft_model_state_dict

    merge_adapters(str(adapters["dpo"]), str(adapters["sft4"]), tmp_path / "lin", *w, method="linear")
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters["dpo"], adapter_name="dpo")
    model.load_adapter(adapters["sft4"], adapter_name="sft")
    model.add_weighted_adapter(["dpo", "sft"], list(w), "merged", combination_type="linear")
    want = get_peft_model_state_dict(model, adapter_name="merged")
    got = load_file(tmp_path / "lin" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    cfg = json.loads((tmp_path / "lin" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == model.peft_config["merged"].r == 4


def test_linear_is_not_the_weighted_sum(base, adapters, tmp_path):
    """The reason `exact` is the default: PEFT's linear mixes A and B separately (cross terms)."""
    merge_adapters(str(adapters["dpo"]), str(adapters["sft4"]), tmp_path / "lin", method="linear")
    d1, d2, dl = deltas(base, adapters["dpo"]), deltas(base, adapters["sft4"]), deltas(base, tmp_path / "lin")
    name = next(iter(d1))
    assert not torch.allclose(dl[name], d1[name] + 0.25 * d2[name], atol=1e-4)


@pytest.mark.parametrize("rank", [3, None])
def test_svd_error_equals_discarded_singular_values(base, adapters, tmp_path, rank):
    res = merge_adapters(str(adapters["dpo"]), str(adapters["sft"]), tmp_path / "svd", method="svd", rank=rank)
    keep = rank or 8  # default: the larger input rank
    assert res.rank == keep
    d1, d2, ds = deltas(base, adapters["dpo"]), deltas(base, adapters["sft"]), deltas(base, tmp_path / "svd")
    per_module = res.provenance["svd_discarded_frobenius"]["per_module"]
    for name in d1:
        exact = d1[name] + 0.25 * d2[name]
        s = torch.linalg.svdvals(exact)
        discarded = float(s[keep:].square().sum().sqrt())
        err = float((ds[name] - exact).norm())
        assert err == pytest.approx(discarded, rel=1e-4, abs=1e-6), name
        assert per_module[name] == pytest.approx(discarded, rel=1e-6, abs=1e-6)
    tensors = load_file(tmp_path / "svd" / "adapter_model.safetensors")
    assert all(keep in t.shape for t in tensors.values())


def test_merge_reads_tensors_one_module_at_a_time(adapters, tmp_path, monkeypatch):
    """No whole-file loads: every read is of a single tensor."""
    import safetensors.torch

    def forbidden(*a, **k):
        raise AssertionError("whole-file load")

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr(safetensors.torch, "save_file", forbidden)
    merge_adapters(str(adapters["dpo"]), str(adapters["sft"]), tmp_path / "m")
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()


def test_rank_pattern_is_read_like_peft(adapters):
    sft = load_adapter(str(adapters["sft"]))
    v = sft.modules["model.layers.0.self_attn.v_proj"]
    d = sft.modules["model.layers.0.mlp.down_proj"]
    assert (v.rank, v.scaling) == (2, 4 / 2)
    assert (d.rank, d.scaling) == (8, 3 / 8)


# -- the command line -------------------------------------------------------------------------------
def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "character.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **ENV_1T},
    )


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_merge_normalize_warns_and_rescales(base, adapters, tmp_path):
    proc = cli("merge", adapters["dpo"], adapters["sft"], "--output", tmp_path / "n", "--normalize")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("warning: --normalize") and "magnitude of both updates" in proc.stderr
    assert "merged (exact" in proc.stdout
    d1, d2, dn = deltas(base, adapters["dpo"]), deltas(base, adapters["sft"]), deltas(base, tmp_path / "n")
    name = next(iter(d1))
    assert torch.allclose(dn[name], 0.8 * d1[name] + 0.2 * d2[name], rtol=1e-5, atol=1e-7)
    prov = json.loads((tmp_path / "n" / "character_merge.json").read_text())
    assert prov["normalized"] and prov["effective_weights"] == {"dpo": 0.8, "sft": 0.2}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(folder: Path, fn) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def _bad_base(a, t):
    _edit_config(_copy(a["sft"], t / "x"), base_model_name_or_path="/some/other/model")
    return [a["dpo"], t / "x"], ["different base models", "/some/other/model"]


def _bad_shape(a, t):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_tensors(_copy(a["sft4"], t / "x"), lambda d: d.__setitem__(key, torch.randn(4, 64)))
    return [a["dpo"], t / "x"], ["different tensor shapes", "model.layers.0.self_attn.q_proj"]


def _bad_nan(a, t):
    key = "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"
    _edit_tensors(_copy(a["sft"], t / "x"), lambda d: d[key].__setitem__((0, 0), float("nan")))
    return [a["dpo"], t / "x"], ["NaN or Inf", key]


def _bad_truncated(a, t):
    path = _copy(a["sft"], t / "x") / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return [a["dpo"], t / "x"], ["not a readable safetensors file", "truncated"]


def _bad_config_json(a, t):
    (_copy(a["sft"], t / "x") / "adapter_config.json").write_text('{"r": 8,')
    return [a["dpo"], t / "x"], ["adapter_config.json is not valid JSON"]


def _missing_weights(a, t):
    (_copy(a["sft"], t / "x") / "adapter_model.safetensors").unlink()
    return [a["dpo"], t / "x"], ["SFT adapter", "missing file"]


def _output_exists(a, t):
    (t / "out").mkdir()
    (t / "out" / "keep.txt").write_text("mine")
    return [a["dpo"], a["sft"]], ["already exists", "--overwrite"]


ERRORS = {
    "different base models": _bad_base,
    "different target modules": lambda a, t: ([a["dpo"], a["q_only"]], ["different target modules"]),
    "different tensor shapes": _bad_shape,
    "linear with unequal ranks": lambda a, t: (
        [a["dpo"], a["sft"], "--method", "linear"],
        ["--method linear needs equal LoRA ranks", "r=4", "r=8"],
    ),
    "missing adapter folder": lambda a, t: ([t / "nope", a["sft"]], ["DPO adapter", "not found"]),
    "missing weights file": _missing_weights,
    "corrupt safetensors": _bad_truncated,
    "corrupt config": _bad_config_json,
    "NaN in an input": _bad_nan,
    "output exists": _output_exists,
    "normalize with zero total": lambda a, t: (
        [a["dpo"], a["sft"], "--normalize", "--dpo-weight", "1", "--sft-weight", "-1"],
        ["--normalize needs a positive total weight"],
    ),
    "normalize with negative total": lambda a, t: (
        [a["dpo"], a["sft"], "--normalize", "--dpo-weight", "-1", "--sft-weight", "0.25"],
        ["positive total weight"],
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_cli_merge_errors_are_one_line_and_write_nothing(adapters, tmp_path, case):
    args, needles = ERRORS[case](adapters, tmp_path)
    existed = (tmp_path / "out").exists()
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = cli("merge", *args, "--output", tmp_path / "out")
    assert_one_line_error(proc, *needles)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp folder left behind
    if existed:
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_corrupt_input_is_a_user_error_in_process(adapters, tmp_path):
    bad = _copy(adapters["sft"], tmp_path / "x")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        merge_adapters(str(adapters["dpo"]), str(bad), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensor_file_reads_and_streams_every_dtype_exactly(tmp_path):
    """Plain reads (no memory map) give the tensors safetensors stored, bfloat16 included; raw copies are exact."""
    from character.weights.safetensors_io import StreamingSafetensorsWriter, TensorFile

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(4, 6, generator=g).bfloat16(),
        "c.f16": torch.randn(7, generator=g).half(),
        "d.i64": torch.arange(6).reshape(2, 3),
        "e.empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "in.safetensors")
    with TensorFile(tmp_path / "in.safetensors", "test") as f:
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t) and f.get_tensor(k).dtype == t.dtype
            want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
            assert (f.get_array(k) == want).all() and f.get_array(k).shape == tuple(t.shape)
        specs = [(k, *f.specs[k]) for k in sorted(tensors)]
        with StreamingSafetensorsWriter(tmp_path / "out.safetensors", specs) as w:
            for k in sorted(tensors):
                f.copy_raw(k, w, chunk=7)  # several pieces per tensor
    back = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(back[k], t) for k, t in tensors.items())
