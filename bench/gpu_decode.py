"""GPU decode timing for a 7B-shaped model with random weights at 768x768 (run through bench/gpu.sh).

Random weights have no image structure, so SJD acceptance is imposed: each SJD step keeps a fixed
number of tokens (--accept, default 2.2 on average), which is what SJD measures on the real model
(2.1-2.3x, acceleration-notes.md). Step times are measured on the real decoder code paths
(CFGBatch.step + the target distribution + sampling) at the mean cache length (or several) and
integrated over the image; the bandwidth limit is the bytes each step must read (weights as
stored + the filled KV cache) at 4.8 TB/s (H200).

    python bench/gpu_decode.py --quant int4 --cuda-graphs        # one quantization, plain and SJD
    python bench/gpu_decode.py --linear-table                    # the linear layers alone, every kernel
    python bench/gpu_decode.py --cpu-smoke ...                   # tiny model on CPU: the script runs
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_core.config import ModelConfig  # noqa: E402
from lumina_core.model import build_transformer  # noqa: E402
from lumina_core.quant import (QUANT_MODES, choose_kernels, gpu_capability, installed_packages,  # noqa: E402
                               quantize_module, weight_bytes)
from lumina_core.sampling import SamplingConfig  # noqa: E402
from lumina_core.sampling.logits import sample_inverse_cdf  # noqa: E402
from lumina_core.sampling.state import KV_BUCKET, CFGBatch, DecodeJob, RowRandom  # noqa: E402
from lumina_core.sampling.step import CUDAGraphStep, compile_step  # noqa: E402

H200_BYTES_PER_S = 4.8e12
OFFSET, NUM_CODES = 155000, 16384
SJD_WINDOW = 16


def tiny_config() -> ModelConfig:
    """A model small enough for a CPU smoke run, with linears int4 can group (multiples of 128)."""
    return ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4)


def make_model(device: torch.device, tiny: bool = False) -> nn.Module:
    """7B-shaped transformer (or a tiny one for a CPU smoke run), random bf16 weights, built on the device."""
    cfg = tiny_config() if tiny else ModelConfig.preset("7b")
    with torch.device("meta"):
        model = build_transformer(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    return model.eval()


def job_768(prompt_len: int = 200, rows: int = 96) -> DecodeJob:
    """The token job of a 768x768 text-to-image request (96x96 codes) after a `prompt_len`-token prompt."""
    header = (151665, 160000, 160000)
    return DecodeJob(cond_prefix=tuple([1] * prompt_len) + header, uncond_prefix=header, rows=rows, cols=rows,
                     new_line=151670, image_end=151666, code_offset=OFFSET, num_codes=NUM_CODES)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bytes_per_step(model: nn.Module, job: DecodeJob, kv_positions: float) -> float:
    """Bytes one decode step must read: every weight as stored (embedding gathered, image-code head rows only) + the KV cache."""
    c = model.config
    head_rows = model.lm_head.weight.shape[0]
    embed = model.model.embed_tokens.weight
    wbytes = weight_bytes(model) - embed.numel() * embed.element_size()
    head = weight_bytes(model.lm_head)
    wbytes -= head - head * NUM_CODES / head_rows
    element = next(b.element_size() for b in model.model.embed_tokens.parameters())
    kv_per_pos = 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * element  # K+V, CFG rows
    return wbytes + kv_positions * kv_per_pos


@torch.no_grad()
def step_ms(model, job, window: int, fractions, reps: int, step_fn=None) -> list[float]:
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


@torch.no_grad()
def capture_cost(model, job, window: int, step_fn) -> tuple[float, int]:
    """(seconds, graphs) spent capturing CUDA graphs for one image: one per KV bucket a request walks through.

    Graphs belong to one request's cache, so every image (call) pays them again; measured as the
    first pass over all buckets minus a second (replay-only) pass.
    """
    batch = CFGBatch(model, job, SamplingConfig(cfg=4.0, top_k=4096), 1, window=window, step_fn=step_fn,
                     bucket_kv=True)
    batch.prefill(len(job.cond_prefix))
    tokens = torch.full((1, window), OFFSET + 5, device=batch.device)
    buckets = range(len(job.cond_prefix) // KV_BUCKET, math.ceil(batch.max_len / KV_BUCKET))
    passes = []
    for _ in range(2):
        _sync(batch.device)
        t0 = time.perf_counter()
        for b in buckets:
            fill = max(len(job.cond_prefix), min(b * KV_BUCKET, batch.max_len - window))
            batch.cache.lengths.fill_(fill)
            batch.host_pointer = [fill]
            batch.step(tokens)
        _sync(batch.device)
        passes.append(time.perf_counter() - t0)
    graphs = len(getattr(step_fn, "graphs", {}))
    batch.release()
    return passes[0] - passes[1], graphs


def peak_gb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset (nan off CUDA)."""
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")


