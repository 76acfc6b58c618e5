"""Folding a LoRA adapter into its base model's weights: a full Hugging Face model folder.

Works shard by shard on the safetensors files (peak memory: about one tensor plus one LoRA
module), never instantiating the model. The result loads with AutoModelForCausalLM and gives
the adapted model's logits.

Tied embeddings: a tied model stores one matrix for the input embedding and the output head.
If the adapter changes either side, folding into the shared matrix would change the other side
too, which the adapted model never did (PEFT's merge_and_unload does exactly that, with a
warning); so the head is written as its own tensor and the output config unties the two.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from character.errors import UserError
from character.storage import atomic_dir
from character.weights.adapter import Adapter, load_adapter
from character.weights.safetensors_io import (
    StreamingSafetensorsWriter,
    TensorFile,
    open_safetensors,
    read_header,
    sha256_in_background,
    tensor_nbytes,
)

FOLD_FILE = "character_fold.json"
INDEX = "model.safetensors.index.json"
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_SKIP = {INDEX, "pytorch_model.bin.index.json", "character_recipe.json", FOLD_FILE}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1GiB' or a byte count."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in _UNITS or value <= 0:
        raise UserError(f"--max-shard-size {text!r}: expected a size like 2GB, 500MB or 1GiB")
    return int(value * _UNITS[unit])


@dataclass
class BaseWeights:
    folder: Path
    shards: list[tuple[str, list[str]]]  # file name -> keys, in the checkpoint's own order
    specs: dict[str, tuple[str, tuple[int, ...]]]  # key -> (dtype, shape)
    file_of: dict[str, str]


def read_base_weights(folder: Path) -> BaseWeights:
    """The base checkpoint's tensor headers, from its index or its single model.safetensors."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"base model: {index} is not a valid safetensors index ({e})") from None
        files = list(dict.fromkeys(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"base model {folder}: no safetensors weights (model.safetensors or {INDEX})")
    shards, specs, file_of = [], {}, {}
    for name in files:
        header = read_header(folder / name, "base model")
        for k, spec in header.items():
            specs[k] = spec
            file_of[k] = name
        shards.append((name, list(header)))
    return BaseWeights(folder, shards, specs, file_of)


_IN_BLOCK = re.compile(r"\.\d+\.")


def _embedding_keys(config_path: Path) -> tuple[str | None, str | None]:
    """Checkpoint names of the input and output embeddings, from a meta-device model (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_path.parent)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    ids = {id(model.get_input_embeddings()): "in", id(model.get_output_embeddings()): "out"}
    found = {}
    for name, module in model.named_modules():
        if id(module) in ids and ids[id(module)] not in found:
            found[ids[id(module)]] = f"{name}.weight"
    return found.get("in"), found.get("out")


def fold_adapter(
    adapter: str,
    output: str | Path,
    base_model: str | None = None,
    workdir: str | Path | None = None,
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write base + adapter as a full model folder at `output`; returns its path.

    `base_model` is 'tiny' or a local HF folder, defaulting to the adapter's base_model_name_or_path.
    The base's shard layout is kept unless `max_shard_size` asks for a new one.
    """
    out = Path(output).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists (use --overwrite to replace it)")
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    ad = load_adapter(adapter, "adapter")
    name = base_model or ad.base_model
    if not name:
        raise UserError(f"adapter {adapter}: no base_model_name_or_path in its config; pass --base-model")
    from character.backend.local import resolve_model  # after the cheap checks: it imports torch
    from character.settings import Settings, Workspace

    base_dir = resolve_model(name, Workspace(workdir if workdir is not None else Settings().workdir))
    base = read_base_weights(base_dir)
    base_cfg = json.loads((base_dir / "config.json").read_text())
    untie, extra = _untied_head(ad, base, base_cfg)
    target = _fold_targets(ad, adapter, base)
    ad.check_finite()  # before the long part: a NaN fails in a second, not after the whole model
    adapter_hash = sha256_in_background(ad.weights)
    names, groups = _output_shards(base, extra, limit)

    with atomic_dir(out) as tmp:
        _copy_base_files(base_dir, tmp)
        if untie:
            (tmp / "config.json").write_text(json.dumps(_untied_config(base_cfg), indent=2, sort_keys=True) + "\n")
        folding = _Folding(ad, adapter, base, extra, target)
        weight_map, total_size = folding.write_shards(tmp, names, groups)
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        provenance = {
            "adapter": adapter,
            "adapter_path": str(ad.folder.resolve()),
            "adapter_sha256": adapter_hash.result(),
            "base_model": str(base_dir),
            "untied_embeddings": untie,
            "shards": len(groups),
            "max_shard_size": limit,
        }
        (tmp / FOLD_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return out


def _untied_head(ad: Adapter, base: BaseWeights, base_cfg: dict) -> tuple[bool, dict[str, str]]:
    """Whether the output unties the embeddings, and the new tensors that needs ({new key: key copied from}).

    Adapting either side of a tied pair: each side must change alone, so the output is untied and the
    head gets its own copy if the checkpoint stores only the embedding."""
    tied = bool(base_cfg.get("tie_word_embeddings", base_cfg.get("text_config", {}).get("tie_word_embeddings", False)))
    keys = {f"{mname}.weight" for mname in ad.modules}
    extra: dict[str, str] = {}
    untie = False
    # Embeddings never sit inside the numbered blocks; an adapter that touches only blocks cannot
    # touch a tied pair (and we skip building a meta model to find the pair's names).
    if tied and any(not _IN_BLOCK.search(f".{mname}.") for mname in ad.modules):
        in_key, out_key = _embedding_keys(base.folder / "config.json")
        untie = in_key in keys or out_key in keys
        if untie and in_key in base.specs and out_key not in base.specs:
            extra[out_key] = in_key
            base.specs[out_key] = base.specs[in_key]
    return untie, extra


def _untied_config(base_cfg: dict) -> dict:
    """The base's config with its embeddings untied (also in a nested text_config)."""
    cfg = dict(base_cfg)
    cfg["tie_word_embeddings"] = False
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = {**cfg["text_config"], "tie_word_embeddings": False}
    return cfg


def _fold_targets(ad: Adapter, adapter: str, base: BaseWeights) -> dict[str, str]:
    """{base weight key: adapter module} for every module, each checked to have a weight of its shape."""
    fan_in_fan_out = bool(ad.config.get("fan_in_fan_out"))
    target: dict[str, str] = {}
    for mname, m in ad.modules.items():
        key = f"{mname}.weight"
        if key not in base.specs:
            raise UserError(f"adapter {adapter}: module {mname} has no weight {key} in base model {base.folder}")
        shape = base.specs[key][1]
        want = (m.in_features, m.out_features) if (fan_in_fan_out or m.embedding) else (m.out_features, m.in_features)
        if tuple(shape) != want:
            raise UserError(
                f"adapter {adapter}: module {mname} expects a {want} weight but base model "
                f"{base.folder} has {tuple(shape)}"
            )
        target[key] = mname
    return target


def _output_shards(base: BaseWeights, extra: dict[str, str], limit: int | None) -> tuple[list[str], list[list[str]]]:
    """The output's shard file names and the keys in each: the base's shards (an untied head joins the
    shard of its source), or a new packing of at most `limit` bytes per shard."""
    keys_in_order = []
    groups: list[list[str]] = []
    for _, shard_keys in base.shards:
        group = list(shard_keys)
        for new, src in extra.items():
            if src in shard_keys:
                group.append(new)
        groups.append(group)
        keys_in_order += group
    if limit is not None:
        groups, size = [[]], 0
        for k in keys_in_order:
            n = tensor_nbytes(*base.specs[k])
            if groups[-1] and size + n > limit:
                groups.append([])
                size = 0
            groups[-1].append(k)
            size += n
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    return names, groups


def _copy_base_files(base_dir: Path, dest: Path) -> None:
    """Everything of the base folder but its weights and index (tokenizer, config, generation config)."""
    for item in base_dir.iterdir():
        if item.name in _SKIP or item.name.endswith(_WEIGHT_FILES) or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name)
        else:
            shutil.copy2(item, dest / item.name)


@dataclass
class _Folding:
    """The tensors of the output: base weights streamed through, adapted ones with their LoRA update added."""

    ad: Adapter
    adapter: str  # as the caller named it, for errors
    base: BaseWeights
    extra: dict[str, str]  # new key -> key whose base values it starts from
    target: dict[str, str]  # base key -> module name

    def write_shards(self, tmp: Path, names: list[str], groups: list[list[str]]) -> tuple[dict[str, str], int]:
        """Write every shard; returns the index's weight map and total size."""
        handles: dict[str, TensorFile] = {}  # base shards, opened when first needed
        weight_map: dict[str, str] = {}
        total_size = 0
        with self.ad.open() as fa:
            try:
                for fname, group in zip(names, groups):
                    specs = [(k, *self.base.specs[k]) for k in group]
                    with StreamingSafetensorsWriter(tmp / fname, specs) as w:
                        for k in group:
                            src = self.extra.get(k, k)
                            fpath = self.base.file_of[src]
                            if fpath not in handles:
                                handles[fpath] = open_safetensors(self.base.folder / fpath, "base model").__enter__()
                            if k not in self.target:  # unchanged: its bytes stream through, never whole in memory
                                handles[fpath].copy_raw(src, w, as_name=k)
                            else:
                                w.write(k, self._folded(handles[fpath].get_tensor(src), self.target[k], fa))
                            weight_map[k] = fname
                            total_size += tensor_nbytes(*self.base.specs[k])
            finally:
                for h in handles.values():
                    h.__exit__(None, None, None)
        return weight_map, total_size

    def _folded(self, t, mname: str, fa: TensorFile):
        """W + scaling x (B @ A), in W's dtype."""
        import torch

        m = self.ad.modules[mname]
        if m.name in self.ad.saved_base:
            saved = fa.get_tensor(self.ad.saved_base[m.name][0])
            if not torch.equal(saved.to(t.dtype), t):
                raise UserError(
                    f"adapter {self.adapter}: its saved base weight for {m.name} "
                    f"differs from base model {self.base.folder} (trained base layers "
                    "are not supported)"
                )
        a = fa.get_tensor(m.a_key).float()  # finite: checked before any shard was written
        b = fa.get_tensor(m.b_key).float()
        # PEFT's merge arithmetic: W + scaling x (B @ A), transposed for Conv1D and embeddings; one
        # fused multiply-add into a float32 copy of W.
        merged = t.float()
        if bool(self.ad.config.get("fan_in_fan_out")) or m.embedding:
            merged.T.addmm_(b, a, alpha=m.scaling)
        else:
            merged.addmm_(b, a, alpha=m.scaling)
        return merged.to(t.dtype)
