"""Paper-mode export for the dense Qwen3.5 family: crafted adapter tensors in Tinker's naming (split
in_proj_q/k/v, `model.layers.` prefix) convert to a PEFT adapter whose weight change on a small
Qwen3.5 model (hybrid linear and full attention, the vision-language class Tinker serves) is exactly
the one Tinker trained, as PEFT itself applies it; the exact merge of two such adapters is exactly
1.0 x dW_dpo + 0.25 x dW_sft. Families we cannot export are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from character.weights.merge import merge_adapters
from character.weights.tinker_export import UnsupportedAdapter, check_family, tinker_to_peft

transformers = pytest.importorskip("transformers")
RANK, ALPHA = 2, 4.0
HIDDEN, KEY_DIM, VALUE_DIM = 32, 16, 32  # 2 key heads x 8, 4 value heads x 8

# (Tinker module after `model.layers.`, out features, in features)
MODULES = [
    ("0.linear_attn.in_proj_q", KEY_DIM, HIDDEN),
    ("0.linear_attn.in_proj_k", KEY_DIM, HIDDEN),
    ("0.linear_attn.in_proj_v", VALUE_DIM, HIDDEN),
    ("0.linear_attn.in_proj_z", VALUE_DIM, HIDDEN),
    ("0.linear_attn.in_proj_b", 4, HIDDEN),
    ("0.linear_attn.out_proj", HIDDEN, VALUE_DIM),
    ("0.mlp.gate_proj", 48, HIDDEN),
    ("1.self_attn.q_proj", 64, HIDDEN),
    ("1.self_attn.o_proj", HIDDEN, 32),
    ("1.mlp.down_proj", HIDDEN, 48),
]


@pytest.fixture(scope="module")
def qwen3_5_dir(tmp_path_factory):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    cfg = Qwen3_5Config(
        text_config=dict(
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            hidden_size=HIDDEN,
            intermediate_size=48,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            vocab_size=64,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=HIDDEN),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qwen3_5") / "model"
    Qwen3_5ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


def tinker_adapter(folder, seed: int, extra: dict | None = None):
    """An adapter as Tinker exports it: unscaled A/B under Tinker's names, and its r and alpha."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, out, inp in MODULES:
        key = f"base_model.model.model.layers.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, inp, generator=g)
        tensors[f"{key}.lora_B.weight"] = torch.randn(out, RANK, generator=g)
    tensors.update(extra or {})
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}))
    return tensors


def expected_deltas(tensors: dict) -> dict[str, torch.Tensor]:
    """The weight change Tinker's adapter makes, per Hugging Face weight: scale x B A, q/k/v stacked."""
    scale = ALPHA / RANK
    d = {}
    for name, _, _ in MODULES:
        key = f"base_model.model.model.layers.{name}"
        d[name] = scale * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
    fused = {f"0.linear_attn.in_proj_{p}" for p in "qkv"}
    out = {f"model.language_model.layers.{n}.weight": v for n, v in d.items() if n not in fused}
    qkv = torch.cat([d[f"0.linear_attn.in_proj_{p}"] for p in "qkv"], dim=0)
    out["model.language_model.layers.0.linear_attn.in_proj_qkv.weight"] = qkv
    return out


def applied_deltas(model_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """What PEFT's own merge changes in the model's weights when it applies the adapter."""
    from peft import PeftModel
    from transformers import Qwen3_5ForConditionalGeneration

    base = Qwen3_5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return {k: v - before[k] for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}


def _close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=k)


def test_a_qwen3_5_adapter_converts_to_exactly_the_weight_change_tinker_trained(tmp_path, qwen3_5_dir):
    tensors = tinker_adapter(tmp_path / "tinker", seed=1)
    peft_dir = tinker_to_peft(tmp_path / "tinker", tmp_path / "peft", str(qwen3_5_dir))
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"in_proj_qkv": 3 * RANK} and cfg["alpha_pattern"] == {"in_proj_qkv": 3 * ALPHA}
    assert "in_proj_qkv" in cfg["target_modules"] and "in_proj_q" not in cfg["target_modules"]
    _close(applied_deltas(qwen3_5_dir, peft_dir), expected_deltas(tensors))


def test_the_exact_merge_of_two_qwen3_5_adapters(tmp_path, qwen3_5_dir):
    dpo, sft = tinker_adapter(tmp_path / "t-dpo", seed=2), tinker_adapter(tmp_path / "t-sft", seed=3)
    a = tinker_to_peft(tmp_path / "t-dpo", tmp_path / "dpo", str(qwen3_5_dir))
    b = tinker_to_peft(tmp_path / "t-sft", tmp_path / "sft", str(qwen3_5_dir))
    res = merge_adapters(str(a), str(b), tmp_path / "merged", dpo_weight=1.0, sft_weight=0.25, method="exact")
    d1, d2 = expected_deltas(dpo), expected_deltas(sft)
    _close(applied_deltas(qwen3_5_dir, res.output), {k: d1[k] + 0.25 * d2[k] for k in d1})


def test_a_qwen3_5_adapter_with_the_unembedding_is_refused(tmp_path, qwen3_5_dir):
    extra = {
        "base_model.model.model.unembed_tokens.lora_A.weight": torch.zeros(RANK, HIDDEN),
        "base_model.model.model.unembed_tokens.lora_B.weight": torch.zeros(64, RANK),
    }
    tinker_adapter(tmp_path / "tinker", seed=4, extra=extra)
    with pytest.raises(UnsupportedAdapter, match="unembedding"):
        tinker_to_peft(tmp_path / "tinker", tmp_path / "peft", str(qwen3_5_dir))
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("model", ["Qwen/Qwen3.5-4B", "Qwen/Qwen3.5-9B", "Qwen/Qwen3.6-27B", "Qwen/Qwen3-8B"])
def test_dense_families_served_today_are_exportable(model):
    check_family(model)


@pytest.mark.parametrize(
    "model,family",
    [
        ("Qwen/Qwen3.6-35B-A3B", "mixture-of-experts"),
        ("Qwen/Qwen3.5-397B-A17B", "mixture-of-experts"),
        ("Qwen/Qwen3.8-27B", "Qwen3.8"),
        ("openai/gpt-oss-20b", "mixture-of-experts|not mapped"),
        ("moonshotai/Kimi-K2.6", "not mapped"),
    ],
)
def test_other_families_are_refused_by_name(model, family):
    with pytest.raises(UnsupportedAdapter, match=family) as e:
        check_family(model)
    assert model in str(e.value)
