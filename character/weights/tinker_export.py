"""Tinker checkpoints on local disk: export, download, and conversion to a standard PEFT adapter.

Sampler checkpoints cannot be downloaded. A `weights/` training state is loaded into a new
training client, exported with `save_weights_external`, and its files fetched from the signed
URLs of `RestClient.get_external_weights_urls`. The export is a LoRA adapter whose tensor names
are Tinker's own; `tinker_to_peft` renames them for Hugging Face PEFT.

Tensor names, after the shared `base_model.model.` prefix and before `.lora_A.weight` /
`.lora_B.weight` (tensors are stored unscaled; scale = lora_alpha / r, as in PEFT):

| Tinker module path                      | PEFT / Hugging Face module path         |
|-----------------------------------------|-----------------------------------------|
| model.layers.{i}.self_attn.{q,k,v,o}_proj | model.layers.{i}.self_attn.{q,k,v,o}_proj |
| model.layers.{i}.mlp.{gate,up,down}_proj  | model.layers.{i}.mlp.{gate,up,down}_proj  |
| model.unembed_tokens                    | lm_head                                 |

This covers the dense Llama (Llama 3.x) and Qwen (Qwen2.5, Qwen3 dense) families, and the dense
Qwen3.5 family (Qwen3.5-4B/9B/27B, Qwen3.6-27B: hybrid linear and full attention, served as
vision-language models), whose Hugging Face modules sit one level deeper and fuse what Tinker
trains as three adapters:

| Tinker module path (Qwen3.5 dense)                 | PEFT / Hugging Face module path                            |
|----------------------------------------------------|------------------------------------------------------------|
| model.layers.{i}.linear_attn.in_proj_{q,k,v}       | model.language_model.layers.{i}.linear_attn.in_proj_qkv    |
| model.layers.{i}.linear_attn.{in_proj_z,in_proj_b,in_proj_a,out_proj} | model.language_model.layers.{i}.linear_attn.(same) |
| model.layers.{i}.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj | model.language_model.layers.{i}.(same)     |

The fused `in_proj_qkv` (rows Q, then K, then V) gets one LoRA of rank 3r with A = [A_q; A_k; A_v]
and B block-diagonal, so B A = [B_q A_q; B_k A_k; B_v A_v] exactly; its alpha is 3 x alpha, keeping
the scale alpha / r (`rank_pattern` / `alpha_pattern` in the PEFT config). An adapter that trained
the unembedding is refused for this family (the smaller models tie it to the input embedding, which
a PEFT `lm_head` adapter would not change). Not supported, and refused with a message saying so,
before a paper-mode build with `--merge` starts training: mixture-of-experts models (Tinker stores
experts as 3-D `experts.w1/w2/w3` tensors; Qwen3.5/3.6 -A<N>B, Nemotron, GPT-OSS, DeepSeek, Kimi),
the older vision-language models (Qwen3-VL), Qwen3.8 and Qwen3-Next (layouts not documented here).
The names follow the public tinker-cookbook `weights` module (`_merge_qwen3_5.py` for Qwen3.5, commit
9dfcc3a2); no real Tinker file was available to check them against, so
tests/test_tinker_backend.py::test_tensor_names_agree_with_tinker_cookbook checks the dense table
against that module's procedure (restated there, with the file and commit it was read from).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

from tinker import types

from character.errors import UserError
from character.storage import atomic_dir

SUPPORTED = "dense Llama (meta-llama/Llama-3.x) and dense Qwen (Qwen2.5, Qwen3, Qwen3.5 and Qwen3.6 without -A<N>B)"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")

# (Tinker module path, PEFT module path): the table above, as regex -> template pairs.
NAME_TABLE: list[tuple[str, str]] = [
    (r"model\.layers\.(?P<i>\d+)\.self_attn\.(?P<p>[qkvo])_proj", "model.layers.{i}.self_attn.{p}_proj"),
    (r"model\.layers\.(?P<i>\d+)\.mlp\.(?P<p>gate|up|down)_proj", "model.layers.{i}.mlp.{p}_proj"),
    (r"model\.unembed_tokens", "lm_head"),
]

_UNSUPPORTED_NAMES = [
    (re.compile(r"-A\d+B", re.I), "a mixture-of-experts model"),
    (re.compile(r"-VL-|vision", re.I), "a vision-language model"),
    (re.compile(r"qwen3\.8|qwen3-next", re.I), "a Qwen3.8/Qwen3-Next model (an adapter layout not mapped here)"),
    (re.compile(r"gpt-oss|deepseek|kimi|nemotron", re.I), "a model family whose adapter layout is not mapped here"),
]
_DENSE_MODEL_TYPES = {"llama", "qwen2", "qwen3", "qwen3_5"}
_QWEN3_5 = re.compile(r"qwen3\.[56]-", re.I)  # dense ones: the -A<N>B (MoE) names are refused first

# Qwen3.5 dense: Tinker module (after `model.layers.{i}.`) -> the Hugging Face module of the VL model.
_QWEN3_5_LAYER = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<i>\d+)\.(?P<sub>self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj"
    r"|linear_attn\.(?:in_proj_[zbaqkv]|out_proj))\.lora_(?P<ab>[AB])\.weight$"
)
_QKV = ("in_proj_q", "in_proj_k", "in_proj_v")


class UnsupportedAdapter(UserError):
    """The checkpoint's model family or tensor layout is not one we can convert."""


