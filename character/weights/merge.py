"""Merging two LoRA adapters from their files alone, one module at a time.

A LoRA module adds dW = B @ A * s to a base weight, with s = lora_alpha / r (or / sqrt(r) with
rsLoRA), where r and alpha may be overridden per module by rank_pattern / alpha_pattern.

- exact: w1*dW1 + w2*dW2 written as one LoRA by concatenating along the rank, with each input's
  weight and scale folded into its B. Output scale is 1 (lora_alpha = r), rank r1 + r2.
- svd: the best rank-R approximation of that exact sum, from QR factors of the concatenated B and
  A (never the dense out x in matrix).
- linear: PEFT's add_weighted_adapter(..., combination_type="linear"), bit for bit. It is *not*
  the weighted sum of updates (it mixes A's and B's separately, with cross terms); it is here to
  reproduce the paper's reference merge.

The base model is never loaded. Tensors are read with safetensors one module at a time and the
output is streamed to disk, so memory stays near one module's tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from character.errors import UserError
from character.storage import atomic_dir, uri_to_path

if TYPE_CHECKING:
    import torch

# The merge itself needs only numpy: importing torch would cost more time and memory than the
# merge of a 1B model's adapters. torch is imported for `svd` and by fold (bfloat16 rounding).

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE_FILE = "character_merge.json"
Method = Literal["exact", "svd", "linear"]

_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
    r"lora_embedding_A|lora_embedding_B)$"
)
# PEFT also saves the base weight of a targeted embedding-like layer (e.g. lm_head); we carry it along.
_BASE_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.base_layer\.weight$")


# -- safetensors: headers read by hand, data streamed ---------------------------------------------
_SIZES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


# safetensors dtype names <-> numpy and torch dtypes (torch by attribute name: imported only when used)
_NUMPY = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NUMPY_NAMES = {np.dtype(v): k for k, v in _NUMPY.items()}
_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def _torch_dtype_name(dtype) -> str:
    import torch

    return {getattr(torch, v): k for k, v in _TORCH_NAMES.items()}[dtype]


def tensor_nbytes(dtype: str, shape) -> int:
    return _SIZES[dtype] * math.prod(shape)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_header(path: Path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a .safetensors header, checked against the file's size.

    A truncated or garbled file fails here, with one line, before any tensor is read.
    """
    return _parse_header(path, what)[0]


