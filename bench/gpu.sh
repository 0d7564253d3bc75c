#!/usr/bin/env bash
# One prepared run for a lent GPU (about 5 minutes): a 7B-shaped random model at 768x768 (9,316 tokens),
# bf16 and int4, plain and SJD (SJD keeps a fixed 2.2 tokens/step for timing), each decode step replayed
# from CUDA graphs (the pipeline's CUDA default), then compiled + graphs; then the real CLI end to end on
# the embedded demo model on CUDA, with and without CUDA graphs (the images must be identical).
# Goals on one H200: plain <= 50 s, SJD <= 25 s, SJD + int4 <= 15 s; peak <= 28 GB bf16, <= 16 GB int4.
# torchao is not on the device image: carry its wheel in .whl (see the device notes) and set PYTHONPATH.
# Figures of earlier runs: the Benchmarks section of README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchao', torchao.__version__)"
run() { echo "== $*"; local t0=$SECONDS; timeout "$@" || echo "!! exit $? from: $*"; echo "   ($((SECONDS - t0)) s)"; }
run 100 "$PY" bench/gpu_decode.py --quant none --cuda-graphs
run 120 "$PY" bench/gpu_decode.py --quant int4 --cuda-graphs
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
run 150 "$PY" bench/gpu_decode.py --quant none --compile --cuda-graphs --fractions 0.5 --reps 20
# fp8 against bf16 KV cache (issue 12 item 1, issue 13 item 3): one layer's attention, then the compiled step.
run 300 "$PY" bench/gpu_kv.py
