"""The held-out split of a generated data file: the rows evaluation uses and training never sees."""

from __future__ import annotations

import json
from pathlib import Path

from character.build.paths import BuildPaths
from character.datagen.engine import item_seed, normalize_prompt
from character.storage import read_jsonl, write_text_atomic


def split_heldout(path: Path, fraction: float, seed: int) -> tuple[Path, Path, dict]:
    """Write <data>/train/<name> and <data>/heldout/<name>, and return counts of both sides.

    DPO rows are split by prompt: all rows whose user prompt is the same text (whitespace and case
    normalised) land on one side, so no held-out prompt is ever trained on, however often the pool
    repeats. Introspection rows are split by item: their prompts are the fixed ten reflection prompts
    and the greetings, by design repeated; holding one out would drop a whole category from training.
    Which side a group lands on depends only on its key and the seed.
    """
    rows = read_jsonl(path)
    keys = [
        ("prompt", normalize_prompt(r["prompt"][-1]["content"]))
        if "prompt" in r
        else (r.get("kind", ""), r["meta"]["index"])
        for r in rows
    ]
    groups = sorted(set(keys))
    n_held = min(len(groups) - 1, max(1 if fraction > 0 else 0, round(fraction * len(groups))))
    held = set(sorted(groups, key=lambda k: item_seed(seed, "heldout", *k))[: max(0, n_held)])
    train_path, held_path = BuildPaths.train_split(path), BuildPaths.heldout_split(path)
    for out, keep in ((train_path, False), (held_path, True)):
        write_text_atomic(
            out, "".join(json.dumps(r, sort_keys=True) + "\n" for r, k in zip(rows, keys) if (k in held) == keep)
        )
    n_held_rows = sum(k in held for k in keys)
    return (
        train_path,
        held_path,
        {
            "split_by": "prompt" if any(k[0] == "prompt" for k in keys) else "item",
            "train_rows": len(rows) - n_held_rows,
            "heldout_rows": n_held_rows,
            "train_groups": len(groups) - len(held),
            "heldout_groups": len(held),
        },
    )
