#!/usr/bin/env bash
# One pass on a lent GPU (about 5 minutes on an H100): the smoke pipeline on CUDA, then one DPO step at the
# paper's settings (32 pairs x 1024 tokens, Llama-3.2-1B shape, 16 layers, LoRA r=64, micro-batch 4 pairs x 8
# accumulated), ours vs TRL's DPOTrainer, each side in a fresh process; prints a small table.
#
# Run from the repository root with a Python that already has the project's dependencies (torch with CUDA,
# transformers, peft, trl, datasets, prefect, tinker, typer): there is no internet on the GPU machine.
#     PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_check.sh
# Output: $OUT (default /tmp/character-gpu): smoke.json, smoke.log, dpo_memory.md, dpo_memory.json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/character-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PREFECT_SERVER_ANALYTICS_ENABLED=false \
       PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90 PREFECT_HOME="$OUT/prefect" TOKENIZERS_PARALLELISM=false

"$PY" - <<'PYEOF' || exit 2
import importlib.util, sys
need = ["torch", "transformers", "peft", "trl", "datasets", "prefect", "tinker", "typer", "safetensors", "pydantic_settings"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    print(f"error: {sys.executable} lacks: {', '.join(missing)} (pip install -e '.[dev]' on a machine with internet, "
          "then carry the venv)", file=sys.stderr)
    sys.exit(2)
import torch
if not torch.cuda.is_available():
    print(f"error: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
    sys.exit(2)
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PYEOF

echo "== 1. smoke pipeline on CUDA (sarcastic, tiny model)"
t0=$(date +%s)
CHARACTER_DEVICE=cuda timeout 240 "$PY" -c "from character.cli import main; main()" pipeline sarcastic \
    --scale smoke --workdir "$OUT/ws" --build-id gpu-smoke --json >"$OUT/smoke.json" 2>"$OUT/smoke.log"
rc=$?
echo "smoke pipeline: exit $rc in $(( $(date +%s) - t0 )) s; last line of $OUT/smoke.json:"
tail -n 1 "$OUT/smoke.json"; [ $rc -eq 0 ] || tail -n 20 "$OUT/smoke.log"

echo "== 2. one DPO step at full shape, ours vs TRL (peak = torch.cuda.max_memory_allocated)"
timeout 420 "$PY" -m benchmarks.dpo_memory --device cuda --layers 16 --pairs 32 --length 1024 --micro-pairs 4 \
    --workdir "$OUT/bench" --json "$OUT/dpo_memory.json" | tee "$OUT/dpo_memory.md"
echo "done in $(( $(date +%s) - t0 )) s; results in $OUT"
