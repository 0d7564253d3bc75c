"""Plain autoregressive decoding: one token per forward pass, batched CFG, static KV cache."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from ..model import LuminaTransformer
from . import SamplingConfig
from .state import CFGBatch, DecodeJob, Reporter, RowRandom, body_kinds, codes_from_body, forced_tokens, initial_body
from .logits import CODE, sample_inverse_cdf


@torch.no_grad()
def decode_ar(model: LuminaTransformer, job: DecodeJob, sampling: SamplingConfig, seeds: list[int],
              progress=None, should_cancel=None, step_fn: Optional[Callable] = None,
              trace: Optional[list] = None) -> tuple[torch.Tensor, dict]:
    """Sample one image per seed token by token; return (codes [N, rows, cols], stats).

    Forced positions (new line, end) are filled without sampling and without LM-head work; each
    image draws exactly one uniform per code position from its own generator (all at the start), so
    its result does not depend on the other images in the batch. `trace` (tests) collects (body_pos, probs [N, C]).
    """
    started = time.perf_counter()
    n = len(seeds)
    batch = CFGBatch(model, job, sampling, n, window=1, step_fn=step_fn, bucket_kv=step_fn is not None)
    device = batch.device
    rng = RowRandom(seeds, device)
    kinds = body_kinds(job, device).tolist()
    body = initial_body(job, n, device)
    reporter = Reporter(job, progress, should_cancel)
    # Every code position's uniform, drawn up front: one tensor op instead of one per token. On CPU these
    # are the very numbers one draw per step gives (torch's CPU generator streams them in order); CUDA's
    # Philox draws blocks per call, so there a seed gives other (equally independent) uniforms than before.
    uniforms = rng.uniform(sum(kind == CODE for kind in kinds[job.first_body:]))
    drawn = 0
    try:
        hidden = batch.prefill(len(job.cond_prefix))
        for t in range(job.first_body, job.body_len):
            if kinds[t] == CODE:
                probs = batch.probs(hidden, t)[:, 0]
                token = sample_inverse_cdf(probs, uniforms[:, drawn]).add_(job.code_offset)
                drawn += 1
                if trace is not None:
                    trace.append((t, probs))
            else:
                token = forced_tokens(torch.full((n,), kinds[t], device=device), job, job.image_end)
                body[:, t] = token
                reporter.update(body, t + 1)
            body[:, t] = token
            if t + 1 < job.body_len:
                hidden = batch.step(token[:, None])
        reporter.finish(body)
    finally:
        batch.release()
    steps = job.generated_tokens
    stats = {"decoder": "ar", "forward_passes": batch.forward_passes, "steps": batch.forward_passes - 1,
             "tokens": steps, "seconds": time.perf_counter() - started, "cache_positions": batch.max_len}
    return codes_from_body(body, job), stats