def _parse_header(path: Path, what: str) -> tuple[dict, dict[str, tuple[int, int]], int]:
    """(specs, {name: (begin, end)} data offsets, where the data starts)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: missing file {path}")
    bad = f"{what}: {path} is not a readable safetensors file"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100_000_000:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(n))
        out, offsets, end = {}, {}, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, stop) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            if dtype not in _SIZES or stop - begin != tensor_nbytes(dtype, shape):
                raise ValueError(f"tensor {name} has an inconsistent dtype, shape or size")
            out[name] = (dtype, shape)
            offsets[name] = (int(begin), int(stop))
            end = max(end, stop)
        if 8 + n + end > size:
            raise ValueError("truncated: tensor data runs past the end of the file")
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise UserError(f"{bad} ({_first_line(e)})") from None
    return out, offsets, 8 + n


class StreamingSafetensorsWriter:
    """Writes a .safetensors file tensor by tensor: the header is known up front, data follows in order.

    safetensors' own save_file needs every tensor in memory at once; this needs one.
    """

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        self._specs = list(specs)
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, dtype, shape in self._specs:
            n = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data to 8 bytes
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: "torch.Tensor | np.ndarray") -> None:
        exp_name, exp_dtype, exp_shape = self._specs[self._next]
        if isinstance(tensor, np.ndarray):
            dtype, data = _NUMPY_NAMES.get(tensor.dtype), np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
        else:
            import torch

            dtype = _torch_dtype_name(tensor.dtype)
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if name != exp_name or dtype != exp_dtype or tuple(tensor.shape) != tuple(exp_shape):
            raise RuntimeError(
                f"streamed tensor {name} {tuple(tensor.shape)} does not match the header's "
                f"{exp_name} {exp_dtype} {tuple(exp_shape)}"
            )
        self._f.write(data.data)
        self._next += 1

    def write_raw(self, name: str, dtype: str, shape, chunks) -> None:
        """A tensor given as its raw bytes, in pieces (copied from another safetensors file)."""
        exp_name, exp_dtype, exp_shape = self._specs[self._next]
        if (name, dtype, tuple(shape)) != (exp_name, exp_dtype, tuple(exp_shape)):
            raise RuntimeError(f"streamed tensor {name} does not match the header's {exp_name}")
        written = 0
        for piece in chunks:
            self._f.write(piece)
            written += len(piece)
        if written != tensor_nbytes(dtype, shape):
            raise RuntimeError(f"tensor {name}: {written} bytes streamed, {tensor_nbytes(dtype, shape)} expected")
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self._specs):
            raise RuntimeError(f"only {self._next} of {len(self._specs)} tensors were written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._f.close()


class TensorFile:
    """A .safetensors file read tensor by tensor with plain reads into fresh buffers.

    safetensors' safe_open maps the whole file: every page a read touches stays resident in this
    process until the file is closed, so reading a 2.5 GB checkpoint once costs 2.5 GB of resident
    memory. Here a tensor's memory is freed as soon as the caller drops it.
    """

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        self.specs, self._offsets, self._start = _parse_header(self.path, what)
        self._f = open(self.path, "rb")

    def _read(self, key: str) -> np.ndarray:
        begin, end = self._offsets[key]
        buf = np.empty(end - begin, dtype=np.uint8)  # uninitialized: the read fills it
        self._f.seek(self._start + begin)
        if self._f.readinto(memoryview(buf)) != len(buf):
            raise ValueError(f"short read of tensor {key}")
        return buf

    def get_tensor(self, key: str) -> "torch.Tensor":
        import torch

        dtype, shape = self.specs[key]
        buf = self._read(key)
        torch_dtype = getattr(torch, _TORCH_NAMES[dtype])
        if not len(buf):
            return torch.empty(shape, dtype=torch_dtype)
        return torch.from_numpy(buf).view(torch_dtype).reshape(shape)

    def get_array(self, key: str) -> np.ndarray:
        """The tensor as a numpy array; bfloat16 (which numpy lacks) widens exactly to float32."""
        dtype, shape = self.specs[key]
        if dtype == "BF16":
            bits = self._read(key).view(np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).reshape(shape)
        if dtype not in _NUMPY:
            return self.get_tensor(key).float().numpy()  # float8: through torch
        return self._read(key).view(_NUMPY[dtype]).reshape(shape)

    def copy_raw(
        self, key: str, writer: "StreamingSafetensorsWriter", as_name: str | None = None, chunk: int = 16 << 20
    ) -> None:
        """Stream a tensor's bytes unchanged into `writer` (never all in memory), optionally renamed."""
        begin, end = self._offsets[key]
        self._f.seek(self._start + begin)
        writer.write_raw(as_name or key, *self.specs[key], _chunks(self._f, end - begin, chunk))

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def _chunks(f, n: int, size: int):
    while n > 0:
        data = f.read(min(size, n))
        if not data:
            raise ValueError("file ended inside a tensor")
        n -= len(data)
        yield data


def open_safetensors(path: Path, what: str) -> TensorFile:
    """A TensorFile, with a one-line error for an unreadable file."""
    try:
        return TensorFile(path, what)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{what}: {path} is not a readable safetensors file ({_first_line(e)})") from None


def read_array(handle: TensorFile, key: str, what: str) -> np.ndarray:
    try:
        a = handle.get_array(key)
    except Exception as e:
        raise UserError(f"{what}: tensor {key} cannot be read ({_first_line(e)})") from None
    # A float64 sum is finite exactly when every element is (it cannot overflow for these sizes).
    if a.dtype.kind == "f" and not math.isfinite(float(a.sum(dtype=np.float64))):
        raise UserError(f"{what}: tensor {key} contains NaN or Inf")
    return a