def _template_regex(template: str) -> re.Pattern:
    """Invert a template like `model.layers.{i}.mlp.{p}_proj` into a regex with the same groups."""
    parts = re.split(r"\{(\w+)\}", template)
    body = "".join(re.escape(s) if k % 2 == 0 else rf"(?P<{s}>[^.]+)" for k, s in enumerate(parts))
    return re.compile(f"^{body}$")


def _regex_template(pattern: str) -> str:
    """Invert a regex like `model\\.layers\\.(?P<i>\\d+)` into a template `model.layers.{i}`."""
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace("\\.", ".")


_FORWARD = [(re.compile(f"^{src}$"), dst) for src, dst in NAME_TABLE]
_BACKWARD = [(_template_regex(dst), _regex_template(src)) for src, dst in NAME_TABLE]


def _rename(key: str, table) -> str:
    m = _KEY.match(key)
    if not m:
        raise UnsupportedAdapter(f"tensor {key!r} is not a LoRA A/B weight; only {SUPPORTED} adapters are supported")
    module = m["module"]
    for rx, template in table:
        hit = rx.match(module)
        if hit:
            return f"{_PREFIX}{template.format(**hit.groupdict())}.lora_{m['ab']}.weight"
    why = "mixture-of-experts tensors" if ".experts" in module else "a module this table does not map"
    raise UnsupportedAdapter(f"tensor {key!r} is {why}; only {SUPPORTED} adapters are supported")


def peft_name(tinker_key: str) -> str:
    """A Tinker adapter tensor name -> its PEFT name (raises UnsupportedAdapter for unmapped layouts)."""
    return _rename(tinker_key, _FORWARD)


def tinker_name(peft_key: str) -> str:
    """The inverse of `peft_name`."""
    name = _rename(peft_key, _BACKWARD)
    if peft_name(name) != peft_key:  # the templates' groups are looser than the forward regexes
        raise UnsupportedAdapter(f"tensor {peft_key!r} has no Tinker name; only {SUPPORTED} adapters are supported")
    return name


def _config_file(base_model: str) -> Path | None:
    """The model's config.json where one is on this machine: a local folder's, or, for a name served by a
    loopback service (character.loopback), the one it published into the Hub cache under that name; the
    name alone decides otherwise (a real service's names say their family)."""
    config = Path(base_model).expanduser() / "config.json"
    if config.is_file():
        return config
    from character.backend.tinker_models import _is_loopback

    if not _is_loopback():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(base_model, "config.json")
    except ValueError:  # not a Hub repo name
        return None
    return Path(found) if isinstance(found, str) else None