def decode_figures(args, device: torch.device) -> list[dict]:
    """ms/step at the mean KV length, s/image, ratio to the bandwidth limit, peak memory: plain and SJD for one quantization."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = make_model(device, tiny=args.cpu_smoke)
    kernel = "bf16"
    if args.quant != "none":
        kernel = quantize_module(model, args.quant, kernel=args.kernel)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        load_peak = peak_gb(device)
        torch.cuda.reset_peak_memory_stats()  # the goals are about generation, not the one-off quantization
        print(f"[{args.quant:4s}] kernel {kernel}; weights {weight_bytes(model) / 1e9:.2f} GB; peak while "
              f"building/quantizing {load_peak:.1f} GB", flush=True)
    step_fn = compile_step(model) if args.compile else None
    if args.cuda_graphs and (device.type == "cuda" or args.cpu_smoke):  # off CUDA it is the eager step: smoke-tests the path
        step_fn = CUDAGraphStep(step_fn or model.decode_step)
    job = job_768(rows=8 if args.cpu_smoke else 96)
    fractions = tuple(float(f) for f in args.fractions.split(","))
    tokens = job.generated_tokens
    limit_ms = 1e3 * bytes_per_step(model, job, len(job.cond_prefix) + tokens / 2) / H200_BYTES_PER_S
    rows = []
    for name, window, keep in (("plain", 1, 1.0), ("sjd", SJD_WINDOW, args.accept)):
        if name not in args.modes.split(","):
            continue
        ms = step_ms(model, job, window, fractions, args.reps, step_fn)
        mean = sum(ms) / len(ms)
        steps = tokens / keep
        row = dict(quant=args.quant, kernel=kernel, mode=name, ms_per_step=mean, s_per_image=steps * mean / 1e3,
                   limit_ms=limit_ms, ratio=mean / limit_ms, peak_gb=peak_gb(device))
        if isinstance(step_fn, CUDAGraphStep):
            seconds, graphs = capture_cost(model, job, window, step_fn)
            row.update(capture_s=seconds, graphs=graphs, capture_share=seconds / max(row["s_per_image"] + seconds, 1e-9))
        rows.append(row)
        flags = (" compiled" if args.compile else "") + (" graphs" if args.cuda_graphs else "")
        capture = (f"; capture {row['capture_s']:.2f} s for {row['graphs']} graphs = {100 * row['capture_share']:.1f} % "
                   f"of the image" if "capture_s" in row else "")
        print(f"[{args.quant:4s} {name:5s}{flags}] {mean:.2f} ms/step at {args.fractions} of the image "
              f"({', '.join(f'{m:.2f}' for m in ms)}); {steps:.0f} steps -> {row['s_per_image']:.1f} s/image; "
              f"bandwidth limit {limit_ms:.2f} ms/step -> {row['ratio']:.2f}x; peak {row['peak_gb']:.1f} GB{capture}",
              flush=True)
    return rows


# The 7B's linear shapes (in, out): attention q/k/v/o, MLP gate/up and down.
LINEAR_SHAPES_7B = ((4096, 4096), (4096, 11008), (11008, 4096))


@torch.no_grad()
def linear_table(device: torch.device, rows_list=(2, 32), reps: int = 50, tiny: bool = False) -> list[dict]:
    """µs per call and effective weight GB/s of the 7B's linear layers alone, per available kernel, at 2 and 32 rows."""
    shapes = ((256, 256), (256, 512)) if tiny else LINEAR_SHAPES_7B
    capability = gpu_capability(device)
    kernels = [("none", "bf16")]
    for quant in QUANT_MODES:
        kernels += [(quant, k.name) for k in choose_kernels(quant, device.type, capability, installed_packages())]
    out = []
    print(f"linear layers alone on {device.type} (capability {capability}); µs per call (weight GB/s):")
    print("| kernel | " + " | ".join(f"{i}x{o} @ {r} rows" for i, o in shapes for r in rows_list) + " |")
    print("| --- " * (1 + len(shapes) * len(rows_list)) + "|")
    for quant, name in kernels:
        cells = []
        for fan_in, fan_out in shapes:
            layer = nn.Sequential(nn.Linear(fan_in, fan_out, bias=False)).to(device=device, dtype=torch.bfloat16)
            try:
                if quant != "none":
                    quantize_module(layer, quant, kernel=name)
            except Exception as e:  # a kernel that cannot take this shape: say so in its cell
                cells += [f"fails: {type(e).__name__}"] * len(rows_list)
                continue
            stored = weight_bytes(layer)
            for rows in rows_list:
                x = torch.randn(rows, fan_in, device=device, dtype=torch.bfloat16)
                for _ in range(3):
                    layer(x)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    layer(x)
                _sync(device)
                us = 1e6 * (time.perf_counter() - t0) / reps
                out.append(dict(kernel=name, shape=(fan_in, fan_out), rows=rows, us=us, gb_per_s=stored / us / 1e3))
                cells.append(f"{us:.1f} ({stored / us / 1e3:.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return out


def main() -> None:
    """Print the decode figures of one quantization, or the per-kernel linear table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant", choices=("none",) + QUANT_MODES, default="none")
    ap.add_argument("--kernel", default=None, help="force one kernel by name (lumina_core.quant.KERNELS)")
    ap.add_argument("--accept", type=float, default=2.2, help="tokens kept per SJD step (imposed)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay each step from a CUDA graph (as the pipeline does)")
    ap.add_argument("--modes", default="plain,sjd", help="comma list of plain, sjd")
    ap.add_argument("--fractions", default="0.5", help="cache fill points (fractions of the image) to time; 0.5 = the mean KV length")
    ap.add_argument("--linear-table", action="store_true", help="time the linear layers alone for every available kernel")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the script runs, no figures")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.linear_table:
        linear_table(device, reps=3 if args.cpu_smoke else 50, tiny=args.cpu_smoke)
    else:
        decode_figures(args, device)


if __name__ == "__main__":
    main()