def sha256_in_background(path: Path) -> "Future[str]":
    """Hash a file on a worker thread (hashlib releases the GIL); `.result()` gives the hex digest.

    The merge and fold read the same files tensor by tensor meanwhile, so on a multi-core
    machine the provenance hash costs almost no wall time."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(file_sha256, path)
    pool.shutdown(wait=False)  # the thread ends with the hash
    return future


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- adapters on disk -----------------------------------------------------------------------------
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

    def open(self):
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
        raise UserError(f"{what}: {cfg_path} is not valid JSON ({_first_line(e)})") from None
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
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file() and (folder / "adapter_model.bin").is_file():
        raise UserError(f"{what}: only safetensors adapters are supported (found adapter_model.bin)")
    adapter = Adapter(label, source, folder, cfg, weights)

    parts: dict[str, dict[str, tuple[str, tuple]]] = {}
    for key, (dtype, shape) in read_header(weights, what).items():
        if mb := _BASE_KEY.match(key):
            adapter.saved_base[mb["module"]] = (key, dtype, shape)
            continue
        m = _KEY.match(key)
        if not m:
            raise UserError(f"{what}: unsupported tensor {key} (plain LoRA A/B weights only)")
        parts.setdefault(m["module"], {})[m["part"].split(".")[0].replace("embedding_", "")] = (key, shape)
    if not parts:
        raise UserError(f"{what}: {weights.name} holds no LoRA tensors")

    rslora = bool(cfg.get("use_rslora"))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for name, p in sorted(parts.items()):
        if set(p) != {"lora_A", "lora_B"}:
            raise UserError(f"{what}: module {name} has {sorted(p)} but needs both lora_A and lora_B")
        (a_key, a_shape), (b_key, b_shape) = p["lora_A"], p["lora_B"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise UserError(f"{what}: module {name} has inconsistent shapes A{a_shape} B{b_shape}")
        r = int(_pattern_value(rank_pattern, name, cfg["r"]))
        if r != a_shape[0]:
            raise UserError(f"{what}: module {name} has rank {a_shape[0]} but the config says r={r}")
        alpha = float(_pattern_value(alpha_pattern, name, cfg["lora_alpha"]))
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        adapter.modules[name] = LoraModule(
            name, a_key, b_key, r, b_shape[0], a_shape[1], scaling, embedding=a_key.endswith("lora_embedding_A")
        )
    return adapter


def _same_base(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_compatible(x: Adapter, y: Adapter) -> None:
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


# -- the three methods, per module ----------------------------------------------------------------
def exact_factors(a1, b1, c1: float, a2, b2, c2: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with B @ A == c1 * B1 @ A1 + c2 * B2 @ A2, where c = weight x scaling.

    Each B is scaled in float64 and rounded once to float32; the A's are copied as they are."""
    a = np.concatenate([a1, a2], axis=0).astype(np.float32, copy=False)
    b = np.concatenate(
        [(b1.astype(np.float64) * c1).astype(np.float32), (b2.astype(np.float64) * c2).astype(np.float32)], axis=1
    )
    return a, b


