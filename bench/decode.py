"""CPU decode benchmark (not a test): forward passes plain vs SJD, per-step overhead, memory, KV-cache formula.

    python bench/decode.py [--grid 32] [--codes 1024] [--images 2]

1. Forward passes per image on a SYNTHETIC model with real spatial structure: the next code's
   logits are A[left code] + B[upper code] (a 2-D Markov field over a circle of codes, so nearby
   codes are similar), exposed through the transformer's API so the real decoders run unchanged.
   A random transformer has no spatial locality; its SJD acceptance would mean nothing.
2. Time per decode step against a bare forward of the same shape, on a small real transformer.
3. Peak memory (RSS) and the KV-cache size formula against the allocated cache.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_core.config import ModelConfig  # noqa: E402
from lumina_core.model import KVCache, build_transformer  # noqa: E402
from lumina_core.sampling import SamplingConfig  # noqa: E402
from lumina_core.sampling.ar import decode_ar  # noqa: E402
from lumina_core.sampling.state import CFGBatch, DecodeJob  # noqa: E402
from lumina_core.sampling.sjd import decode_sjd  # noqa: E402

START, END_ID, NL, SIZE, OFFSET = 10, 11, 12, 13, 16


class MarkovField(nn.Module):
    """Transformer-shaped stand-in whose next-code logits depend on the left and upper neighbours only."""

    def __init__(self, num_codes: int, cols: int, sharpness: float, seed: int = 0) -> None:
        super().__init__()
        c = num_codes
        self.num_codes, self.cols = c, cols
        self.config = ModelConfig(vocab_size=OFFSET + c, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(self.config.vocab_size, 8)
        g = torch.Generator().manual_seed(seed)
        codes = torch.arange(c)
        dist = (codes[:, None] - codes[None]).abs()
        dist = torch.minimum(dist, c - dist).float()              # distance on a circle of codes
        noise = lambda: 0.5 * torch.randn(c + 1, c, generator=g)  # noqa: E731
        left = torch.cat([-sharpness * dist / c * 8, torch.zeros(1, c)]) + noise()   # row c: no neighbour
        up = torch.cat([-sharpness * dist / c * 8, torch.zeros(1, c)]) + noise()
        weight = torch.zeros(self.config.vocab_size, 2 * (c + 1))
        weight[OFFSET:] = torch.cat([left, up]).T
        self.lm_head = nn.Linear(2 * (c + 1), self.config.vocab_size, bias=False)
        self.lm_head.weight.data = weight
        self.forward_calls = 0
        self.decode_vocab = None  # the interface CFGBatch reads (lumina_core.model.LuminaTransformer)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def _code(self, tokens: torch.Tensor) -> torch.Tensor:
        code = tokens - OFFSET
        return torch.where((code >= 0) & (code < self.num_codes), code, torch.full_like(code, self.num_codes))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None, kv_len=None):
        b, n = input_ids.shape
        if not hasattr(cache, "tokens"):
            cache.tokens = torch.full((b, cache.max_len), START, dtype=torch.long)
        pos = cache.lengths[:, None] + torch.arange(n)
        cache.tokens.scatter_(1, pos, input_ids)
        left = self._code(input_ids)
        up_pos = pos - self.cols                      # the token above the one being predicted
        up = self._code(cache.tokens.gather(1, up_pos.clamp(min=0)))
        up = torch.where(up_pos >= 0, up, torch.full_like(up, self.num_codes))
        c1 = self.num_codes + 1
        hidden = torch.zeros(b, n, 2 * c1)
        hidden.scatter_(2, left[..., None], 1.0)
        hidden.scatter_(2, (up + c1)[..., None], 1.0)
        cache.lengths = cache.lengths + n
        return hidden

    decode_step = hidden_states


def job_for(rows: int, cols: int, num_codes: int, prompt_len: int = 8) -> DecodeJob:
    header = (START, SIZE, SIZE)
    return DecodeJob(cond_prefix=tuple(range(1, prompt_len + 1)) + header, uncond_prefix=header, rows=rows, cols=cols,
                      new_line=NL, image_end=END_ID, code_offset=OFFSET, num_codes=num_codes)


def forward_pass_figures(args) -> None:
    model = MarkovField(args.codes, args.grid, args.sharpness)
    job = job_for(args.grid, args.grid, args.codes)
    seeds = list(range(args.images))
    base = dict(cfg=1.0, top_k=args.codes, temperature=1.0, num_images=args.images)
    codes, ar_stats = decode_ar(model, job, SamplingConfig(**base), seeds)
    # How peaked is the target? (top-1 probability on the sampled images)
    print(f"synthetic 2-D Markov field: {args.grid}x{args.grid} codes, {args.codes} codes, {args.images} images, "
          f"{job.generated_tokens} tokens per image")
    print(f"  plain AR : {ar_stats['forward_passes']:6d} forward passes per image  ({ar_stats['seconds']:.2f} s)")
    for coupled in (False, True):
        s = SamplingConfig(**base, sjd=True, sjd_window=args.window, sjd_coupled=coupled)
        _, st = decode_sjd(model, job, s, seeds)
        hist = st["accepted_drafts_histogram"]
        single = hist[0] / max(1, sum(hist))
        name = "SJD coupled" if coupled else "SJD"
        print(f"  {name:11s}: {st['forward_passes']:6d} forward passes per image  -> "
              f"{ar_stats['forward_passes'] / st['forward_passes']:.2f}x fewer; {st['tokens_per_step']:.2f} tokens/step, "
              f"single-token steps {100 * single:.0f}%  ({st['seconds']:.2f} s)")


def timing_figures(args) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=OFFSET + args.t_codes + 4000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64)
    model = build_transformer(cfg).eval()
    rows = cols = args.t_grid
    job = job_for(rows, cols, args.t_codes, prompt_len=64)
    n_img = 1
    sampling = SamplingConfig(cfg=4.0, top_k=min(4096, args.t_codes), num_images=n_img)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Best of 2 runs each: the minimum filters out other processes on a shared machine.
    ar_stats = min((decode_ar(model, job, sampling, [0])[1] for _ in range(2)), key=lambda st: st["seconds"])
    rss_ar = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = SamplingConfig(cfg=4.0, top_k=min(4096, args.t_codes), num_images=n_img, sjd=True, sjd_window=args.window)
    sjd_stats = min((decode_sjd(model, job, s, [0])[1] for _ in range(2)), key=lambda st: st["seconds"])

    # Bare forwards of the same shapes at the mean cache length: the transformer and the image-code
    # head, nothing else (no sampling, no bookkeeping).
    with torch.no_grad():
        batch = CFGBatch(model, job, sampling, n_img, window=args.window)
        batch.prefill(len(job.cond_prefix))
        mid = job.generated_tokens // 2
        batch.cache.lengths += mid
        batch.host_pointer = [p + mid for p in batch.host_pointer]

        def bare(n: int, reps: int) -> float:
            ids = torch.full((2 * n_img, n), OFFSET)
            kv = max(batch.host_pointer) + n
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                batch.image_logits(model.hidden_states(ids, cache=batch.cache, kv_len=kv))
                best = min(best, time.perf_counter() - t)
                batch.cache.rollback(n)
            return best

        bare1, bare_w = bare(1, 40), bare(args.window, 20)
    ar_step = ar_stats["seconds"] / ar_stats["forward_passes"]
    sjd_step = sjd_stats["seconds"] / sjd_stats["forward_passes"]
    print(f"\nsmall real transformer: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, "
          f"{rows}x{cols} codes, CFG batch 2, threads {torch.get_num_threads()}")
    print(f"  AR  step {1e3 * ar_step:.2f} ms vs bare forward+head [2,1] {1e3 * bare1:.2f} ms -> {ar_step / bare1:.2f}x")
    print(f"  SJD step {1e3 * sjd_step:.2f} ms vs bare forward+head [2,{args.window}] {1e3 * bare_w:.2f} ms -> {sjd_step / bare_w:.2f}x"
          f"  ({sjd_stats['forward_passes']} vs {ar_stats['forward_passes']} passes on random weights)")
    formula = KVCache.nbytes_for(cfg, 2 * n_img, batch.max_len, torch.float32)
    print(f"  KV cache: formula 2*layers*rows*kv_heads*max_len*head_dim*4 B = {formula / 2**20:.2f} MiB, "
          f"allocated {batch.cache.nbytes / 2**20:.2f} MiB ({'match' if formula == batch.cache.nbytes else 'MISMATCH'})")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"  peak RSS {rss_ar / 1024:.0f} MiB (before decoding {rss0 / 1024:.0f} MiB; weights {weights / 2**20:.0f} MiB)")
    c7 = ModelConfig.preset("7b")
    full = KVCache.nbytes_for(c7, 2, 9316 + 200 + 17, torch.bfloat16)
    print(f"  7B at 768x768 (CFG batch 2, 200-token prompt, window 16): KV cache {full / 1e9:.2f} GB in bf16")
    batch.release()


def main() -> None:
    """Parse options, print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--codes", type=int, default=1024)
    p.add_argument("--sharpness", type=float, default=3.0)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--t-grid", type=int, default=16)
    p.add_argument("--t-codes", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)  # >1 thread on a busy shared CPU distorts timings badly
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    forward_pass_figures(args)
    timing_figures(args)


if __name__ == "__main__":
    main()
