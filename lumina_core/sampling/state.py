"""What both decoders share: the decode job, the batched-CFG forward over a static KV cache,
per-image random streams, and progress/cancel reporting."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..kv_cache import KVCache, kv_storage_dtype
from ..model import LuminaTransformer
from ..request import cfg_rows
from . import GenerationCancelled, SamplingConfig
from .logits import END, NEW_LINE, body_length, guidance_table, image_probs, position_kind

ProgressFn = Callable[[int, int, torch.Tensor], None]
CancelFn = Callable[[], bool]

# Keys are read up to a multiple of this (masked beyond the filled part), so a compiled step
# sees one shape per bucket instead of one per token.
KV_BUCKET = 256


@dataclass(frozen=True)
class DecodeJob:
    """One image-generation job in token terms (built by the pipeline from a Request and a TokenLayout).

    `cond_prefix` = BOS, prompt, separator, image start, H, W (+ the reference rows for I2I);
    `uncond_prefix` = the same from the image start on (the official non-SJD unconditional
    context: no text, positions from 0). `rows` x `cols` is the full code grid; the first
    `first_row` rows are given (the reference) and are part of both prefixes.
    """

    cond_prefix: tuple[int, ...]
    uncond_prefix: tuple[int, ...]
    rows: int
    cols: int
    new_line: int
    image_end: int
    code_offset: int
    num_codes: int
    first_row: int = 0
    reference_codes: Optional[torch.Tensor] = None  # [first_row, cols]

    @property
    def first_body(self) -> int:
        """Body index of the first generated token."""
        return self.first_row * (self.cols + 1)

    @property
    def body_len(self) -> int:
        """Body tokens of the full image (rows with new lines, then the end)."""
        return body_length(self.rows, self.cols)

    @property
    def prompt_tokens(self) -> int:
        """Text tokens before the image header (BOS, prompt, separator): what only the conditional prefix has."""
        return len(self.cond_prefix) - len(self.uncond_prefix)

    @property
    def generated_tokens(self) -> int:
        """Body tokens the sampler produces."""
        return self.body_len - self.first_body


def image_head_weight(model: LuminaTransformer, offset: int, count: int) -> Optional[torch.Tensor]:
    """The LM-head rows of the image codes: the decode vocabulary's, else a view of lm_head (None when quantized)."""
    vocab = model.decode_vocab
    if vocab is not None and (vocab.code_offset, vocab.num_codes) == (offset, count):
        return vocab.head
    weight = model.lm_head.weight
    if type(weight) in (torch.Tensor, torch.nn.Parameter):
        return weight[offset:offset + count]
    return None


def cache_length(job: DecodeJob, window: int) -> int:
    """Positions the KV cache needs: the conditional prefix, every generated token and one window of slack."""
    return len(job.cond_prefix) + job.generated_tokens + window + 1


