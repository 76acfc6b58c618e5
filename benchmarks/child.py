"""Child process entry: `python -m benchmarks.child module:function '{"kw": ...}' result.json`."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def main() -> None:
    target, kwargs, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    module, func = target.split(":")
    result = getattr(importlib.import_module(module), func)(**kwargs)
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
