#!/usr/bin/env bash
# The one command for a lent GPU machine (bench/GPU.md): install the carried wheels (.whl/: what the
# machine's image lacks: diffusers, deepspeed and its pydantic/hjson) into /tmp/site, then run the
# GPU plan, its log tee'd and its JSON written under $OUT. Extra arguments go to bench.gpu.
#   bash bench/gpu_device.sh [--budget-s 360] [--skip compile] ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/runs/gpu}
mkdir -p "$OUT"
if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >"$OUT/install.log" 2>&1; then
    cat "$OUT/install.log"
    echo "gpu_device.sh: installing .whl/*.whl failed (carry .whl: see bench/GPU.md)" >&2
    exit 3
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export DS_ACCELERATOR=cuda
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.log"
# The bench keeps to its own --budget-s (360 s by default); this is the backstop.
timeout -k 10 420 python3 -m bench.gpu --out "$OUT/gpu.json" "$@" 2>&1 | tee -a "$OUT/gpu.log"
