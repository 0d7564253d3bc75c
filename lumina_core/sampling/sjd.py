"""Speculative Jacobi decoding (SJD) over the same target distribution as plain AR.

Each step feeds a window [last accepted token, W-1 drafts] for every image (conditional and
unconditional rows in one batch), computes the target p at all W positions with `image_probs`,
and verifies the drafts left to right with the exact speculative rule:

    accept draft x with probability min(1, p(x) / q(x)); at the first rejection, sample from
    normalise(max(0, p - q)); if every draft passes, sample one more token from p (the bonus).

Here q is the distribution the draft was ACTUALLY drawn from: uniform over the image codes for a
fresh random draft, or the p row of the previous step that produced a refreshed draft. Both are
true draw distributions, so each finalized token is an exact sample of p given the accepted
prefix (standard speculative-sampling argument), hence SJD and AR sample the same images in
distribution. (The official port resamples from p instead of the residual and changes CFG inside
SJD; we copy neither.) Forced positions (new line, end) are drafted with the forced token and
always accepted (p = q = one-hot there). Rejected KV entries are dropped by moving each image's
cache pointer back.

Coupled variant ("MC-SJD", `coupled=True`): drafts at body position t are drawn with noise that
is FIXED per (image seed, position), via a counter-based hash, so when p at t barely changes
between steps the redraw returns the same token and gets accepted. A refreshed draft is the
exponential race argmin_c E_t[c] / p(c) with E_t = -log(U_t) (the Gumbel-max draw in the form
that needs no log of p); a fresh draft is floor(V_t * C) with V_t a second hash of (seed, t).
Exactness: the noise at t is used for nothing but drafting position t. Every decision about
positions < t (acceptances, residual draws, bonus tokens; all with fresh per-step uniforms from
the image's generator) and the draft distribution q_t (a function of tokens before t only) are
therefore independent of it, so conditionally on them the draft at t is still an exact sample
of q_t and the speculative test above stays exact. Residual and bonus samples never use the
hash. The only approximation is the hash itself (24-bit uniforms; see `hash_uniform`).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from ..model import LuminaTransformer
from . import SamplingConfig
from .state import CFGBatch, DecodeJob, Reporter, RowRandom, codes_from_body, forced_tokens, initial_body
from .logits import CODE, position_kind, sample_inverse_cdf

BEYOND = 3  # body positions after the image end (window padding; never accepted)
# Below this residual mass a rejection has probability < 1e-6 and the residual is rounding noise;
# sampling p there changes the output distribution by at most that much.
RESIDUAL_EPS = 1e-6
_MASK32 = 0xFFFFFFFF


def _pcg(x: torch.Tensor) -> torch.Tensor:
    """PCG hash of 32-bit values held in int64 (products stay below 2**63)."""
    state = (x * 747796405 + 2891336453) & _MASK32
    word = ((torch.bitwise_right_shift(state, (state >> 28) + 4) ^ state) * 277803737) & _MASK32
    return ((word >> 22) ^ word) & _MASK32


def _signed32(value: int) -> int:
    """A 32-bit constant as the int32 with the same bits."""
    return value - (1 << 32) if value >= 1 << 31 else value


_FMIX1, _FMIX2 = _signed32(0x85EBCA6B), _signed32(0xC2B2AE35)


def position_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """32-bit key per (image seed [N], body position [N, n]) in int64 [N, n]: what the coupled noise hangs on."""
    seed_key = _pcg(_pcg(seeds & _MASK32) ^ _pcg((seeds >> 32) & _MASK32))               # [N]
    return _pcg(seed_key[:, None] ^ _pcg((positions + 0x9E3779B9) & _MASK32))            # [N, n]


def code_keys(count: int, device: torch.device | str) -> torch.Tensor:
    """One well-mixed int32 constant per image code [count] (built once per job)."""
    return _signed32_tensor(_pcg(torch.arange(count, device=device, dtype=torch.long) ^ 0x85EBCA6B))


def _signed32_tensor(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def hash_uniform(keys: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in (0, 1) [N, n, C] from position keys [N, n] and code keys [C]: the coupled-draft noise.

    murmur3's 32-bit finaliser on key ^ code in int32 arithmetic (multiplication wraps; right shifts
    are masked so they are logical), then the top 24 bits as a float32 uniform: the same bits on
    every device, about ten cheap integer passes instead of two 64-bit PCG hashes per entry.
    """
    h = _signed32_tensor(keys)[..., None] ^ codes   # in place from here: a fresh 1 MB buffer per op cost 3x
    h.mul_(_FMIX1)
    h ^= (h >> 13).bitwise_and_(0x7FFFF)
    h.mul_(_FMIX2)
    h ^= (h >> 16).bitwise_and_(0xFFFF)
    return h.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF).float().add_(0.5).mul_(2.0 ** -24)


