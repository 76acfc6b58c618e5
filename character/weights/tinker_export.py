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

This covers the dense Llama (Llama 3.x) and Qwen (Qwen2.5, Qwen3 dense) families. Not supported,
and refused with a message saying so: mixture-of-experts models (Tinker stores experts as 3-D
`experts.w1/w2/w3` tensors), vision-language models (an extra `language_model` level), Qwen3.5
(split/linear attention), GPT-OSS, DeepSeek, Kimi and Nemotron. The names follow the public
tinker-cookbook `weights` module; no real Tinker file was available to check them against, so
tests/test_tinker_backend.py::test_tensor_names_agree_with_tinker_cookbook checks them against that
module's procedure (restated there, with the file and commit it was read from).
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

SUPPORTED = "dense Llama (meta-llama/Llama-3.x) and dense Qwen (Qwen2.5, Qwen3 without -A<N>B)"
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
    (re.compile(r"qwen3\.5|qwen3-next", re.I), "a Qwen3.5/Qwen3-Next model (split or linear attention)"),
    (re.compile(r"gpt-oss|deepseek|kimi|nemotron", re.I), "a model family whose adapter layout is not mapped here"),
]
_DENSE_MODEL_TYPES = {"llama", "qwen2", "qwen3"}


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


def check_family(base_model: str) -> None:
    """Refuse, before anything is downloaded, base models whose adapters we cannot convert."""
    config = Path(base_model).expanduser() / "config.json"
    if config.is_file():
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
    out = {peft_name(k): v.contiguous() for k, v in tensors.items()}
    modules = {k.rsplit(".lora_", 1)[0] for k in out}
    for m in sorted(modules):
        a, b = out.get(f"{m}.lora_A.weight"), out.get(f"{m}.lora_B.weight")
        if a is None or b is None:
            raise UnsupportedAdapter(f"{src}: {m} has only one of lora_A / lora_B")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise UnsupportedAdapter(
                f"{src}: {m} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, not a rank-{rank} LoRA pair"
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
        "rank_pattern": {},
        "alpha_pattern": {},
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
