"""Streaming quantized load of a 2B-shaped random bf16 checkpoint (5.3 GiB on disk) with int8 on CPU.

Writes the checkpoint shard by shard (never the whole model in memory), then loads it in a child
process through `weights.load_transformer(..., quant="int8")` while this process polls the child's
anonymous RSS, and prints the peak against the int8 model. Deletes the checkpoint at the end.

    nice python bench/memory_load.py [--folder /tmp/lumina_2b_random] [--quant int8]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_core.config import ModelConfig  # noqa: E402
from lumina_core.memory import layer_bytes  # noqa: E402
from lumina_core.model import build_transformer  # noqa: E402
from lumina_core.testing.rss import run_child  # noqa: E402
from lumina_core.weights import write_weights  # noqa: E402

GIB = 2**30
CHILD = """
import json, os, sys, time, torch
from lumina_core.testing.rss import anon_rss_bytes
from lumina_core.memory import trim_host_heap
from lumina_core.quant import quantize_module, weight_bytes
from lumina_core.weights import load_transformer
quantize_module(torch.nn.Sequential(torch.nn.Linear(128, 128, bias=False)).to(torch.bfloat16), sys.argv[2])
trim_host_heap()
before = anon_rss_bytes()
started = time.perf_counter()
model = load_transformer(sys.argv[1], dtype=torch.bfloat16, quant=sys.argv[2])
seconds = time.perf_counter() - started
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"before": before, "weights": weight_bytes(model), "seconds": seconds, "vm_hwm": hwm}))
sys.stdout.flush()
os._exit(0)
"""


def write_random_checkpoint(folder: Path, config: ModelConfig) -> int:
    """A random bf16 official folder, 1 GB shards, each tensor generated when its shard is written."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in build_transformer(config).state_dict().items()}

    def read(name: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(shapes[name], generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    write_weights(folder, shapes, read, config.to_hf_dict(), dtype=torch.bfloat16, max_shard_bytes=1_000_000_000)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/lumina_2b_random")
    parser.add_argument("--quant", default="int8", choices=["int8", "int4"])
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder afterwards")
    args = parser.parse_args()
    folder = Path(args.folder)
    config = ModelConfig.preset("2b")
    try:
        started = time.perf_counter()
        size = write_random_checkpoint(folder, config)
        print(f"wrote a 2B-shaped random bf16 checkpoint: {size / GIB:.2f} GiB in {time.perf_counter() - started:.0f} s")
        root = str(Path(__file__).resolve().parents[1])
        run = run_child(CHILD, args=(folder, args.quant), env={"PYTHONPATH": root}, cwd=root)
        if run.returncode:
            print(run.stderr[-3000:])
            return 1
        r = run.result
        peak = run.peak_anon_bytes - r["before"]
        bf16_layer = layer_bytes(config, torch.bfloat16, None, "cpu")
        print(f"{args.quant} load: {r['seconds']:.0f} s; {args.quant} model {r['weights'] / GIB:.2f} GiB; peak anonymous "
              f"RSS during the load {peak / GIB:.2f} GiB (model + {(peak - r['weights']) / GIB:.2f} GiB; one bf16 "
              f"layer is {bf16_layer / GIB:.2f} GiB); bound: model + 1.5 GiB = {(r['weights'] + 1.5 * GIB) / GIB:.2f} GiB "
              f"-> {'OK' if peak < r['weights'] + 1.5 * GIB else 'OVER'}; total RSS high-water mark (page cache of "
              f"the mapped shards included) {r['vm_hwm'] / GIB:.2f} GiB")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