def svd_factors(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best rank-`rank` (A', B') of B @ A, and the singular values it discards.

    B = Qb Rb and A^T = Qa Ra give B A = Qb (Rb Ra^T) Qa^T; only the small K x K core is
    decomposed. The singular values are split evenly between the factors (sqrt on each side),
    which keeps A and B on a similar scale for any further training. Zero-padded to `rank`.
    """
    import torch

    a, b = torch.from_numpy(np.asarray(a, dtype=np.float64)), torch.from_numpy(np.asarray(b, dtype=np.float64))
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    new_b = torch.zeros(b.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, a.shape[1], dtype=torch.float64)
    new_b[:, :keep] = (qb @ u[:, :keep]) * root
    new_a[:keep] = (root[:, None] * vh[:keep]) @ qa.T
    return new_a.numpy(), new_b.numpy(), s[keep:].numpy()


def peft_linear_factors(a1, b1, c1: float, a2, b2, c2: float) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's `_generalized_task_arithmetic_weighted_adapter` for "linear", with the same float ops.

    c = weight x scaling (Python floats, as PEFT computes them); PEFT turns the per-adapter factors
    into a float32 tensor and sums the weighted stack. The sign goes on A only.
    """
    wa, wb = [], []
    for c in (c1, c2):
        sign = 1 if c >= 0 else -1
        wa.append(np.float32(math.sqrt(abs(c)) * sign))
        wb.append(np.float32(math.sqrt(abs(c))))
    out = []
    for x, y, (wx, wy) in ((a1, a2, wa), (b1, b2, wb)):
        z = np.multiply(x, wx, dtype=np.float32)  # x*wx + y*wy, each product rounded as PEFT's are
        z += np.multiply(y, wy, dtype=np.float32)
        out.append(z)
    return out[0], out[1]


# -- the merge ------------------------------------------------------------------------------------
@dataclass
class MergeResult:
    output: Path
    method: str
    weights: tuple[float, float]
    rank: int
    warnings: list[str]
    provenance: dict


def merge_adapters(
    dpo: str,
    sft: str,
    output: str | Path,
    dpo_weight: float = 1.0,
    sft_weight: float = 0.25,
    method: Method = "exact",
    rank: int | None = None,
    normalize: bool = False,
    overwrite: bool = False,
) -> MergeResult:
    """Merge `dpo_weight * dW_dpo + sft_weight * dW_sft` into a PEFT adapter folder at `output`.

    Every check runs before anything is written; the folder appears in one rename.
    """
    if method not in ("exact", "svd", "linear"):
        raise UserError(f"--method must be exact, svd or linear, not {method!r}")
    out = Path(output).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists (use --overwrite to replace it)")
    for w, opt in ((dpo_weight, "--dpo-weight"), (sft_weight, "--sft-weight")):
        if not math.isfinite(w):
            raise UserError(f"{opt} must be a finite number, not {w}")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be at least 1, not {rank}")
    if rank is not None and method != "svd":
        raise UserError("--rank only applies to --method svd")

    x, y = load_adapter(dpo, "DPO adapter"), load_adapter(sft, "SFT adapter")
    check_compatible(x, y)
    if method == "linear":
        for name, mx in x.modules.items():
            if mx.rank != y.modules[name].rank:
                raise UserError(
                    f"--method linear needs equal LoRA ranks: {x.label} has r={mx.rank}, {y.label} has "
                    f"r={y.modules[name].rank} (module {name}); use --method exact or svd"
                )

    warnings: list[str] = []
    w1, w2 = float(dpo_weight), float(sft_weight)
    if normalize:
        total = w1 + w2
        if not total > 0:
            raise UserError(f"--normalize needs a positive total weight, got {w1} + {w2} = {total}")
        w1, w2 = w1 / total, w2 / total
        warnings.append(
            f"--normalize rescales the weights {dpo_weight:g}/{sft_weight:g} to {w1:g}/{w2:g}: this "
            "changes the magnitude of both updates, it is not the same model"
        )

    hashes = sha256_in_background(x.weights), sha256_in_background(y.weights)
    # A NaN or Inf is found as each tensor is read below; the output folder only appears (by rename)
    # once everything succeeded, so a bad input leaves nothing behind.
    with x.open() as fx, y.open() as fy:
        for n, (key, _, _) in x.saved_base.items():
            if not np.array_equal(fx.get_array(key), fy.get_array(y.saved_base[n][0])):
                raise UserError(f"{x.label} and {y.label} carry different saved base weights for {n}")

    names = sorted(x.modules)
    out_rank: dict[str, int] = {}
    for n in names:
        r1, r2 = x.modules[n].rank, y.modules[n].rank
        out_rank[n] = {"exact": r1 + r2, "linear": r1, "svd": rank or max(x.max_rank, y.max_rank)}[method]
    specs = []
    for n in names:
        m = x.modules[n]
        specs.append((m.a_key, "F32", (out_rank[n], m.in_features)))
        specs.append((m.b_key, "F32", (m.out_features, out_rank[n])))
    specs += [(key, dtype, shape) for key, dtype, shape in x.saved_base.values()]  # copied as they are
    specs.sort(key=lambda s: s[0])  # stable header order, A before B within a module

    # The adapter's nominal r is the rank most modules share; the rest go in rank_pattern.
    nominal = {
        "exact": int(x.config["r"]) + int(y.config["r"]),
        "linear": int(x.config["r"]),
        "svd": rank or max(x.max_rank, y.max_rank),
    }[method]
    odd = {n: r for n, r in out_rank.items() if r != nominal}
    if len(odd) > len(names) / 2:
        nominal = max(set(out_rank.values()), key=list(out_rank.values()).count)
        odd = {n: r for n, r in out_rank.items() if r != nominal}
    config = dict(x.config)
    config.update(
        r=nominal,
        lora_alpha=nominal,
        use_rslora=False,  # scale 1: the factors carry every weight and scale
        # Full module names, escaped: PEFT reads pattern keys as regexes matched against the name's tail.
        rank_pattern={re.escape(n): r for n, r in odd.items()},
        alpha_pattern={re.escape(n): r for n, r in odd.items()},
        base_model_name_or_path=x.config.get("base_model_name_or_path"),
        inference_mode=True,
    )

    discarded: dict[str, float] = {}
    with atomic_dir(out) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        module_of = {k: n for n in names for k in (x.modules[n].a_key, x.modules[n].b_key)}
        with x.open() as fx, y.open() as fy, StreamingSafetensorsWriter(tmp / ADAPTER_WEIGHTS, specs) as writer:
            # A module's A and B are computed together; the one written second waits in `pending`
            # (sorted keys put them next to each other, so at most one module is held).
            pending: dict[str, np.ndarray] = {}
            for key, _, _ in specs:
                if key not in module_of:  # a saved base weight, identical in both inputs
                    fx.copy_raw(key, writer)
                    continue
                n = module_of[key]
                if key not in pending:
                    mx, my = x.modules[n], y.modules[n]
                    a1, b1 = read_array(fx, mx.a_key, x.label), read_array(fx, mx.b_key, x.label)
                    a2, b2 = read_array(fy, my.a_key, y.label), read_array(fy, my.b_key, y.label)
                    c1, c2 = w1 * mx.scaling, w2 * my.scaling
                    if method == "linear":
                        # PEFT computes in the loaded model's dtype: float32 for a float32 base.
                        a, b = peft_linear_factors(a1, b1, c1, a2, b2, c2)
                    else:
                        a, b = exact_factors(a1, b1, c1, a2, b2, c2)
                        if method == "svd":
                            a, b, rest = svd_factors(a, b, out_rank[n])
                            discarded[n] = float(np.sqrt(np.square(rest).sum()))
                    pending[mx.a_key] = a.astype(np.float32, copy=False)
                    pending[mx.b_key] = b.astype(np.float32, copy=False)
                writer.write(key, pending.pop(key))
        provenance = {
            "method": method,
            "sources": [
                {
                    "role": "dpo",
                    "source": dpo,
                    "path": str(x.folder.resolve()),
                    "r": int(x.config["r"]),
                    "lora_alpha": x.config["lora_alpha"],
                    "sha256": hashes[0].result(),
                },
                {
                    "role": "sft",
                    "source": sft,
                    "path": str(y.folder.resolve()),
                    "r": int(y.config["r"]),
                    "lora_alpha": y.config["lora_alpha"],
                    "sha256": hashes[1].result(),
                },
            ],
            "weights": {"dpo": dpo_weight, "sft": sft_weight},
            "effective_weights": {"dpo": w1, "sft": w2},
            "normalized": normalize,
            "rank": nominal,
            "base_model_name_or_path": x.config.get("base_model_name_or_path"),
        }
        if method == "svd":
            provenance["svd_discarded_frobenius"] = {
                "max": max(discarded.values(), default=0.0),
                "per_module": discarded,
            }
        if method == "linear":
            provenance["note"] = (
                "PEFT add_weighted_adapter linear: mixes A and B separately, so the update is "
                "not the weighted sum of the two updates"
            )
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return MergeResult(out, method, (w1, w2), nominal, warnings, provenance)
