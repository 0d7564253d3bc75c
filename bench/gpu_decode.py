"""GPU decode timing for a 7B-shaped model with random weights at 768x768 (run through bench/gpu.sh).

Random weights have no image structure, so SJD acceptance is imposed: each SJD step keeps a fixed
number of tokens (--accept, default 2.2 on average), which is what SJD measures on the real model
(2.1-2.3x, acceleration-notes.md). Step times are measured on the real decoder code paths
(CFGBatch.step + the target distribution + sampling) at several cache lengths and integrated over
the image; the bandwidth limit uses the bytes each step must read (weights + filled KV).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_core.config import ModelConfig  # noqa: E402
from lumina_core.model import build_transformer  # noqa: E402
from lumina_core.quant import quantize_module, weight_bytes  # noqa: E402
from lumina_core.sampling.step import CUDAGraphStep, compile_step  # noqa: E402
from lumina_core.sampling import SamplingConfig  # noqa: E402
from lumina_core.sampling.state import CFGBatch, DecodeJob, RowRandom  # noqa: E402
from lumina_core.sampling.logits import sample_inverse_cdf  # noqa: E402

H200_BYTES_PER_S = 4.8e12
OFFSET, NUM_CODES = 155000, 16384


def make_model(device: torch.device, tiny: bool = False) -> torch.nn.Module:
    """7B-shaped transformer (or a tiny one for a CPU smoke run), random bf16 weights, built on the device."""
    cfg = ModelConfig.preset("7b")
    if tiny:
        cfg = ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2)
    with torch.device("meta"):
        model = build_transformer(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    return model.eval()


def job_768(prompt_len: int = 200) -> DecodeJob:
    header = (151665, 160000, 160000)
    return DecodeJob(cond_prefix=tuple([1] * prompt_len) + header, uncond_prefix=header, rows=96, cols=96,
                      new_line=151670, image_end=151666, code_offset=OFFSET, num_codes=NUM_CODES)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def step_ms(model, job, window: int, keep: float, fractions, reps: int, step_fn=None) -> list[float]:
    """Mean ms of one decoder step (forward + target p + sampling) at cache fractions of the image."""
    sampling = SamplingConfig(cfg=4.0, top_k=4096)
    batch = CFGBatch(model, job, sampling, 1, window=window, step_fn=step_fn, bucket_kv=step_fn is not None)
    rng = RowRandom([0], batch.device)
    batch.prefill(len(job.cond_prefix))
    out = []
    tokens = torch.full((1, window), OFFSET + 5, device=batch.device)
    for frac in fractions:
        target = int(frac * job.generated_tokens)
        batch.cache.lengths.fill_(len(job.cond_prefix) + target)  # in place: CUDA graphs read this tensor
        batch.host_pointer = [len(job.cond_prefix) + target]
        pos = torch.full((1, window), target, device=batch.device)
        for i in range(reps + 3):
            if i == 3:
                _sync(batch.device)
                t0 = time.perf_counter()
            hidden = batch.step(tokens)
            p = batch.probs(hidden, pos)
            u = rng.uniform(3 * window)
            sample_inverse_cdf(p, u[:, :window])
            if window > 1:
                u.sum().tolist()  # SJD's one host sync per step (the accepted counts)
            # Undo the step so the cache stays at this fraction (the kept count only sets the step total).
            batch.rollback(torch.full((1,), window, dtype=torch.long, device=batch.device), [window])
        _sync(batch.device)
        out.append(1e3 * (time.perf_counter() - t0) / reps)
    batch.release()
    return out


def main() -> None:
    """Print seconds per image, ms per step, peak GB and the ratio to the bandwidth limit."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", choices=["none", "int4"], default="none")
    ap.add_argument("--accept", type=float, default=2.2, help="tokens kept per SJD step (imposed)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay each step from a CUDA graph (as the pipeline does)")
    ap.add_argument("--modes", default="plain,sjd", help="comma list of plain, sjd")
    ap.add_argument("--fractions", default="0.05,0.5,0.95", help="cache fill points (fractions of the image) to time")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the script runs, no figures")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = make_model(device, tiny=args.cpu_smoke)
    if args.quant == "int4":
        quantize_module(model, "int4")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        load_peak = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()  # the goals are about generation, not the one-off quantization
        print(f"[{args.quant:4s}] weights {weight_bytes(model) / 1e9:.2f} GB; peak while building/quantizing "
              f"{load_peak:.1f} GB", flush=True)
    step_fn = compile_step(model) if args.compile else None
    if args.cuda_graphs and device.type == "cuda":
        step_fn = CUDAGraphStep(step_fn or model.hidden_states)
    job = job_768()
    fractions = tuple(float(f) for f in args.fractions.split(","))
    tokens = job.generated_tokens
    wbytes = weight_bytes(model) - model.model.embed_tokens.weight.numel() * 2  # the embedding is only gathered
    wbytes -= model.lm_head.weight.numel() * 2 - NUM_CODES * model.config.hidden_size * 2  # image-code head only
    c = model.config
    kv_per_pos = 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2  # K+V, layers, CFG rows, heads, D, bf16
    mean_kv = (len(job.cond_prefix) + tokens / 2) * kv_per_pos
    limit_ms = 1e3 * (wbytes + mean_kv) / H200_BYTES_PER_S
    for name, window, keep in (("plain", 1, 1.0), ("sjd", 16, args.accept)):
        if name not in args.modes.split(","):
            continue
        ms = step_ms(model, job, window, keep, fractions, args.reps, step_fn)
        mean = sum(ms) / len(ms)
        steps = tokens / keep
        print(f"[{args.quant:4s} {name:5s}{' compiled' if args.compile else ''}{' graphs' if args.cuda_graphs else ''}] ms/step at {args.fractions} of the image: {', '.join(f'{m:.2f}' for m in ms)}; "
              f"{steps:.0f} steps -> {steps * mean / 1e3:.1f} s/image; bandwidth limit {limit_ms:.2f} ms/step "
              f"({steps * limit_ms / 1e3:.1f} s) -> {mean / limit_ms:.2f}x the limit; "
              f"peak {torch.cuda.max_memory_allocated() / 1e9 if device.type == 'cuda' else float('nan'):.1f} GB", flush=True)


if __name__ == "__main__":
    main()