def check_family(base_model: str) -> None:
    """Refuse, before anything is downloaded, base models whose adapters we cannot convert."""
    config = _config_file(base_model)
    if config is not None:
        model_type = json.loads(config.read_text()).get("model_type", "")
        if model_type not in _DENSE_MODEL_TYPES:
            raise UnsupportedAdapter(f"{base_model}: model_type {model_type!r} is not supported; only {SUPPORTED}")
        return
    for rx, what in _UNSUPPORTED_NAMES:
        if rx.search(base_model):
            raise UnsupportedAdapter(
                f"{base_model} is {what}: converting its Tinker adapter is not supported; only {SUPPORTED}"
            )
    if not re.search(r"llama|qwen", base_model, re.I):
        raise UnsupportedAdapter(f"{base_model}: converting its Tinker adapter is not supported; only {SUPPORTED}")


def is_qwen3_5(base_model: str) -> bool:
    """Whether the base model has the dense Qwen3.5 layout (a local folder says so in its config)."""
    config = _config_file(base_model)
    if config is not None:
        return json.loads(config.read_text()).get("model_type") == "qwen3_5"
    return _QWEN3_5.search(base_model) is not None


def qwen3_5_tensors(tensors: dict, rank: int) -> dict:
    """Tinker's Qwen3.5 adapter tensors under their PEFT names, q/k/v fused into `in_proj_qkv` (rank 3r)."""
    import torch

    out, qkv = {}, {}
    for key, value in tensors.items():
        m = _QWEN3_5_LAYER.match(key)
        if not m:
            what = "the unembedding (tied to the input embedding on the smaller models)" if "unembed" in key else ""
            raise UnsupportedAdapter(
                f"tensor {key!r} is {what or 'a module the Qwen3.5 table does not map'}; only {SUPPORTED} "
                "adapters are supported (for Qwen3.5, without the unembedding)"
            )
        layer, sub = m["i"], m["sub"]
        if sub.rsplit(".", 1)[-1] in _QKV:
            qkv.setdefault(layer, {})[(sub.rsplit(".", 1)[-1], m["ab"])] = value
            continue
        out[f"{_PREFIX}model.language_model.layers.{layer}.{sub}.lora_{m['ab']}.weight"] = value.contiguous()
    for layer, parts in sorted(qkv.items()):
        if len(parts) != 6:
            raise UnsupportedAdapter(f"layer {layer}: in_proj_q/k/v need a LoRA each to fuse into in_proj_qkv")
        a = torch.cat([parts[(p, "A")] for p in _QKV], dim=0)
        bs = [parts[(p, "B")] for p in _QKV]
        b = torch.zeros(sum(x.shape[0] for x in bs), 3 * rank, dtype=bs[0].dtype)
        row = 0
        for k, x in enumerate(bs):  # block-diagonal: component k's rows see only its own rank slice
            b[row : row + x.shape[0], k * rank : (k + 1) * rank] = x
            row += x.shape[0]
        name = f"{_PREFIX}model.language_model.layers.{layer}.linear_attn.in_proj_qkv"
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a.contiguous(), b
    return out


