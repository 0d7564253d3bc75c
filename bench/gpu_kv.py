"""GPU: attention and decode-step time over an fp8 KV cache against a bf16 one (run through bench/gpu.sh).

    python bench/gpu_kv.py                 # 7B shapes at 768x768 with CFG, on CUDA
    python bench/gpu_kv.py --cpu-smoke     # tiny shapes on CPU: checks the script runs, no figures

1. One layer's attention over a cache filled to half an image (2 CFG rows, 32 heads, head_dim 128),
   1 query (plain decoding) and 16 (an SJD window): bf16 + SDPA, fp8 dequantized + SDPA (what an
   eager step runs), fp8 through `fused_fp8_attention` compiled (what a compiled step runs); ms and
   the cache bytes read per second.
2. The whole decode step of a 7B-shaped random model (compiled, replayed from CUDA graphs), bf16 KV
   against fp8 KV, plain and SJD windows, at half an image: the goal is fp8 <= bf16.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_core.config import ModelConfig  # noqa: E402
from lumina_core.kv_cache import FP8_KV_DTYPE, KVCache, fused_fp8_attention  # noqa: E402
from lumina_core.sampling import SamplingConfig  # noqa: E402
from lumina_core.sampling.state import CFGBatch  # noqa: E402
from lumina_core.sampling.step import CUDAGraphStep, compile_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import OFFSET, job_768, make_model  # noqa: E402


def _timed(fn, device: torch.device, reps: int) -> float:
    """Mean ms of fn() after 3 warm-up calls."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / reps


@torch.no_grad()
def attention_table(config: ModelConfig, device: torch.device, filled: int, reps: int) -> None:
    """ms of one layer's attention per storage and query count."""
    one_layer = dataclasses.replace(config, num_hidden_layers=1)
    kv, d, h = config.num_key_value_heads, config.head_dim, config.num_attention_heads
    fused = torch.compile(fused_fp8_attention, dynamic=False)
    sdpa = torch.compile(F.scaled_dot_product_attention, dynamic=False)
    print(f"attention, one layer, 2 rows x {h} heads x {filled} cached positions x head_dim {d}")
    for n in (1, 16):
        q = torch.randn(2, h, n, d, device=device, dtype=torch.bfloat16)
        mask = torch.zeros(2, 1, n, filled, device=device, dtype=torch.bfloat16)
        for name, storage in (("bf16", torch.bfloat16), ("fp8", FP8_KV_DTYPE)):
            cache = KVCache(one_layer, 2, filled, dtype=torch.bfloat16, device=device, storage=storage)
            kv_new = torch.randn(2, kv, filled, d, device=device, dtype=torch.bfloat16)
            cache.write(0, torch.arange(filled, device=device).expand(2, -1), kv_new, kv_new)
            bytes_read = sum(t.numel() * t.element_size() for t in cache.tensors()[:-2])
            runs = {"eager (read + SDPA)": lambda: cache.attend(0, q, mask)}
            if storage == torch.bfloat16:
                runs["compiled SDPA"] = lambda: sdpa(q, *cache.read(0, filled), attn_mask=mask)
            else:
                runs["compiled fused"] = lambda: fused(q, cache.k[0], None, cache.v[0], cache.v_scale[0], mask)
            for label, fn in runs.items():
                ms = _timed(fn, device, reps)
                print(f"  n={n:2d} {name:4s} {label:20s} {ms:8.3f} ms  {bytes_read / ms / 1e6:8.1f} GB/s of cache")


@torch.no_grad()
def step_table(device: torch.device, tiny: bool, reps: int) -> None:
    """ms per decode step, bf16 vs fp8 KV, plain and SJD windows (compiled + CUDA graphs on CUDA)."""
    model = make_model(device, tiny=tiny)
    job = job_768()
    target = job.generated_tokens // 2
    step_fn = compile_step(model)
    if device.type == "cuda":
        step_fn = CUDAGraphStep(step_fn)
    print(f"decode step at half an image ({target} of {job.generated_tokens} tokens), compiled"
          f"{' + CUDA graphs' if device.type == 'cuda' else ''}")
    for window in (1, 16):
        for kv_cache in ("bf16", "fp8"):
            sampling = SamplingConfig(cfg=4.0, top_k=4096, kv_cache=kv_cache)
            batch = CFGBatch(model, job, sampling, 1, window=window, step_fn=step_fn, bucket_kv=True)
            batch.prefill(len(job.cond_prefix))
            batch.cache.lengths.fill_(len(job.cond_prefix) + target)  # in place: CUDA graphs read this tensor
            batch.host_pointer = [len(job.cond_prefix) + target]
            tokens = torch.full((1, window), OFFSET + 5, device=device)

            def one_step() -> None:
                batch.step(tokens)
                batch.rollback(torch.full((1,), window, dtype=torch.long, device=device), [window])

            ms = _timed(one_step, device, reps)
            print(f"  window {window:2d} kv {kv_cache:4s} {ms:8.2f} ms/step  (cache {batch.cache.nbytes / 2**30:.2f} GiB)")
            batch.release()


def main() -> None:
    """Print both tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script runs")
    ap.add_argument("--skip-step", action="store_true", help="only the attention table")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    config = ModelConfig.preset("7b")
    filled = 9316 // 2 + 203
    if args.cpu_smoke:
        config = ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2)
        filled, args.reps = 300, 2
    attention_table(config, device, filled, args.reps)
    if not args.skip_step and not args.cpu_smoke:
        step_table(device, args.cpu_smoke, args.reps)


if __name__ == "__main__":
    main()
