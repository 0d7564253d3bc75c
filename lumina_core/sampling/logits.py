"""The target distribution at an image position, as pure tensor functions.

Order (reference section e): CFG on raw float32 logits -> grammar (forced new line / end, image
codes only mid-row) -> top-k (ties kept) -> temperature -> softmax. Both decoders (plain AR and
SJD) call `image_probs`, so they sample the same distribution for every task.

Inside an image every position that is not forced allows image codes only, so the decoders
compute logits for the image-code rows of the LM head only (`[..., num_image_codes]`) and fill
forced positions without sampling. `grammar_mask_full` states the same rule over the whole
vocabulary; the tests check that both forms give the same distribution.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..request import body_length  # the one size rule (re-used here by the sampling modules)

# Kinds of body positions (body = everything after start, H, W: rows with new lines, then end).
CODE, NEW_LINE, END = 0, 1, 2

# The official schedule never lets guidance fall below this floor (reference section e.1).
OFFICIAL_GUIDANCE_FLOOR = 4.0


def position_kind(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Kind (CODE / NEW_LINE / END) of body positions `t` (0-based, any shape); the official rule.

    Official: with t tokens after start/H/W so far, (t+1) mod (cols+1) == 0 forces the new line,
    t+1 == (cols+1)*rows + 1 forces the end, anything else allows image codes only.
    """
    kind = torch.full_like(t, CODE)
    kind = torch.where((t + 1) % (cols + 1) == 0, torch.full_like(t, NEW_LINE), kind)
    return torch.where(t == rows * (cols + 1), torch.full_like(t, END), kind)


