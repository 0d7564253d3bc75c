#!/usr/bin/env bash
# One prepared run for a lent GPU (about 10 minutes at most): 7B-shaped random model at 768x768
# (9,316 tokens), bf16 and int4, plain and SJD (SJD keeps a fixed 2.2 tokens/step for timing).
# Goals on one H200: plain <= 50 s, SJD <= 25 s, SJD + int4 <= 15 s; peak <= 28 GB bf16, <= 16 GB int4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 280 "$PY" bench/gpu_decode.py --quant none "$@"
timeout 280 "$PY" bench/gpu_decode.py --quant int4 "$@"