def tinker_to_peft(src: Path, dst: Path, base_model: str) -> Path:
    """Convert a downloaded Tinker adapter folder to a PEFT adapter folder (written atomically)."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    weights_file, config_file = src / "adapter_model.safetensors", src / "adapter_config.json"
    if not weights_file.is_file() or not config_file.is_file():
        found = sorted(p.name for p in src.iterdir()) if src.is_dir() else []
        raise UnsupportedAdapter(
            f"{src}: expected adapter_model.safetensors and adapter_config.json from Tinker, "
            f"found {found} (encrypted .age exports cannot be converted)"
        )
    tinker_cfg = json.loads(config_file.read_text())
    for key in ("r", "lora_alpha"):
        if key not in tinker_cfg:
            raise UnsupportedAdapter(f"{config_file}: missing {key!r}")
    rank = int(tinker_cfg["r"])
    tensors = load_file(str(weights_file))
    if is_qwen3_5(base_model):
        out = qwen3_5_tensors(tensors, rank)
    else:
        out = {peft_name(k): v.contiguous() for k, v in tensors.items()}
    modules = {k.rsplit(".lora_", 1)[0] for k in out}
    fused = any(m.endswith(".in_proj_qkv") for m in modules)
    for m in sorted(modules):
        a, b = out.get(f"{m}.lora_A.weight"), out.get(f"{m}.lora_B.weight")
        r = 3 * rank if m.endswith(".in_proj_qkv") else rank
        if a is None or b is None:
            raise UnsupportedAdapter(f"{src}: {m} has only one of lora_A / lora_B")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise UnsupportedAdapter(
                f"{src}: {m} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, not a rank-{r} LoRA pair"
            )
    if not out:
        raise UnsupportedAdapter(f"{src}: the adapter holds no LoRA tensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": tinker_cfg["lora_alpha"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        # the fused q/k/v adapter: rank 3r at alpha 3 x alpha, so its scale is the others' alpha / r
        "rank_pattern": {"in_proj_qkv": 3 * rank} if fused else {},
        "alpha_pattern": {"in_proj_qkv": 3 * tinker_cfg["lora_alpha"]} if fused else {},
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
    }
    with atomic_dir(dst) as tmp:
        save_file(out, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


def _fetch(url: str, dest: Path, timeout: float = 60.0) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as f:  # noqa: S310 - signed URL
        shutil.copyfileobj(resp, f, length=1 << 20)


def download_files(rest, external_path: str, folder: Path, fetch: Callable[[str, Path], None] = _fetch) -> list[str]:
    """Every file of an `external_weights/` checkpoint into `folder`; refuses paths that escape it."""
    urls = rest.get_external_weights_urls(external_path).result().urls
    if not urls:
        raise UserError(f"{external_path}: the export has no files")
    base = folder.resolve()
    for name in sorted(urls):
        dest = (folder / name).resolve()
        if not dest.is_relative_to(base):
            raise UserError(f"{external_path}: unsafe file name {name!r} in the export")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fetch(urls[name], dest)
    return sorted(urls)


def download_adapter(
    service, tinker_path: str, dst: Path, base_model: str | None = None, fetch: Callable[[str, Path], None] = _fetch
) -> Path:
    """A `tinker://` checkpoint as a local PEFT adapter folder at `dst`.

    `service` is a TinkerService. A `weights/` state is exported first (a temporary export,
    deleted afterwards); an `external_weights/` export is fetched as is.
    """
    try:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
    except ValueError:
        raise UserError(f"{tinker_path!r}: not a Tinker checkpoint path (tinker://<run>/weights/<name>)") from None
    if parsed.checkpoint_type == "sampler":
        raise UserError(
            f"{tinker_path}: sampler checkpoints cannot be downloaded; use the build's training state "
            "(tinker://<run>/weights/<name>, the checkpoint's `state`)"
        )
    rest = service.rest_client()
    if base_model is None:
        base_model = rest.get_weights_info_by_tinker_path(tinker_path).result().base_model
    check_family(base_model)  # before paying for an export
    with tempfile.TemporaryDirectory(prefix="tinker-adapter-") as tmp:
        raw = Path(tmp)
        if parsed.checkpoint_type == "external":
            download_files(rest, tinker_path, raw, fetch)
        else:
            client = service.create_training_client_from_state(tinker_path)
            export = client.save_weights_external(f"export-{uuid.uuid4().hex[:8]}", ttl_seconds=3600).result().path
            try:
                download_files(rest, export, raw, fetch)
            finally:
                try:  # best effort: the TTL removes it anyway
                    rest.delete_checkpoint_from_tinker_path(export).result()
                except Exception:  # noqa: BLE001
                    pass
        return tinker_to_peft(raw, Path(dst), base_model)
