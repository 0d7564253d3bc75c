"""CPU decode benchmark (not a test): forward passes plain vs SJD, the step's own cost, per-image time, memory.

    python bench/decode.py [--parts passes,steps,demo,memory] [--shapes demo,7b-head] [--dtype float32]

1. Forward passes per image on a SYNTHETIC model with real spatial structure: the next code's
   logits are A[left code] + B[upper code] (a 2-D Markov field over a circle of codes, so nearby
   codes are similar), exposed through the transformer's API so the real decoders run unchanged.
   A random transformer has no spatial locality; its SJD acceptance would mean nothing.
2. The step's own cost at the real shapes (16,384 image codes, top-k 4,096; the demo's
   transformer and the 7B's hidden size): median time per decode step of plain, SJD and coupled
   SJD against a bare forward + image-code head of the same shape (CFG batch 2, one thread).
3. Seconds and forward passes per image on the embedded demo model (trained: real acceptance).
4. Peak memory (RSS) and the KV-cache size formula against the allocated cache.
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
from lumina_core.model import build_transformer  # noqa: E402
from lumina_core.kv_cache import KVCache
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


# Step-cost shapes: the image vocabulary of the real model (16,384 codes, top-k 4,096) behind
# the demo's transformer and behind the 7B's hidden size (one decoder layer: the head's share of a
# step is what matters here). rows x cols are few rows of 32 codes (256 px wide) after a long
# prompt, so the key length is about that of a 256x256 image half way (~560) and a run is short.
STEP_SHAPES = {
    "demo": dict(hidden=256, layers=4, intermediate=704, rows=8, prompt=420),
    "7b-head": dict(hidden=4096, layers=1, intermediate=11008, rows=2, prompt=500),
}


# CPU time of this thread, not wall time: with one intra-op thread every op runs here, and other
# processes on a shared machine then barely move the figures (wall-clock ratios swung 2x).
cpu_clock = time.thread_time


class StepClock:
    """Times every call of the cached forward and of the image-code head during a real decode.

    A step is the gap between two forward calls; its bare part is the forward and head calls
    inside that gap. Both are measured within the same step, so load from other processes
    (memory bandwidth is shared even when cores are not) lands on both sides of the ratio.
    """

    def __init__(self, forward) -> None:
        self.forward, self.calls = forward, []   # (kind, start, end)

    def __call__(self, *args, **kwargs):
        start = cpu_clock()
        try:
            return self.forward(*args, **kwargs)
        finally:
            self.calls.append(("forward", start, cpu_clock()))

    def wrap_head(self, head):
        def timed(*args, **kwargs):
            start = cpu_clock()
            try:
                return head(*args, **kwargs)
            finally:
                self.calls.append(("head", start, cpu_clock()))
        return timed

    def steps(self) -> list[tuple[float, float]]:
        """(step seconds, bare forward + head seconds) per decode step that ran the head (forced tokens skip it)."""
        starts = [i for i, c in enumerate(self.calls) if c[0] == "forward"]
        out = []
        for a, b in zip(starts, starts[1:]):   # the prefill is not a decode step (it calls hidden_states)
            inside = self.calls[a:b]
            if any(kind == "head" for kind, _, _ in inside):
                out.append((self.calls[b][1] - self.calls[a][1], sum(end - start for _, start, end in inside)))
        return out


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def step_cost(name: str, shape: dict, args) -> dict:
    """Median decode-step time of plain, SJD and coupled SJD against a bare forward + image head of the same shape.

    Each figure is the smallest of `--reps` medians, decoders and bare forwards taken in turn, so a
    burst of load from other processes (memory bandwidth is shared even when cores are not) does
    not land on one side of a ratio only.
    """
    torch.manual_seed(0)
    hidden = shape["hidden"]
    cfg = ModelConfig(vocab_size=OFFSET + args.t_codes + 16, hidden_size=hidden, intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    model = build_transformer(cfg).eval().to(DTYPES[args.dtype])
    job = job_for(shape["rows"], 32, args.t_codes, prompt_len=shape["prompt"])
    top_k = min(args.t_top_k, args.t_codes)
    decoders = {"plain": {}, "sjd": dict(sjd=True, sjd_window=args.window),
                "coupled": dict(sjd=True, sjd_window=args.window, sjd_coupled=True)}
    out: dict[str, float] = {}

    def keep_min(key: str, value: float) -> None:
        out[key] = min(out.get(key, float("inf")), value)

    def bare(n: int, reps: int) -> float:
        """A forward + image head of n tokens per row at the mean key length, nothing else (no sampling, no bookkeeping)."""
        batch = CFGBatch(model, job, SamplingConfig(cfg=4.0, top_k=top_k), 1, window=args.window)
        try:
            batch.prefill(len(job.cond_prefix))
            mid = job.generated_tokens // 2
            batch.cache.lengths += mid
            ids = torch.full((2, n), OFFSET)
            kv = len(job.cond_prefix) + mid + n
            times = []
            for _ in range(reps):
                t = cpu_clock()
                batch.image_logits(model.decode_step(ids, cache=batch.cache, kv_len=kv))
                times.append(cpu_clock() - t)
                batch.cache.rollback(n)
            return _median(times)
        finally:
            batch.release()

    with torch.no_grad():
        for _ in range(args.reps):
            for decoder, extra in decoders.items():
                sampling = SamplingConfig(cfg=4.0, top_k=top_k, **extra)
                clock = StepClock(model.decode_step)
                model.decode_step = clock          # the decoders' steps call model.decode_step: time every call
                head = CFGBatch.image_logits
                CFGBatch.image_logits = clock.wrap_head(head)
                try:
                    (decode_sjd if sampling.sjd else decode_ar)(model, job, sampling, [0])
                finally:
                    del model.decode_step
                    CFGBatch.image_logits = head
                steps = clock.steps()
                keep_min(decoder, _median([step for step, _ in steps]))
                keep_min(decoder + "_ratio", _median([step / bare for step, bare in steps]))
            keep_min("bare1", bare(1, 30))
            keep_min("bare_w", bare(args.window, 20))
    print(f"{name}: hidden {hidden}, {cfg.num_hidden_layers} layer(s), {args.t_codes} codes, top-k {top_k}, "
          f"{args.dtype}, CFG batch 2, keys ~{len(job.cond_prefix) + job.generated_tokens // 2}, "
          f"threads {torch.get_num_threads()}")
    for decoder, n in (("plain", 1), ("sjd", args.window), ("coupled", args.window)):
        bare_ms = 1e3 * out["bare1" if n == 1 else "bare_w"]
        print(f"  {decoder:7s} step {1e3 * out[decoder]:7.2f} ms (bare forward + head [2,{n}] alone {bare_ms:7.2f} ms); "
              f"step / its own forward + head: {out[decoder + '_ratio']:.3f}x")
    return out


def demo_per_image(args) -> None:
    """Seconds and forward passes per image on the embedded demo model (trained weights: real acceptance).

    A demo image takes ~0.2 s, so one burst of load elsewhere moves a total by 20 %: each (decoder,
    prompt) keeps its fastest of `--demo-reps` runs, the decoders taking turns within a round.
    """
    from lumina_core.demo import data
    from lumina_core.pipeline import LuminaPipeline
    from lumina_core.request import Request

    pipe = LuminaPipeline.from_pretrained("demo", dtype=torch.float32, device="cpu")
    prompts = ["a red circle above a blue square", "a green triangle in the top left", "a yellow square",
               "a blue circle to the left of a red triangle"]
    defaults = dict(cfg=1.5, guidance="constant", top_k=50, num_images=args.images)
    decoders = {"plain": {}, "SJD": dict(sjd=True), "SJD coupled": dict(sjd=True, sjd_coupled=True)}
    best = {(name, i): float("inf") for name in decoders for i in range(len(prompts))}
    passes = dict.fromkeys(decoders, 0)
    for rep in range(args.demo_reps):
        for name, extra in decoders.items():
            for i, prompt in enumerate(prompts):
                request = Request(task="t2i", prompt=prompt, width=data.IMAGE_SIZE, height=data.IMAGE_SIZE)
                out = pipe.generate(request, SamplingConfig(**defaults, seed=100 * i, **extra))
                best[name, i] = min(best[name, i], out.stats["seconds"])
                passes[name] += out.stats["forward_passes"] if rep == 0 else 0
    images = len(prompts) * args.images
    print(f"\ndemo model (64x64, 8x8 codes, {pipe.layout.num_image_codes} codes, top-k 50, CFG 1.5), "
          f"{len(prompts)} prompts x {args.images} images, fastest of {args.demo_reps} runs per prompt:")
    for name in decoders:
        seconds = sum(best[name, i] for i in range(len(prompts)))
        print(f"  {name:11s}: {1e3 * seconds / images:6.1f} ms per image, {passes[name] / images:5.1f} forward passes per image")


def memory_figures(args) -> None:
    """Peak memory (RSS) and the KV-cache size formula against the allocated cache."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=OFFSET + 4096 + 16, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4)
    model = build_transformer(cfg).eval()
    job = job_for(16, 16, 4096, prompt_len=64)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampling = SamplingConfig(cfg=4.0, top_k=4096)
    decode_ar(model, job, sampling, [0])
    rss_ar = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batch = CFGBatch(model, job, sampling, 1, window=args.window)
    formula = KVCache.nbytes_for(cfg, 2, batch.max_len, torch.float32)
    print(f"\nKV cache: formula = {formula / 2**20:.2f} MiB, allocated {batch.cache.nbytes / 2**20:.2f} MiB "
          f"({'match' if formula == batch.cache.nbytes else 'MISMATCH'})")
    batch.release()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"peak RSS {rss_ar / 1024:.0f} MiB (before decoding {rss0 / 1024:.0f} MiB; weights {weights / 2**20:.0f} MiB)")
    c7 = ModelConfig.preset("7b")
    full = KVCache.nbytes_for(c7, 2, 9316 + 200 + 17, torch.bfloat16)
    print(f"7B at 768x768 (CFG batch 2, 200-token prompt, window 16): KV cache {full / 1e9:.2f} GB in bf16")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    """Parse options, print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--codes", type=int, default=1024)
    p.add_argument("--sharpness", type=float, default=3.0)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--t-codes", type=int, default=16384, help="image codes of the step-cost shapes")
    p.add_argument("--t-top-k", type=int, default=4096)
    p.add_argument("--shapes", default="demo,7b-head", help=f"step-cost shapes: {', '.join(STEP_SHAPES)}")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--reps", type=int, default=3, help="step-cost repetitions (the smallest median counts)")
    p.add_argument("--demo-reps", type=int, default=5, help="demo runs per prompt and decoder (the fastest counts)")
    p.add_argument("--parts", default="passes,steps,demo,memory")
    p.add_argument("--threads", type=int, default=1)  # >1 thread on a busy shared CPU distorts timings badly
    args = p.parse_args()
    for name in ("reps", "demo_reps", "threads", "images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    if "passes" in parts:
        forward_pass_figures(args)
    if "steps" in parts:
        print()
        for name in args.shapes.split(","):
            step_cost(name, STEP_SHAPES[name], args)
    if "demo" in parts:
        demo_per_image(args)
    if "memory" in parts:
        memory_figures(args)


if __name__ == "__main__":
    main()
