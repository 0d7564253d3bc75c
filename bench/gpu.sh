#!/usr/bin/env bash
# One prepared run for a lent GPU (about 6 minutes): 7B-shaped random model at 768x768 (9,316 tokens),
# bf16 and int4, plain and SJD (SJD keeps a fixed 2.2 tokens/step for timing); the 270M MoVQGAN at
# 768x768; then the real CLI end to end on the embedded demo model on CUDA (plain, SJD, int4, compile).
# Goals on one H200: plain <= 50 s, SJD <= 25 s, SJD + int4 <= 15 s; peak <= 28 GB bf16, <= 16 GB int4.
# torchao is not on the device image: carry its wheel in .whl (see the device notes) and set PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-/tmp/gpu_out}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchao', torchao.__version__)"
run() { echo "== $*"; timeout "$@" || echo "!! exit $? from: $*"; }
run 120 "$PY" bench/gpu_decode.py --quant none
run 150 "$PY" bench/gpu_decode.py --quant int4
run 60 "$PY" bench/gpu_movq.py
P="a red circle above a blue square"
for opts in "" "--sjd" "--sjd --quant int4" "--dtype fp32" "--compile"; do
  run 60 "$PY" -m lumina_core generate --model demo --device cuda --prompt "$P" --num-images 8 --seed 0 \
    --no-progress --output "/tmp/demo_cuda${opts// /_}" $opts
done
"$PY" - <<'PYEOF' || true
# Demo images on CUDA checked from pixels, like bench/demo_eval.py does on CPU.
import glob
import numpy as np
from PIL import Image
from lumina_core.demo.checker import check_image
from lumina_core.demo.data import parse_caption
caption = parse_caption("a red circle above a blue square")
for folder in sorted(glob.glob("/tmp/demo_cuda*")):
    files = sorted(glob.glob(folder + "/*.png"))
    ok = 0
    for f in files:
        r = check_image(np.asarray(Image.open(f).convert("RGB")), caption)
        ok += r.colour and r.position and r.shape
    print(f"{folder}: {ok}/{len(files)} images match the caption")
PYEOF
run 120 "$PY" bench/gpu_decode.py --quant none --compile --modes plain --fractions 0.5 --reps 20
