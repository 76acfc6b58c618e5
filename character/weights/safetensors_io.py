"""safetensors files read and written by hand, one tensor at a time.

The header is parsed here (so a truncated or garbled file fails with one line before any data is
read), tensors are read with plain reads into fresh buffers and written by a streaming writer, so
memory stays near one tensor whatever the file's size. Files are hashed for provenance on a worker
thread while they are being read.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from character.errors import UserError

if TYPE_CHECKING:
    import torch

# numpy is enough to read and write; torch is imported only for the dtypes numpy lacks (bfloat16,
# float8) and when a caller asks for torch tensors.

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


def first_line(e: Exception) -> str:
    """An exception's message cut to its first line: errors here are one-line user errors."""
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
        raise UserError(f"{bad} ({first_line(e)})") from None
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
        raise UserError(f"{what}: {path} is not a readable safetensors file ({first_line(e)})") from None


def read_array(handle: TensorFile, key: str, what: str) -> np.ndarray:
    try:
        a = handle.get_array(key)
    except Exception as e:
        raise UserError(f"{what}: tensor {key} cannot be read ({first_line(e)})") from None
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
