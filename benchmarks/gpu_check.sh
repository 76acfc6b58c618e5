#!/usr/bin/env bash
# One pass on a GPU machine (about 4 minutes on an H100, start-up not counted): the demo pipeline on CUDA
# (the stages without Prefect, then the evaluation), then one DPO step at the paper's settings (32 pairs x 1024
# tokens, Llama-3.2-1B shape, 16 layers, LoRA r=64, micro-batch 4 pairs x 8), ours vs TRL's DPOTrainer, with and
# without activation checkpointing, each side in a fresh process (rows: peak memory <= 1.0x TRL, time per step with
# the reference log-probs <= 0.8x TRL).
#
# Needs a python3 with torch (CUDA), transformers, peft and scikit-learn. Packages it lacks (tinker, pydantic,
# pydantic-settings, trl, datasets, ...) may come as wheels in .whl/ (no internet on the GPU machine):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#         --platform manylinux2014_x86_64 -d .whl tinker==0.38.0 pydantic ...
# A tiny model built here may be put in .gpu/models/ to skip building it there.
# Output: $OUT (default /tmp/character-gpu): gpu.log, dpo_memory.json, dpo_memory_ckpt.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/character-gpu}
mkdir -p "$OUT" /tmp/character-gpu-ws/models /tmp/character-gpu-bench/models
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .gpu/models ] && cp -r .gpu/models/* /tmp/character-gpu-ws/models/ && cp -r .gpu/models/* /tmp/character-gpu-bench/models/
nvidia-smi -L
python3 -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)" || exit 2

echo "== 1. demo pipeline (sarcastic, tiny) on CUDA, stages without Prefect, then evaluation"
timeout 300 python3 - <<'PY' 2>&1 | grep -v Warning | tail -25
import json, time, torch
from character.config import PipelineConfig
from character.build.direct import evaluate, run_sequential
t0 = time.time()
cfg = PipelineConfig(persona="sarcastic", scale="demo", device="cuda", workdir="/tmp/character-gpu-ws", build_id="gpu")
ck = run_sequential(cfg)
t1 = time.time()
ev = evaluate(cfg, {"dpo": ck["dpo"], "final": ck["final"]})
t2 = time.time()
keys = ("in_persona_rate", "in_persona_n", "robust_in_persona_rate", "pref_accuracy", "pref_pairs")
print(json.dumps({k: {m: v[m] for m in keys} for k, v in ev.items() if k in ("base", "dpo", "final")}))
print(json.dumps({"classifier": ev["classifier"], "train_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1),
                  "cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)}))
PY
for ck in "" --checkpointing; do
  echo "== 2. one DPO step, Llama-3.2-1B shape, 32 pairs x 1024 tokens, micro-batch 4 pairs x 8, ours vs TRL $ck"
  timeout 400 python3 -m benchmarks.dpo_memory --device cuda --layers 16 --pairs 32 --length 1024 --micro-pairs 4 $ck \
    --workdir /tmp/character-gpu-bench/dpo --json "$OUT/dpo_memory${ck:+_ckpt}.json" 2>&1 | grep -v "it/s\|examples/s" | tail -14
done