def guidance_table(cfg: float, mode: str, rows: int, cols: int, first: int = 0,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Guidance value used at every body position first..end (float32 [body_length - first] on `device`).

    "official": the in-place schedule of the official CFG processor (reference section e.1): the
    value starts at `cfg` and, at every step inside the image (forced positions included), becomes
    max(4.0, g * (1 - n / (4*hg*wg))) where n counts the tokens after the image start (H, W,
    reference and all body tokens so far) and hg, wg are grid counts (rows/4, cols/4). A value of
    exactly 1.0 disables CFG and is never updated. "constant": `cfg` everywhere. The schedule runs in
    Python floats (float64) and is rounded once to float32, the precision of the logits it scales;
    built once per job on the device (no per-step copy; Apple MPS has no float64).
    """
    count = body_length(rows, cols) - first
    if mode == "constant" or cfg == 1.0:
        return torch.full((count,), float(cfg), dtype=torch.float32, device=device)
    if mode != "official":
        raise ValueError(f"unknown guidance {mode!r}; allowed: 'official', 'constant'")
    denominator = 4 * (rows / 4) * (cols / 4)
    out = []
    g = float(cfg)
    for t in range(first, first + count):
        n = t + 2  # tokens after the image start when predicting body position t: H, W and t body tokens
        g = max(OFFICIAL_GUIDANCE_FLOOR, g * (1.0 - n / denominator))
        out.append(g)
    return torch.tensor(out, dtype=torch.float32, device=device)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor | float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance on raw logits: scale * (cond - uncond) + uncond (scale broadcast on the last dim).

    One buffer, not three (the same arithmetic); `out` may be `cond` itself (then it is computed in place).
    """
    if isinstance(scale, torch.Tensor):
        scale = scale.to(cond.dtype)[..., None]
    return torch.sub(cond, uncond, out=out).mul_(scale).add_(uncond)


def grammar_mask_full(logits: torch.Tensor, kind: torch.Tensor, new_line: int, image_end: int,
                      code_offset: int, num_codes: int) -> torch.Tensor:
    """Apply the image grammar to full-vocabulary logits [..., V] given position kinds [...]."""
    vocab = logits.shape[-1]
    ids = torch.arange(vocab, device=logits.device)
    is_code = (ids >= code_offset) & (ids < code_offset + num_codes)
    allowed = torch.where(kind[..., None] == NEW_LINE, ids == new_line,
                          torch.where(kind[..., None] == END, ids == image_end, is_code))
    out = logits.masked_fill(~allowed, float("-inf"))
    # Forced tokens get logit 0 (as the official processor does), so they have probability 1.
    forced = (kind[..., None] != CODE) & allowed
    return out.masked_fill(forced, 0.0)


def kth_largest(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value along the last dim [..., 1], found by selection, not by sorting."""
    return torch.topk(logits, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)


def top_k_filter(logits: torch.Tensor, k: int, inplace: bool = False,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Keep entries >= the k-th largest value of the last dim (ties kept), others -inf (in place if `inplace`).

    Only the k-th value matters, and it is the same however it is found, so the kept set and the
    result are too. On CPU (float32, eager) numpy's introselect over the values alone finds it in
    about half the time of torch.topk (which selects (value, index) pairs), and a per-row
    `threshold_` at the float just below it masks in a vectorised pass (a boolean mask took 5x as long).
    The selection reorders a copy of the values: `scratch` (a contiguous buffer of the same size
    whose contents are no longer needed) holds it if given, else a new buffer does.
    """
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    n = logits.shape[-1]
    if k >= n:
        return logits
    out = logits if inplace else logits.clone()
    if out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous() \
            and not torch.compiler.is_compiling():
        rows = out.view(-1, n)
        work = torch.empty_like(rows) if scratch is None else scratch.view(-1, n)
        values = work.copy_(rows).numpy()
        values.partition(n - k, axis=-1)
        below_kth = np.nextafter(values[:, n - k], np.float32(-np.inf))  # x > below_kth <=> x >= kth (float32 x)
        for i, threshold in enumerate(below_kth.tolist()):
            F.threshold_(rows[i], threshold, float("-inf"))
        return out
    return out.masked_fill_(out < kth_largest(out, k), float("-inf"))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by the temperature (> 0); 1.0 leaves them unchanged."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def image_probs(cond: torch.Tensor, uncond: torch.Tensor | None, scale: torch.Tensor | float | None,
                top_k: int, temperature: float, overwrite: bool = False) -> torch.Tensor:
    """THE target distribution over image codes at mid-row positions: [..., num_codes] logits -> probabilities.

    `cond`/`uncond` are float32 logits of the image-code rows only (the grammar's image-only rule is
    the restriction itself); `uncond=None` means no CFG (cfg == 1). With `overwrite` (contiguous
    logits the caller no longer needs, as the decoders' fresh head outputs are) the CFG result is
    written into `cond` and the top-k selection works in `uncond`: nothing new is written between
    the image head and the softmax (on CPU, memory first written right after the 16 MB head costs
    several times what it costs otherwise). The arithmetic is the same either way.
    """
    if uncond is None:
        logits = top_k_filter(cond, top_k, inplace=overwrite)
    else:
        # Without `overwrite` the CFG result is still ours to filter in place; the caller's logits are not.
        logits = cfg_combine(cond, uncond, scale, out=cond if overwrite else None)
        logits = top_k_filter(logits, top_k, inplace=True, scratch=uncond if overwrite else None)
    return torch.softmax(apply_temperature(logits, temperature), dim=-1)


def full_vocab_probs(cond: torch.Tensor, uncond: torch.Tensor | None, scale: torch.Tensor | float | None,
                     kind: torch.Tensor, top_k: int, temperature: float, new_line: int, image_end: int,
                     code_offset: int, num_codes: int) -> torch.Tensor:
    """The same chain over the whole vocabulary (the official form); used to check `image_probs`."""
    logits = cond if uncond is None else cfg_combine(cond, uncond, scale)
    logits = grammar_mask_full(logits, kind, new_line, image_end, code_offset, num_codes)
    logits = apply_temperature(top_k_filter(logits, top_k), temperature)
    return torch.softmax(logits, dim=-1)


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample one index per row of probs [..., C] with uniforms u [...] in [0, 1) (inverse CDF)."""
    cdf = probs.cumsum(-1)  # contiguous, and so is the [..., 1] target: searchsorted's preferred layout
    target = cdf[..., -1:] * u.to(cdf.dtype)[..., None]
    return torch.searchsorted(cdf, target, right=True)[..., 0].clamp_(max=probs.shape[-1] - 1)
