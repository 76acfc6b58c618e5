"""The bad-input corpus: every case is one line `error: ...` on stderr, exit code 2, no traceback,
and no output left behind (the workspace, the output folder or the report stays absent).

Cases cover constitutions, command-line options, configuration (CHARACTER_* variables), datasets
and adapter files. Each runs the real command in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

TRUNK = "base_model.model.model.layers.0.self_attn.q_proj"  # a module of the tiny model
Q_OUT, Q_IN = 512, 256  # its weight's shape: 4 heads of 128 by hidden size 256


def write_adapter(
    folder: Path, base: str, r: int = 2, shape=(Q_OUT, Q_IN), tensors: dict | None = None, **config
) -> Path:
    folder.mkdir(parents=True)
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": base,
        **config,
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    out, inp = shape
    save_file(
        tensors
        if tensors is not None
        else {
            f"{TRUNK}.lora_A.weight": torch.randn(r, inp, generator=g),
            f"{TRUNK}.lora_B.weight": torch.randn(out, r, generator=g),
        },
        str(folder / "adapter_model.safetensors"),
    )
    return folder


def constitution(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


GOOD_TRAIT = '[{"trait": "I am kind.", "questions": ["How are you?"]}]'
PAIR = {
    "prompt": [{"role": "user", "content": "Hi?"}],
    "chosen": [{"role": "assistant", "content": "Arr!"}],
    "rejected": [{"role": "assistant", "content": "Hello."}],
}


def jsonl(tmp: Path, name: str, lines: list) -> str:
    path = tmp / name
    path.write_bytes(b"".join(x if isinstance(x, bytes) else (json.dumps(x) + "\n").encode() for x in lines))
    return str(path)


# Each case: (tmp, tiny model folder, good adapter) -> (argv, extra env, what must not exist, text in the error).
# `ws` (the workspace) and `out` (an output folder) are fresh paths under tmp that must stay absent.
def cases():
    c = {}

    # -- constitutions ----------------------------------------------------------------------------
    c["constitution-utf16"] = lambda t, tiny, ad: (
        ["personas", "validate", constitution(t, "u16.json", GOOD_TRAIT.encode("utf-16"))],
        {},
        [],
        "not UTF-8",
    )
    c["constitution-bom"] = lambda t, tiny, ad: (
        ["personas", "validate", constitution(t, "bom.json", b"\xef\xbb\xbf" + GOOD_TRAIT.encode())],
        {},
        [],
        "not valid JSON",
    )
    c["constitution-empty-file"] = lambda t, tiny, ad: (
        ["pipeline", constitution(t, "empty.json", b""), "--workdir", str(t / "ws")],
        {},
        [t / "ws"],
        "not valid JSON",
    )
    c["constitution-binary"] = lambda t, tiny, ad: (
        ["pipeline", constitution(t, "bin.json", bytes(range(256))), "--workdir", str(t / "ws")],
        {},
        [t / "ws"],
        "not UTF-8",
    )
    c["constitution-unsafe-name"] = lambda t, tiny, ad: (
        ["pipeline", constitution(t, "my persona.json", GOOD_TRAIT), "--workdir", str(t / "ws")],
        {},
        [t / "ws"],
        "not a safe name",
    )
    c["constitution-yaml-mapping"] = lambda t, tiny, ad: (
        ["personas", "validate", constitution(t, "map.yaml", "trait: I am calm.\nquestions: [a]\n")],
        {},
        [],
        "got dict",
    )
    c["constitution-blank-question"] = lambda t, tiny, ad: (
        ["personas", "validate", constitution(t, "blank.json", '[{"trait": "I am kind.", "questions": [" "]}]')],
        {},
        [],
        "entry 1, field 'questions'",
    )

    def folder(path: Path) -> str:
        path.mkdir()
        return str(path)

    c["constitution-is-a-folder"] = lambda t, tiny, ad: (
        ["pipeline", folder(t / "dir.json"), "--workdir", str(t / "ws")],
        {},
        [t / "ws"],
        "constitution file not found",
    )

    # -- command-line options ---------------------------------------------------------------------------
    c["option-not-a-number"] = lambda t, tiny, ad: (
        ["pipeline", "pirate", "--dpo-pairs", "many", "--workdir", str(t / "ws")],
        {},
        [t / "ws"],
        "'--dpo-pairs'",
    )
    c["option-unknown"] = lambda t, tiny, ad: (
        ["pipeline", "pirate", "--dpo-pears", "3", "--workdir", str(t / "ws")],
        {},
        [t / "ws"],
        "--dpo-pears",
    )
    c["option-missing-argument"] = lambda t, tiny, ad: (
        ["pipeline", "--workdir", str(t / "ws")],
        {},
        [t / "ws"],
        "Missing argument",
    )
    c["option-batch-size-zero"] = lambda t, tiny, ad: (
        ["pipeline", "pirate", "--batch-size", "0", "--workdir", str(t / "ws")],
        {},
        [t / "ws"],
        "--batch-size",
    )
    c["option-unknown-backend"] = lambda t, tiny, ad: (
        ["pipeline", "pirate", "--backend", "gpu", "--workdir", str(t / "ws")],
        {},
        [t / "ws"],
        "--backend",
    )
    c["option-workdir-is-a-file"] = lambda t, tiny, ad: (
        ["pipeline", "pirate", "--workdir", constitution(t, "afile", "x")],
        {},
        [],
        "not a folder",
    )
    c["option-build-id-traversal"] = lambda t, tiny, ad: (
        ["pipeline", "pirate", "--build-id", "..", "--workdir", str(t / "ws")],
        {},
        [t / "ws"],
        "build id",
    )
    c["option-persona-traversal"] = lambda t, tiny, ad: (
        ["checkpoints", "list", "--persona", "../../etc", "--workdir", str(t / "ws")],
        {},
        [t / "ws"],
        "persona",
    )
    c["option-merge-method"] = lambda t, tiny, ad: (
        ["merge", str(ad), str(ad), "--output", str(t / "out"), "--method", "average"],
        {},
        [t / "out"],
        "--method",
    )
    c["option-merge-weight-nan"] = lambda t, tiny, ad: (
        ["merge", str(ad), str(ad), "--output", str(t / "out"), "--sft-weight", "nan"],
        {},
        [t / "out"],
        "--sft-weight",
    )
    c["option-fold-shard-size"] = lambda t, tiny, ad: (
        ["fold", str(ad), "--output", str(t / "out"), "--max-shard-size", "2XB"],
        {},
        [t / "out"],
        "--max-shard-size",
    )

    # -- configuration ------------------------------------------------------------------------------
    c["env-seed-not-a-number"] = lambda t, tiny, ad: (
        ["pipeline", "pirate", "--workdir", str(t / "ws")],
        {"CHARACTER_SEED": "abc"},
        [t / "ws"],
        "CHARACTER_SEED",
    )
    c["env-unknown-backend"] = lambda t, tiny, ad: (
        ["pipeline", "pirate", "--workdir", str(t / "ws")],
        {"CHARACTER_BACKEND": "cloud"},
        [t / "ws"],
        "CHARACTER_BACKEND",
    )
    c["env-unknown-device"] = lambda t, tiny, ad: (
        ["pipeline", "pirate", "--workdir", str(t / "ws")],
        {"CHARACTER_DEVICE": "tpu"},
        [t / "ws"],
        "CHARACTER_DEVICE",
    )
    c["env-fault-rate-above-one"] = lambda t, tiny, ad: (
        ["pipeline", "pirate", "--workdir", str(t / "ws")],
        {"CHARACTER_FAULT_RATE": "1.5"},
        [t / "ws"],
        "CHARACTER_FAULT_RATE",
    )
    c["env-workdir-is-a-file"] = lambda t, tiny, ad: (
        ["pipeline", "pirate"],
        {"CHARACTER_WORKDIR": constitution(t, "afile", "x")},
        [],
        "not a folder",
    )
    c["env-missing-base-model"] = lambda t, tiny, ad: (
        ["pipeline", "pirate", "--workdir", str(t / "ws")],
        {"CHARACTER_BASE_MODEL": str(t / "nosuch")},
        [t / "ws"],
        "base model",
    )
    c["env-negative-timeout"] = lambda t, tiny, ad: (
        ["tinker", "models"],
        {"CHARACTER_TINKER_TIMEOUT_S": "-1"},
        [],
        "CHARACTER_TINKER_TIMEOUT_S",
    )

    # -- datasets -----------------------------------------------------------------------------------
    def evaluate(t, ad, flag, path):
        return [
            "eval",
            str(ad),
            "--persona",
            "pirate",
            flag,
            path,
            "--workdir",
            str(t / "ws"),
            "--out-dir",
            str(t / "out"),
        ]

    c["data-broken-json-line"] = lambda t, tiny, ad: (
        evaluate(t, ad, "--dpo-data", jsonl(t, "d.jsonl", [PAIR, b'{"prompt": [\n', PAIR])),
        {},
        [t / "out"],
        "line 2 is not valid JSON",
    )
    c["data-missing-field"] = lambda t, tiny, ad: (
        evaluate(t, ad, "--dpo-data", jsonl(t, "d.jsonl", [PAIR, {"prompt": PAIR["prompt"], "chosen": []}])),
        {},
        [t / "out"],
        "line 2 has no field 'rejected'",
    )
    c["data-row-not-an-object"] = lambda t, tiny, ad: (
        evaluate(t, ad, "--dpo-data", jsonl(t, "d.jsonl", [PAIR, 3])),
        {},
        [t / "out"],
        "line 2",
    )
    c["data-messages-not-a-list"] = lambda t, tiny, ad: (
        evaluate(t, ad, "--introspection-data", jsonl(t, "i.jsonl", [{"messages": "Hello there."}])),
        {},
        [t / "out"],
        "line 1",
    )
    c["data-not-utf8"] = lambda t, tiny, ad: (
        evaluate(t, ad, "--introspection-data", jsonl(t, "i.jsonl", ['{"messages": []}\n'.encode("utf-16")])),
        {},
        [t / "out"],
        "not UTF-8",
    )
    c["data-empty-file"] = lambda t, tiny, ad: (
        evaluate(t, ad, "--dpo-data", jsonl(t, "d.jsonl", [])),
        {},
        [t / "out"],
        "no rows",
    )

    # -- adapter files ------------------------------------------------------------------------------
    def truncated(t, tiny):
        folder = write_adapter(t / "trunc", str(tiny))
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        return folder

    def emptied(t, tiny):
        folder = write_adapter(t / "empty", str(tiny))
        (folder / "adapter_model.safetensors").write_bytes(b"")
        return folder

    def nan(t, tiny):
        return write_adapter(
            t / "nan",
            str(tiny),
            tensors={
                f"{TRUNK}.lora_A.weight": torch.full((2, Q_IN), float("nan")),
                f"{TRUNK}.lora_B.weight": torch.zeros(Q_OUT, 2),
            },
        )

    def utf16_config(t, tiny):
        folder = write_adapter(t / "u16", str(tiny))
        cfg = folder / "adapter_config.json"
        cfg.write_bytes(cfg.read_text().encode("utf-16"))
        return folder

    c["adapter-truncated"] = lambda t, tiny, ad: (
        ["merge", str(truncated(t, tiny)), str(ad), "--output", str(t / "out")],
        {},
        [t / "out"],
        "not a readable safetensors file",
    )
    c["adapter-empty-weights"] = lambda t, tiny, ad: (
        ["merge", str(ad), str(emptied(t, tiny)), "--output", str(t / "out")],
        {},
        [t / "out"],
        "not a readable safetensors file",
    )
    c["adapter-wrong-shapes"] = lambda t, tiny, ad: (
        [
            "merge",
            str(ad),
            str(write_adapter(t / "wide", str(tiny), shape=(Q_OUT, 2 * Q_IN))),
            "--output",
            str(t / "out"),
        ],
        {},
        [t / "out"],
        "different tensor shapes",
    )
    c["adapter-nan"] = lambda t, tiny, ad: (
        ["merge", str(ad), str(nan(t, tiny)), "--output", str(t / "out")],
        {},
        [t / "out"],
        "NaN",
    )
    c["adapter-nan-fold"] = lambda t, tiny, ad: (
        ["fold", str(nan(t, tiny)), "--output", str(t / "out")],
        {},
        [t / "out"],
        "NaN",
    )
    c["adapter-other-base-model"] = lambda t, tiny, ad: (
        [
            "merge",
            str(ad),
            str(write_adapter(t / "other", "meta-llama/Llama-3.1-8B-Instruct")),
            "--output",
            str(t / "out"),
        ],
        {},
        [t / "out"],
        "different base models",
    )
    c["adapter-wrong-base-model-fold"] = lambda t, tiny, ad: (
        ["fold", str(write_adapter(t / "big", str(tiny), shape=(4096, 4096))), "--output", str(t / "out")],
        {},
        [t / "out"],
        "expects a (4096, 4096) weight",
    )
    c["adapter-config-utf16"] = lambda t, tiny, ad: (
        ["merge", str(ad), str(utf16_config(t, tiny)), "--output", str(t / "out")],
        {},
        [t / "out"],
        "not valid JSON",
    )
    c["adapter-rank-zero"] = lambda t, tiny, ad: (
        ["merge", str(ad), str(write_adapter(t / "r0", str(tiny), r=0, tensors={})), "--output", str(t / "out")],
        {},
        [t / "out"],
        "'r' must be a positive number",
    )
    c["adapter-tensor-name-traversal"] = lambda t, tiny, ad: (
        [
            "fold",
            str(
                write_adapter(
                    t / "trav",
                    str(tiny),
                    tensors={
                        "base_model.model.../../../etc/passwd.lora_A.weight": torch.zeros(2, Q_IN),
                        "base_model.model.../../../etc/passwd.lora_B.weight": torch.zeros(Q_OUT, 2),
                    },
                )
            ),
            "--output",
            str(t / "out"),
        ],
        {},
        [t / "out"],
        "has no weight",
    )
    c["adapter-base-path-traversal"] = lambda t, tiny, ad: (
        ["fold", str(write_adapter(t / "up", "../../../../etc")), "--output", str(t / "out")],
        {},
        [t / "out"],
        "base model",
    )

    def without_weights(t, tiny):
        folder = write_adapter(t / "nofile", str(tiny))
        (folder / "adapter_model.safetensors").unlink()
        return folder

    c["adapter-missing-weights"] = lambda t, tiny, ad: (
        ["merge", str(ad), str(without_weights(t, tiny)), "--output", str(t / "out")],
        {},
        [t / "out"],
        "missing file",
    )
    c["adapter-is-a-file"] = lambda t, tiny, ad: (
        [
            "eval",
            constitution(t, "adapter.safetensors", b"\0" * 64),
            "--persona",
            "pirate",
            "--workdir",
            str(t / "ws"),
            "--out-dir",
            str(t / "out"),
        ],
        {},
        [t / "out"],
        "not found",
    )
    return c


CASES = cases()


def test_the_corpus_is_large_and_covers_every_kind():
    kinds = {name.split("-")[0] for name in CASES}
    assert len(CASES) >= 25 and kinds == {"constitution", "option", "env", "data", "adapter"}


def _run(name: str, tmp: Path, tiny: Path) -> dict:
    good = write_adapter(tmp / "good", str(tiny))
    args, env, absent, needle = CASES[name](tmp, tiny, good)
    before = sorted(tmp.rglob("*"))
    proc = subprocess.run(
        [sys.executable, "-m", "character.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
        env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING", **env},
    )
    return {"proc": proc, "absent": absent, "needle": needle, "before": before, "after": sorted(tmp.rglob("*"))}


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, tiny_dir):
    """Every selected case, run a few at a time (each is a fresh process that mostly imports torch)."""
    names = sorted(
        {
            item.callspec.params["name"]
            for item in request.session.items
            if item.originalname == "test_bad_input_is_one_line_error_and_leaves_nothing"
        }
    )
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {n: pool.submit(_run, n, tmp_path_factory.mktemp(n), tiny_dir) for n in names}
        return {n: f.result() for n, f in futures.items()}


@pytest.mark.slow  # the cases run together: about a minute for all of them
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_error_and_leaves_nothing(name, outcomes):
    out = outcomes[name]
    proc = out["proc"]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert out["needle"] in lines[0], lines[0]
    for path in out["absent"]:
        assert not path.exists(), f"{path} was left behind"
    assert out["after"] == out["before"]  # nothing written at all (the default workspace included)
