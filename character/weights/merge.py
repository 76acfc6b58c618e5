"""Merging two LoRA adapters from their files alone, one module at a time.

With dW = B @ A * s for each input (character.weights.adapter):

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

import json
import math
import re
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from character.errors import UserError
from character.storage import atomic_dir
from character.weights.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, check_compatible, load_adapter
from character.weights.safetensors_io import StreamingSafetensorsWriter, read_array, sha256_in_background

# The merge itself needs only numpy: importing torch would cost more time and memory than the
# merge of a 1B model's adapters. torch is imported for `svd` and by fold (bfloat16 rounding).

PROVENANCE_FILE = "character_merge.json"
Method = Literal["exact", "svd", "linear"]
Spec = tuple[str, str, tuple[int, ...]]  # (tensor name, safetensors dtype, shape)


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
    out = _check_options(output, dpo_weight, sft_weight, method, rank, overwrite)
    x, y = load_adapter(dpo, "DPO adapter"), load_adapter(sft, "SFT adapter")
    check_compatible(x, y)
    if method == "linear":
        _check_equal_ranks(x, y)
    (w1, w2), warnings = _effective_weights(dpo_weight, sft_weight, normalize)
    hashes = sha256_in_background(x.weights), sha256_in_background(y.weights)
    # A NaN or Inf is found as each tensor is read; the output folder only appears (by rename) once
    # everything succeeded, so a bad input leaves nothing behind.
    _check_same_saved_base(x, y)

    out_rank = _module_ranks(x, y, method, rank)
    nominal, odd = _nominal_rank(x, y, method, rank, out_rank)
    with atomic_dir(out) as tmp:
        config = _output_config(x, nominal, odd)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        discarded = _write_merged_weights(tmp / ADAPTER_WEIGHTS, x, y, (w1, w2), method, out_rank)
        provenance = {
            "method": method,
            "sources": [_source("dpo", dpo, x, hashes[0]), _source("sft", sft, y, hashes[1])],
            "weights": {"dpo": dpo_weight, "sft": sft_weight},
            "effective_weights": {"dpo": w1, "sft": w2},
            "normalized": normalize,
            "rank": nominal,
            "base_model_name_or_path": x.config.get("base_model_name_or_path"),
            **_method_notes(method, discarded),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return MergeResult(out, method, (w1, w2), nominal, warnings, provenance)


# -- checks before any tensor is read ---------------------------------------------------------------
def _check_options(
    output: str | Path, dpo_weight: float, sft_weight: float, method: str, rank: int | None, overwrite: bool
) -> Path:
    """The options on their own (no file read yet); returns the output folder."""
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
    return out


def _check_equal_ranks(x: Adapter, y: Adapter) -> None:
    """PEFT's linear merge adds A's (and B's) elementwise, so every module needs the same rank in both."""
    for name, mx in x.modules.items():
        if mx.rank != y.modules[name].rank:
            raise UserError(
                f"--method linear needs equal LoRA ranks: {x.label} has r={mx.rank}, {y.label} has "
                f"r={y.modules[name].rank} (module {name}); use --method exact or svd"
            )


def _effective_weights(dpo_weight: float, sft_weight: float, normalize: bool) -> tuple[tuple[float, float], list[str]]:
    """The weights the merge applies (rescaled to sum to 1 with --normalize), and the warning that says so."""
    w1, w2 = float(dpo_weight), float(sft_weight)
    if not normalize:
        return (w1, w2), []
    total = w1 + w2
    if not total > 0:
        raise UserError(f"--normalize needs a positive total weight, got {w1} + {w2} = {total}")
    w1, w2 = w1 / total, w2 / total
    warning = (
        f"--normalize rescales the weights {dpo_weight:g}/{sft_weight:g} to {w1:g}/{w2:g}: this "
        "changes the magnitude of both updates, it is not the same model"
    )
    return (w1, w2), [warning]


def _check_same_saved_base(x: Adapter, y: Adapter) -> None:
    """The base weights both adapters carry (same names and shapes: check_compatible) hold the same values."""
    with x.open() as fx, y.open() as fy:
        for n, (key, _, _) in x.saved_base.items():
            if not np.array_equal(fx.get_array(key), fy.get_array(y.saved_base[n][0])):
                raise UserError(f"{x.label} and {y.label} carry different saved base weights for {n}")


# -- the output's shape -------------------------------------------------------------------------------
def _module_ranks(x: Adapter, y: Adapter, method: str, rank: int | None) -> dict[str, int]:
    """Each module's rank in the merged adapter."""
    out_rank: dict[str, int] = {}
    for n in sorted(x.modules):
        r1, r2 = x.modules[n].rank, y.modules[n].rank
        out_rank[n] = {"exact": r1 + r2, "linear": r1, "svd": rank or max(x.max_rank, y.max_rank)}[method]
    return out_rank


def _nominal_rank(
    x: Adapter, y: Adapter, method: str, rank: int | None, out_rank: dict[str, int]
) -> tuple[int, dict[str, int]]:
    """The adapter's nominal r, the rank most modules share, and the modules of another rank (rank_pattern)."""
    nominal = {
        "exact": int(x.config["r"]) + int(y.config["r"]),
        "linear": int(x.config["r"]),
        "svd": rank or max(x.max_rank, y.max_rank),
    }[method]
    odd = {n: r for n, r in out_rank.items() if r != nominal}
    if len(odd) > len(out_rank) / 2:
        nominal = max(set(out_rank.values()), key=list(out_rank.values()).count)
        odd = {n: r for n, r in out_rank.items() if r != nominal}
    return nominal, odd


def _output_config(x: Adapter, nominal: int, odd: dict[str, int]) -> dict:
    """The DPO adapter's config with the merged ranks, at scale 1."""
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
    return config


def _output_specs(x: Adapter, out_rank: dict[str, int]) -> list[Spec]:
    """The merged file's tensors, in header order: float32 factors, and the saved base weights as they are."""
    specs = []
    for n in sorted(x.modules):
        m = x.modules[n]
        specs.append((m.a_key, "F32", (out_rank[n], m.in_features)))
        specs.append((m.b_key, "F32", (m.out_features, out_rank[n])))
    specs += [(key, dtype, shape) for key, dtype, shape in x.saved_base.values()]  # copied as they are
    specs.sort(key=lambda s: s[0])  # stable header order, A before B within a module
    return specs


# -- the tensors ----------------------------------------------------------------------------------------
def _write_merged_weights(
    path: Path, x: Adapter, y: Adapter, weights: tuple[float, float], method: str, out_rank: dict[str, int]
) -> dict[str, float]:
    """Stream the merged adapter's tensors to `path`; returns svd's discarded Frobenius norm per module."""
    specs = _output_specs(x, out_rank)
    module_of = {k: n for n in x.modules for k in (x.modules[n].a_key, x.modules[n].b_key)}
    discarded: dict[str, float] = {}
    with x.open() as fx, y.open() as fy, StreamingSafetensorsWriter(path, specs) as writer:
        # A module's A and B are computed together; the one written second waits in `pending`
        # (sorted keys put them next to each other, so at most one module is held).
        pending: dict[str, np.ndarray] = {}
        for key, _, _ in specs:
            if key not in module_of:  # a saved base weight, identical in both inputs
                fx.copy_raw(key, writer)
                continue
            if key not in pending:
                n = module_of[key]
                mx, my = x.modules[n], y.modules[n]
                c1, c2 = weights[0] * mx.scaling, weights[1] * my.scaling
                a1, b1 = read_array(fx, mx.a_key, x.label), read_array(fx, mx.b_key, x.label)
                a2, b2 = read_array(fy, my.a_key, y.label), read_array(fy, my.b_key, y.label)
                a, b, rest = _merged_factors(method, (a1, b1, c1), (a2, b2, c2), out_rank[n])
                if rest is not None:
                    discarded[n] = float(np.sqrt(np.square(rest).sum()))
                pending[mx.a_key] = a.astype(np.float32, copy=False)
                pending[mx.b_key] = b.astype(np.float32, copy=False)
            writer.write(key, pending.pop(key))
    return discarded


def _merged_factors(method: str, first: tuple, second: tuple, rank: int):
    """(A, B, singular values svd discards or None) for one module from each input's (A, B, weight x scale)."""
    if method == "linear":
        # PEFT computes in the loaded model's dtype: float32 for a float32 base.
        return (*peft_linear_factors(*first, *second), None)
    a, b = exact_factors(*first, *second)
    if method == "svd":
        return svd_factors(a, b, rank)
    return a, b, None


# -- provenance -------------------------------------------------------------------------------------------
def _source(role: str, source: str, adapter: Adapter, sha256: Future[str]) -> dict:
    return {
        "role": role,
        "source": source,
        "path": str(adapter.folder.resolve()),
        "r": int(adapter.config["r"]),
        "lora_alpha": adapter.config["lora_alpha"],
        "sha256": sha256.result(),
    }


def _method_notes(method: str, discarded: dict[str, float]) -> dict:
    """What the provenance says about the method: what svd threw away, or that linear is not a sum."""
    if method == "svd":
        return {"svd_discarded_frobenius": {"max": max(discarded.values(), default=0.0), "per_module": discarded}}
    if method == "linear":
        return {
            "note": "PEFT add_weighted_adapter linear: mixes A and B separately, so the update is "
            "not the weighted sum of the two updates"
        }
    return {}
