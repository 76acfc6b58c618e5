"""`character merge` and `character fold`: adapters combined, or folded into their base model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from character.commands.workspace import settings_for


def _downloaded(source: str, dst: Path) -> str:
    """A `tinker://` checkpoint is exported, downloaded and converted to a PEFT adapter first."""
    if not source.startswith("tinker://"):
        return source
    from character.backend.tinker import TinkerService
    from character.weights.tinker_export import download_adapter

    download_adapter(TinkerService(settings_for(None)), source, dst)
    return str(dst)


def merge(
    dpo: str = typer.Argument(..., help="DPO adapter: a PEFT adapter folder or file:// URI"),
    sft: str = typer.Argument(..., help="SFT adapter: a PEFT adapter folder or file:// URI"),
    output: Path = typer.Option(..., "--output", "-o", help="folder to write the merged adapter to"),
    dpo_weight: float = typer.Option(1.0, help="weight of the DPO update"),
    sft_weight: float = typer.Option(0.25, help="weight of the SFT update"),
    method: str = typer.Option(
        "exact",
        help="exact: w1*dW1 + w2*dW2 at rank r1+r2 | svd: its best rank-R "
        "approximation | linear: PEFT's add_weighted_adapter 'linear', bit for bit",
    ),
    rank: Optional[int] = typer.Option(None, help="output rank for svd (default: the larger input rank)"),
    normalize: bool = typer.Option(
        False, "--normalize", help="rescale the weights to sum to 1 (this changes the magnitude of both updates)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
) -> None:
    """Merge a DPO and an SFT LoRA adapter from their files (the base model is never loaded)."""
    import tempfile

    from character.weights.merge import merge_adapters

    with tempfile.TemporaryDirectory(prefix="character-merge-") as tmp:
        dpo, sft = (_downloaded(src, Path(tmp) / label) for src, label in ((dpo, "dpo"), (sft, "sft")))
        res = merge_adapters(
            dpo,
            sft,
            output,
            dpo_weight=dpo_weight,
            sft_weight=sft_weight,
            method=method,
            rank=rank,
            normalize=normalize,
            overwrite=overwrite,
        )
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    typer.echo(
        f"merged ({res.method}, r={res.rank}): {res.weights[0]:g} x DPO + {res.weights[1]:g} x SFT -> {res.output}"
    )


def fold(
    adapter: str = typer.Argument(..., help="a PEFT adapter folder or file:// URI"),
    output: Path = typer.Option(..., "--output", "-o", help="folder to write the full model to"),
    base_model: Optional[str] = typer.Option(
        None, help="'tiny' or a local Hugging Face model folder (default: the adapter's base model)"
    ),
    max_shard_size: Optional[str] = typer.Option(None, help="e.g. 2GB; default: keep the base model's shards"),
    workdir: Optional[Path] = typer.Option(None, help="workspace folder (env CHARACTER_WORKDIR)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
) -> None:
    """Fold an adapter into its base model: a full Hugging Face model folder, written shard by shard."""
    from character.weights.fold import fold_adapter

    out = fold_adapter(
        adapter,
        output,
        base_model=base_model,
        workdir=settings_for(workdir).workdir,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )
    typer.echo(f"folded: {out}")