def hash_codes(keys: torch.Tensor, count: int) -> torch.Tensor:
    """A uniform code in 0..count-1 per position key [N, n] (the coupled fresh draft): floor(V * count)."""
    v = _pcg(keys ^ 0x68E31DA4)  # a second, independent hash of the same (seed, position)
    return (v * count) >> 32


def coupled_draw(p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax_c p[c] / E[c] with E = -log(noise): an exact draw from p (the exponential race; Gumbel-max without log p).

    Overwrites `noise` (the caller's fresh hash output).
    """
    exponential = noise.log_().neg_()
    return torch.div(p, exponential, out=exponential).argmax(-1)


@torch.no_grad()
def decode_sjd(model: LuminaTransformer, job: DecodeJob, sampling: SamplingConfig, seeds: list[int],
               progress=None, should_cancel=None, window: Optional[int] = None, coupled: Optional[bool] = None,
               step_fn: Optional[Callable] = None, trace: Optional[list] = None) -> tuple[torch.Tensor, dict]:
    """Sample one image per seed with speculative Jacobi decoding; return (codes [N, rows, cols], stats).

    `trace` (tests) collects, per step, (body positions [N, W], probs [N, W, C], accepted counts [N]).
    """
    started = time.perf_counter()
    w = sampling.sjd_window if window is None else window
    coupled = sampling.sjd_coupled if coupled is None else coupled
    n, num_codes, total = len(seeds), job.num_codes, job.body_len
    batch = CFGBatch(model, job, sampling, n, window=w, step_fn=step_fn, bucket_kv=step_fn is not None)
    device = batch.device
    rng = RowRandom(seeds, device)
    seed_t = torch.tensor(seeds, dtype=torch.long, device=device)
    code_key = code_keys(num_codes, device) if coupled else None
    rows_idx = torch.arange(n, device=device)
    ar = torch.arange(w, device=device)
    uniform_q = torch.full((num_codes,), 1.0 / num_codes, device=device)
    body = initial_body(job, n, device, extra=w + 1)
    reporter = Reporter(job, progress, should_cancel)

    def kinds_at(pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos >= total, torch.full_like(pos, BEYOND), position_kind(pos, job.rows, job.cols))

    def random_drafts(pos: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Fresh drafts at body positions pos [N, m]: uniform codes (forced tokens where the grammar fixes them)."""
        if coupled:
            codes = hash_codes(position_keys(seed_t, pos), num_codes)
        else:
            codes = (u * num_codes).long().clamp_(max=num_codes - 1)
        return _with_forced(codes + job.code_offset, kinds_at(pos))

    def _with_forced(tokens: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        forced = forced_tokens(kinds, job, job.image_end)
        return torch.where(kinds == CODE, tokens, forced)

    steps = 0
    accepted_hist = torch.zeros(w, dtype=torch.long)
    try:
        batch.prefill(len(job.cond_prefix) - 1)
        last = torch.full((n,), job.cond_prefix[-1], dtype=torch.long, device=device)
        done_count = torch.full((n,), job.first_body, dtype=torch.long, device=device)   # finalized body tokens
        host_done = [job.first_body] * n
        draft_pos = done_count[:, None] + ar[: w - 1]
        drafts = random_drafts(draft_pos, rng.uniform(w - 1))
        # Where each draft was drawn from: row q_src[i, j] of the previous step's p, or uniform (q_src = -1).
        # Kept as an index into that p rather than as copied rows: only the draft entries and one
        # residual row per image are ever read.
        prev_p = torch.zeros(n, w, num_codes, device=device)
        q_src = torch.full((n, w - 1), -1, dtype=torch.long, device=device)
        while min(host_done) < total:
            finished = done_count >= total
            hidden = batch.step(torch.cat([last[:, None], drafts], 1))
            steps += 1
            pos = done_count[:, None] + ar                               # body position predicted by output j
            p = batch.probs(hidden, pos)                                 # [N, W, C]
            u = rng.uniform(3 * w - 1)
            u_accept, u_draw, u_resid, u_fresh = u[:, : w - 1], u[:, w - 1: 2 * w - 1], u[:, 2 * w - 1], u[:, 2 * w:]

            # Verify draft j (body position done+j, input j+1) against p at output j.
            d_kind = kinds_at(pos[:, : w - 1])
            d_code = (drafts - job.code_offset).clamp(0, num_codes - 1)
            p_d = p[:, : w - 1].gather(-1, d_code[..., None])[..., 0]
            from_prev = q_src >= 0
            q_d = torch.where(from_prev, prev_p[rows_idx[:, None], q_src.clamp(min=0), d_code], uniform_q[0])
            accept = torch.where(d_kind == CODE, u_accept < p_d / q_d.clamp_min(1e-30), d_kind != BEYOND)
            k = accept.long().cumprod(1).sum(1)                          # accepted drafts [N]

            # The token after the accepted drafts: residual sample on rejection, bonus sample from p otherwise.
            p_k = p[rows_idx, k]
            k_q = k.clamp(max=w - 2)
            src_k = q_src[rows_idx, k_q]
            q_k = torch.where((src_k >= 0)[:, None], prev_p[rows_idx, src_k.clamp(min=0)], uniform_q)
            residual = (p_k - q_k).clamp_min(0)
            use_residual = (k < w - 1) & (residual.sum(-1) > RESIDUAL_EPS)
            dist = torch.where(use_residual[:, None], residual, p_k)
            new_pos = done_count + k
            new_tok = _with_forced(sample_inverse_cdf(dist, u_resid) + job.code_offset, kinds_at(new_pos))

            # Commit into the body buffer (finished images keep theirs).
            slots = done_count[:, None] + ar[: w - 1]
            keep = (ar[: w - 1][None] < k[:, None]) & ~finished[:, None]
            body.scatter_(1, slots, torch.where(keep, drafts, body.gather(1, slots)))
            write_new = ~finished & (new_pos < total)
            body.scatter_(1, new_pos[:, None], torch.where(write_new, new_tok, body.gather(1, new_pos[:, None])[:, 0])[:, None])
            new_done = torch.where(finished, done_count, (new_pos + 1).clamp(max=total))

            # Refresh: this step's samples at later positions become the next drafts (q = their p).
            if coupled:
                samples = coupled_draw(p, hash_uniform(position_keys(seed_t, pos), code_key))
            else:
                samples = sample_inverse_cdf(p, u_draw)
            next_pos = new_done[:, None] + ar[: w - 1]
            src = next_pos - done_count[:, None]                          # output index that sampled that position
            from_step = src <= w - 1
            src_c = src.clamp(max=w - 1)
            carried = samples.gather(1, src_c) + job.code_offset
            fresh = random_drafts(next_pos, u_fresh)
            next_drafts = torch.where(from_step, _with_forced(carried, kinds_at(next_pos)), fresh)
            next_src = torch.where(from_step, src_c, torch.full_like(src_c, -1))

            # Keep the window's first k+1 cache entries (last token + accepted drafts); finished rows keep none.
            kept = torch.where(finished, torch.zeros_like(k), k + 1)
            k_host, kept_host, done_host_t = torch.stack([k, kept, new_done]).tolist()  # the one sync per step
            batch.rollback(w - kept, [w - x for x in kept_host])
            if trace is not None:
                trace.append((pos, p, k))
            for i in range(n):
                if host_done[i] < total:
                    accepted_hist[k_host[i]] += 1
            last = torch.where(finished, last, new_tok)
            done_count, host_done, drafts, q_src, prev_p = new_done, done_host_t, next_drafts, next_src, p
            reporter.update(body, min(host_done))
        reporter.finish(body)
    finally:
        batch.release()
    generated = job.generated_tokens
    stats = {"decoder": "sjd_coupled" if coupled else "sjd", "forward_passes": batch.forward_passes, "steps": steps,
             "tokens": generated, "tokens_per_step": generated / max(steps, 1), "window": w,
             "accepted_drafts_histogram": accepted_hist.tolist(), "seconds": time.perf_counter() - started,
             "cache_positions": batch.max_len}
    return codes_from_body(body[:, :total], job), stats
