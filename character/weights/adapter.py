"""A PEFT LoRA adapter on disk: its config and tensor headers read and checked, no tensor data.

A LoRA module adds dW = B @ A * s to a base weight, with s = lora_alpha / r (or / sqrt(r) with
rsLoRA), where r and alpha may be overridden per module by rank_pattern / alpha_pattern. Only plain
LoRA is accepted (no DoRA, biases or modules_to_save), in safetensors.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from character.errors import UserError
from character.storage import uri_to_path
from character.weights.safetensors_io import TensorFile, first_line, open_safetensors, read_array, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
    r"lora_embedding_A|lora_embedding_B)$"
)
# PEFT also saves the base weight of a targeted embedding-like layer (e.g. lm_head); we carry it along.
_BASE_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.base_layer\.weight$")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's own rule (peft.utils.other.get_pattern_key): the first key that matches the name's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


@dataclass
class LoraModule:
    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    rank: int
    out_features: int  # rows of B
    in_features: int  # columns of A
    scaling: float
    embedding: bool


@dataclass
class Adapter:
    label: str  # how errors name it: "DPO adapter", "SFT adapter", "adapter"
    source: str
    folder: Path
    config: dict
    weights: Path
    modules: dict[str, LoraModule] = field(default_factory=dict)
    saved_base: dict[str, tuple[str, str, tuple]] = field(default_factory=dict)  # module -> (key, dtype, shape)

    @property
    def base_model(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def open(self) -> TensorFile:
        return open_safetensors(self.weights, self.label)

    def check_finite(self) -> None:
        """Reads every tensor once (one at a time) so that a NaN fails before anything is written."""
        with self.open() as f:
            for m in self.modules.values():
                read_array(f, m.a_key, self.label)
                read_array(f, m.b_key, self.label)
            for key, _, _ in self.saved_base.values():
                read_array(f, key, self.label)


def load_adapter(source: str, label: str = "adapter") -> Adapter:
    """Read and check an adapter's config and tensor headers (no tensor data)."""
    folder = uri_to_path(source)
    what = f"{label} {source}"
    cfg = _read_config(folder, what)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file() and (folder / "adapter_model.bin").is_file():
        raise UserError(f"{what}: only safetensors adapters are supported (found adapter_model.bin)")
    adapter = Adapter(label, source, folder, cfg, weights)
    parts = _lora_parts(adapter, what)
    for name, p in sorted(parts.items()):
        adapter.modules[name] = _lora_module(name, p, cfg, what)
    return adapter


def _read_config(folder: Path, what: str) -> dict:
    """adapter_config.json, checked to describe a plain LoRA adapter."""
    if not folder.exists():
        raise UserError(f"{what}: not found")
    if not folder.is_dir():
        raise UserError(f"{what}: expected a PEFT adapter folder, got a file")
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise UserError(f"{what}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: {cfg_path} is not valid JSON ({first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{what}: {cfg_path} is not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{what}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "lora_bias"):
        if cfg.get(flag):
            raise UserError(f"{what}: {flag}=true is not supported (plain LoRA only)")
    if cfg.get("modules_to_save"):
        raise UserError(f"{what}: modules_to_save is not supported (plain LoRA only)")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise UserError(f"{what}: {cfg_path} field '{key}' must be a positive number")
    return cfg


def _lora_parts(adapter: Adapter, what: str) -> dict[str, dict[str, tuple[str, tuple]]]:
    """{module: {"lora_A" | "lora_B": (key, shape)}} from the weights' header; saved base weights go on
    `adapter.saved_base`."""
    parts: dict[str, dict[str, tuple[str, tuple]]] = {}
    for key, (dtype, shape) in read_header(adapter.weights, what).items():
        if mb := _BASE_KEY.match(key):
            adapter.saved_base[mb["module"]] = (key, dtype, shape)
            continue
        m = _KEY.match(key)
        if not m:
            raise UserError(f"{what}: unsupported tensor {key} (plain LoRA A/B weights only)")
        parts.setdefault(m["module"], {})[m["part"].split(".")[0].replace("embedding_", "")] = (key, shape)
    if not parts:
        raise UserError(f"{what}: {adapter.weights.name} holds no LoRA tensors")
    return parts


def _lora_module(name: str, p: dict[str, tuple[str, tuple]], cfg: dict, what: str) -> LoraModule:
    """One module's A and B, checked against each other and the config's (patterned) rank; its scale."""
    if set(p) != {"lora_A", "lora_B"}:
        raise UserError(f"{what}: module {name} has {sorted(p)} but needs both lora_A and lora_B")
    (a_key, a_shape), (b_key, b_shape) = p["lora_A"], p["lora_B"]
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise UserError(f"{what}: module {name} has inconsistent shapes A{a_shape} B{b_shape}")
    r = int(_pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"]))
    if r != a_shape[0]:
        raise UserError(f"{what}: module {name} has rank {a_shape[0]} but the config says r={r}")
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"]))
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return LoraModule(
        name, a_key, b_key, r, b_shape[0], a_shape[1], scaling, embedding=a_key.endswith("lora_embedding_A")
    )


def _same_base(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_compatible(x: Adapter, y: Adapter) -> None:
    """Refuse two adapters that cannot be merged: other base models, targets, shapes or saved base weights."""
    if not _same_base(x.base_model, y.base_model):
        raise UserError(
            f"different base models: {x.label} is for {x.base_model or '(none)'!r}, "
            f"{y.label} is for {y.base_model or '(none)'!r}"
        )
    tx, ty = x.config.get("target_modules"), y.config.get("target_modules")
    as_set = lambda t: frozenset(t) if isinstance(t, (list, tuple)) else t  # noqa: E731
    only_x, only_y = sorted(set(x.modules) - set(y.modules)), sorted(set(y.modules) - set(x.modules))
    if as_set(tx) != as_set(ty) or only_x or only_y:
        detail = (
            f"only in {x.label}: {', '.join(only_x[:3]) or '-'}; only in {y.label}: {', '.join(only_y[:3]) or '-'}"
            if only_x or only_y
            else f"{x.label} targets {tx}, {y.label} targets {ty}"
        )
        raise UserError(f"different target modules: {detail}")
    for name, mx in x.modules.items():
        my = y.modules[name]
        if (mx.out_features, mx.in_features, mx.embedding) != (my.out_features, my.in_features, my.embedding):
            raise UserError(
                f"different tensor shapes for module {name}: {x.label} ({mx.out_features}, "
                f"{mx.in_features}), {y.label} ({my.out_features}, {my.in_features})"
            )
    if {n: v[1:] for n, v in x.saved_base.items()} != {n: v[1:] for n, v in y.saved_base.items()}:
        raise UserError(
            f"{x.label} and {y.label} carry different saved base weights "
            f"({sorted(x.saved_base)} vs {sorted(y.saved_base)})"
        )
    if bool(x.config.get("fan_in_fan_out")) != bool(y.config.get("fan_in_fan_out")):
        raise UserError(f"{x.label} and {y.label} differ in fan_in_fan_out")
