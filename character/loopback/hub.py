"""The served model's tokenizer where the SDK's sampling client looks for it.

A training client asks the service for its tokenizer id (the loopback answers with the local model
folder), but a sampling client guesses it from the model's name and calls
`AutoTokenizer.from_pretrained(name)`: on a user's machine that reads the Hugging Face Hub or its
cache. The loopback puts the embedded model's tokenizer files into the Hub cache under each served
name, as a download would have left them, so that guess works offline.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "config.json")
REVISION = "loopback"


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def publish_tokenizer(name: str, model_folder: Path, cache: Path | None = None) -> Path:
    """The snapshot folder now holding `model_folder`'s tokenizer files as the Hub repo `name`."""
    repo = (cache or hub_cache()) / f"models--{name.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in _FILES:
        if (Path(model_folder) / f).is_file():
            shutil.copyfile(Path(model_folder) / f, snapshot / f)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot
