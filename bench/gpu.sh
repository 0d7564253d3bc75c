#!/usr/bin/env bash
# One prepared run for a lent GPU (about 8 minutes on an H200): a 7B-shaped random model at 768x768
# (9,316 tokens) in bf16 / int8 / int4 / fp8 x plain / SJD (SJD keeps a fixed 2.2 tokens/step for timing),
# each decode step replayed from CUDA graphs (the pipeline's CUDA default). Per line: ms per step at the
# mean KV length, s per image, ratio to the bandwidth limit (bytes read per step / 4.8 TB/s), peak memory
# and the CUDA-graph capture time per image. Then the linear layers alone for every kernel this machine
# can run (2 and 32 rows), bf16 compiled + graphs, and the real CLI end to end on the embedded demo model
# on CUDA with and without CUDA graphs (the images must be identical); then a 7B LoRA step's peak memory.
# Goals on one H200 (issue 13): bf16 plain <= 45 s (4.8 ms/step), SJD <= 25 s; int4 or fp8 plain <= 30 s,
# SJD <= 15 s; every step within 1.3x of its bandwidth limit; capture <= 2 % of an image.
# torchao is not on the device image: carry its wheel in .whl (see the device notes) and set PYTHONPATH.
# Optional kernels (pip install .[cuda-kernels]: gemlite, fbgemm-gpu-genai) are used when installed.
# Figures of earlier runs: the Benchmarks section of README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || true
"$PY" -c "import torch, transformers, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchao', torchao.__version__)"
"$PY" -c "from lumina_core.quant import installed_packages; print('optional kernel packages:', sorted(installed_packages()) or 'none')"
run() { echo "== $*"; local t0=$SECONDS; timeout "$@" || echo "!! exit $? from: $*"; echo "   ($((SECONDS - t0)) s)"; }
for quant in none int8 int4 fp8; do
  run 150 "$PY" bench/gpu_decode.py --quant "$quant" --cuda-graphs --reps 20
done
run 120 "$PY" bench/gpu_decode.py --linear-table
run 150 "$PY" bench/gpu_decode.py --quant none --compile --cuda-graphs --reps 20
P="a red circle above a blue square"
for opts in "--no-cuda-graphs" "" "--sjd --no-cuda-graphs" "--sjd"; do
  run 60 "$PY" -m lumina_core generate --model demo --device cuda --prompt "$P" --num-images 8 --seed 0 \
    --no-progress --output "/tmp/demo_cuda${opts// /_}" $opts
done
"$PY" - <<'PYEOF' || true
# CUDA graphs replay the same kernels: the images must equal the eager ones exactly.
import glob, os
import numpy as np
from PIL import Image
for eager, graphs in (("/tmp/demo_cuda--no-cuda-graphs", "/tmp/demo_cuda"),
                      ("/tmp/demo_cuda--sjd_--no-cuda-graphs", "/tmp/demo_cuda--sjd")):
    names = sorted(os.listdir(eager)) if os.path.isdir(eager) else []
    same = sum(os.path.isfile(os.path.join(graphs, n)) and np.array_equal(
        np.asarray(Image.open(os.path.join(eager, n))), np.asarray(Image.open(os.path.join(graphs, n)))) for n in names)
    print(f"{graphs}: {same}/{len(names)} images identical to {eager}")
PYEOF
# fp8 against bf16 KV cache (issue 12 item 1, issue 13 item 3): one layer's attention, then the compiled step.
run 300 "$PY" bench/gpu_kv.py
# A 7B LoRA step's peak memory against the train-side estimate (issue 17: <= 22 GiB bf16 base, <= 14 GiB int8).
run 150 "$PY" bench/gpu_lora.py --base bf16
run 150 "$PY" bench/gpu_lora.py --base int8 --offload-activations