class CFGBatch:
    """Conditional and unconditional rows of N images in one batch over one static KV cache.

    Rows 0..N-1 are conditional, rows N..2N-1 unconditional (absent when cfg == 1). The
    unconditional prefix is left-padded to the conditional length (masked keys), and its position
    ids start at 0 at the image start, so one forward pass evaluates both definitions at once.
    Every image keeps one write pointer (its two rows move together).
    """

    def __init__(self, model: LuminaTransformer, job: DecodeJob, sampling: SamplingConfig, num_images: int,
                 window: int, step_fn: Optional[Callable] = None, bucket_kv: bool = False) -> None:
        self.model, self.job, self.sampling = model, job, sampling
        self.n = num_images
        self.use_cfg = sampling.cfg != 1.0
        self.device = model.device
        rows = cfg_rows(num_images, sampling.cfg)  # the one rule, counted by the memory reservations too
        self.prefix_len = len(job.cond_prefix)
        self.max_len = cache_length(job, window)
        # Decode steps feed the prefix's last token (SJD's first window), codes and forced tokens.
        fed = (job.cond_prefix[-1], job.uncond_prefix[-1], job.new_line, job.image_end)
        if model.decode_vocab is not None and not model.decode_vocab.covers(fed):
            raise ValueError(f"the model's decode vocabulary lacks some of the tokens decoding feeds: {fed}")
        self.cache = KVCache(model.config, rows, self.max_len, dtype=model.dtype, device=self.device,
                             storage=kv_storage_dtype(sampling.kv_cache, model.dtype))
        pad = self.prefix_len - len(job.uncond_prefix)
        if pad < 0:
            raise ValueError("the unconditional prefix must not be longer than the conditional one")
        offsets = [0] * num_images + ([pad] * num_images if self.use_cfg else [])
        self.position_offset = torch.tensor(offsets, dtype=torch.long, device=self.device)
        self.pad = pad
        self.step_offsets: dict[int, torch.Tensor] = {}  # window width -> position id minus cache pointer
        self.head_weight = image_head_weight(model, job.code_offset, job.num_codes)
        self.step_fn = step_fn or model.decode_step
        self.bucket_kv = bucket_kv
        self.host_pointer = [0] * num_images  # cache pointer per image, known on the host
        self.forward_passes = 0
        # Guidance by body position (0 .. body_len + window: a window may reach past the end), built
        # once on the device: one gather per step, no host copy.
        table = guidance_table(sampling.cfg, sampling.guidance, job.rows, job.cols, job.first_body, self.device)
        index = (torch.arange(job.body_len + window + 1, device=self.device) - job.first_body).clamp(0, table.numel() - 1)
        self.guidance_at = table[index]

    # --- model calls ------------------------------------------------------------------------
    def _kv_len(self, n: int) -> int:
        need = max(self.host_pointer) + n
        if need > self.max_len:
            raise ValueError(f"the request needs {need} cache positions but the KV cache holds {self.max_len}")
        if self.bucket_kv:
            need = min(self.max_len, -(-need // KV_BUCKET) * KV_BUCKET)
        return need

    def prefill(self, count: int) -> torch.Tensor:
        """Run the first `count` prefix tokens of every row; return final hidden states of the last one [rows, H]."""
        cond = torch.tensor(self.job.cond_prefix[:count], dtype=torch.long, device=self.device)
        ids = [cond.expand(self.n, -1)]
        valid = [torch.ones(self.n, count, dtype=torch.bool, device=self.device)]
        if self.use_cfg:
            uncond = torch.zeros(count, dtype=torch.long, device=self.device)
            real = torch.tensor(self.job.uncond_prefix[:max(0, count - self.pad)], dtype=torch.long, device=self.device)
            uncond[count - real.numel():] = real
            ids.append(uncond.expand(self.n, -1))
            uv = torch.zeros(count, dtype=torch.bool, device=self.device)
            uv[count - real.numel():] = True
            valid.append(uv.expand(self.n, -1))
        ids_t, valid_t = torch.cat(ids), torch.cat(valid)
        positions = (torch.arange(count, device=self.device)[None] - self.position_offset[:, None]).clamp(min=0)
        hidden = self.model.hidden_states(ids_t, attention_mask=valid_t, position_ids=positions, cache=self.cache,
                                          kv_len=count)
        self.forward_passes += 1
        self.host_pointer = [count] * self.n
        return hidden[:, -1:]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [N, n] (the same to both rows of an image); return final hidden states [rows, n, H]."""
        n = tokens.shape[1]
        ids = torch.cat([tokens, tokens]) if self.use_cfg else tokens
        offsets = self.step_offsets.get(n)
        if offsets is None:  # built once per window width: a plain step is mostly a few tiny ops like this one
            offsets = self.step_offsets[n] = torch.arange(n, device=self.device) - self.position_offset[:, None]
        positions = self.cache.lengths[:, None] + offsets
        hidden = self.step_fn(ids, position_ids=positions, cache=self.cache, kv_len=self._kv_len(n))
        self.forward_passes += 1
        self.host_pointer = [p + n for p in self.host_pointer]
        return hidden

    def rollback(self, counts: torch.Tensor, host_counts: list[int]) -> None:
        """Forget the last counts[i] positions of image i (both of its rows)."""
        self.cache.rollback(torch.cat([counts, counts]) if self.use_cfg else counts)
        self.host_pointer = [p - c for p, c in zip(self.host_pointer, host_counts)]

    def image_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Float32 logits of the image codes: (cond [N, n, C], uncond [N, n, C] or None), fresh contiguous buffers."""
        if self.head_weight is not None:
            logits = F.linear(hidden, self.head_weight).float()
        else:  # the code rows of the full head's output, as one contiguous float32 copy
            codes = slice(self.job.code_offset, self.job.code_offset + self.job.num_codes)
            logits = self.model.lm_head(hidden)[..., codes].float().contiguous()
        if self.use_cfg:
            return logits[: self.n], logits[self.n:]
        return logits, None

    def probs(self, hidden: torch.Tensor, body_pos: torch.Tensor | int) -> torch.Tensor:
        """The target distribution [N, n, C] at body positions body_pos ([N, n], or one int for all rows) (via `image_probs`)."""
        cond, uncond = self.image_logits(hidden)
        scale = None
        if self.use_cfg:  # one position for every row (plain decoding): a view, no index tensor built per step
            scale = self.guidance_at[body_pos:body_pos + 1] if isinstance(body_pos, int) else self.guidance_at[body_pos]
        return image_probs(cond, uncond, scale, self.sampling.top_k, self.sampling.temperature, overwrite=True)

    def release(self) -> None:
        """Free the cache tensors (and any CUDA graphs that read them)."""
        reset = getattr(self.step_fn, "reset", None)
        if reset is not None:
            reset()
        self.cache.release()


class RowRandom:
    """One torch.Generator per image, seeded with its own seed, so batch composition never changes an image."""

    def __init__(self, seeds: list[int], device: torch.device) -> None:
        self.device = device
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def uniform(self, count: int) -> torch.Tensor:
        """[N, count] uniforms in [0, 1), row i from generator i."""
        return torch.stack([torch.rand(count, generator=g, device=self.device) for g in self.generators])


def forced_tokens(kind: torch.Tensor, job: DecodeJob, fill: int) -> torch.Tensor:
    """Token ids for forced kinds (new line / end); `fill` elsewhere."""
    out = torch.full_like(kind, fill)
    out = torch.where(kind == NEW_LINE, torch.full_like(kind, job.new_line), out)
    return torch.where(kind == END, torch.full_like(kind, job.image_end), out)


def body_kinds(job: DecodeJob, device: torch.device) -> torch.Tensor:
    """Kind of every body position [body_len]."""
    return position_kind(torch.arange(job.body_len, device=device), job.rows, job.cols)


def codes_from_body(body: torch.Tensor, job: DecodeJob, rows_done: Optional[int] = None) -> torch.Tensor:
    """Code grids [N, rows_done, cols] from body tokens [N, >= rows_done*(cols+1)]."""
    rows = job.rows if rows_done is None else rows_done
    grid = body[:, : rows * (job.cols + 1)].reshape(body.shape[0], rows, job.cols + 1)[..., : job.cols]
    return grid - job.code_offset


def initial_body(job: DecodeJob, num_images: int, device: torch.device, extra: int = 0) -> torch.Tensor:
    """Body token buffer [N, body_len + extra] with the reference rows (if any) filled in."""
    body = torch.full((num_images, job.body_len + extra), job.image_end, dtype=torch.long, device=device)
    if job.first_row:
        ref = job.reference_codes.to(device=device, dtype=torch.long) + job.code_offset
        rows = torch.cat([ref, torch.full((job.first_row, 1), job.new_line, dtype=torch.long, device=device)], 1)
        body[:, : job.first_body] = rows.reshape(-1)
    return body


@dataclass
class Reporter:
    """Calls progress(done, total, partial_codes) once per completed image row and checks cancel there."""

    job: DecodeJob
    progress: Optional[ProgressFn] = None
    should_cancel: Optional[CancelFn] = None
    rows_reported: int = 0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.rows_reported = self.job.first_row

    def update(self, body: torch.Tensor, done_min: int) -> None:
        """Check cancel and report for every row completed by all images (done_min: finalized body tokens of the slowest)."""
        rows_done = min(self.job.rows, done_min // (self.job.cols + 1))
        while self.rows_reported < rows_done:
            self.rows_reported += 1
            self._emit(body, min(done_min, self.job.body_len))

    def finish(self, body: torch.Tensor) -> None:
        """Final report: every token done."""
        self._emit(body, self.job.body_len)

    def _emit(self, body: torch.Tensor, done: int) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise GenerationCancelled("generation cancelled by the caller")
        if self.progress is not None:
            partial = codes_from_body(body, self.job, self.rows_reported).cpu()
            self.progress(done - self.job.first_body, self.job.generated_tokens, partial)
