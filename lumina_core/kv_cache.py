"""The static KV cache: preallocated for the whole request, one write pointer per row, rollback for
SJD, keys and values stored in the activation dtype or in fp8 (e4m3, per-position value scales),
and the attention over it (a fused fp8 form for compiled steps)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import InputError

logger = logging.getLogger(__name__)


KV_CACHE_MODES = ("auto", "bf16", "fp8")
# e4m3 (3 mantissa bits) over e5m2: keys and values need precision more than range, and the
# per-position scales below give the range. None on a torch without float8 dtypes.
FP8_KV_DTYPE: torch.dtype | None = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite e4m3fn value
KV_SCALE_DTYPE = torch.float32
# Which fp8 tensors carry a scale per (row, head, position), by measurement (bench/kv_fidelity.py,
# README "fp8 KV cache"): a power-of-two scale changes no rounding inside e4m3's normal range, it
# only keeps small vectors out of the subnormals. Values have no norm in front of them (a model whose
# values are 64x smaller loses 50 % more logit accuracy without scales); keys come out of the
# LayerNorm at the scale of its affine weights, ~1 in trained models.
FP8_SCALED_KEYS = False
FP8_SCALED_VALUES = True


def kv_storage_dtype(kv_cache: str, activation_dtype: torch.dtype, planned: str | None = None) -> torch.dtype:
    """The KV cache's storage dtype for a `kv_cache` setting ("bf16", "fp8", or "auto").

    "auto" is the activation dtype, unless a memory plan chose a mode (`planned`, "bf16" or "fp8");
    an "auto" that would be fp8 on a torch without float8 dtypes falls back to the activation dtype.
    """
    if kv_cache not in KV_CACHE_MODES:
        raise InputError(f"unknown kv_cache {kv_cache!r}; allowed: {', '.join(KV_CACHE_MODES)}")
    if planned is not None and planned not in ("bf16", "fp8"):
        raise ValueError(f"a memory plan's kv_cache must be 'bf16' or 'fp8', got {planned!r}")
    mode = (planned or "auto") if kv_cache == "auto" else kv_cache
    if mode == "auto":
        return activation_dtype
    if mode == "bf16":
        return torch.bfloat16
    if FP8_KV_DTYPE is None:
        if kv_cache == "auto":
            logger.warning("torch %s has no float8 dtypes: the KV cache stays in %s", torch.__version__, activation_dtype)
            return activation_dtype
        raise InputError(f"kv_cache='fp8' needs a torch with float8 dtypes (2.1 or newer), this is torch "
                         f"{torch.__version__}; use kv_cache='bf16' or 'auto'")
    return FP8_KV_DTYPE


def is_fp8(dtype: torch.dtype) -> bool:
    """True for the float8 storage dtypes."""
    return dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))


def quantize_fp8(x: torch.Tensor, scaled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., D] -> (e4m3 values, float32 scale [...] or None); x ~= values * scale.

    The scale of each vector is the power of two that brings its largest entry into (224, 448]:
    the whole e4m3 range for every position, and an exact dequantisation in bfloat16 and float32.
    """
    if not scaled:
        return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE), None
    amax = x.abs().amax(-1).float().clamp_min(2.0 ** -100)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    values = (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)
    return values, scale.to(KV_SCALE_DTYPE)


def dequantize(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Stored values [..., D] (and their scale [...]) back in `dtype`."""
    out = values.to(dtype)
    return out if scale is None else out * scale.to(dtype)[..., None]


class KVCache:
    """Static key/value cache: preallocated for the whole request, one write pointer per row.

    `lengths[b]` is how many positions of row b are filled. A forward pass of n new tokens writes
    them at lengths[b] .. lengths[b]+n-1 and advances the pointer; `rollback` moves it back (SJD
    rejects the tail of a window that way: nothing is copied). `key_valid` marks left padding so
    rows of different prompt lengths share one batch.

    `dtype` is the activation dtype (the attention math); `storage` the dtype the keys and values
    are kept in (default: the activation dtype). fp8 storage quantizes each written position on
    its own (a float32 scale per row, head and position), so rollback, left padding and CUDA
    graphs work as for any dtype.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 storage: torch.dtype | None = None, scaled_keys: bool = FP8_SCALED_KEYS,
                 scaled_values: bool = FP8_SCALED_VALUES) -> None:
        self.dtype = dtype
        self.storage = storage or dtype
        self.fp8 = is_fp8(self.storage)
        if self.fp8 and self.storage != FP8_KV_DTYPE:
            raise ValueError(f"fp8 KV storage is {FP8_KV_DTYPE}, got {self.storage}")
        layers = config.num_hidden_layers
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=self.storage, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=self.storage, device=device) for _ in range(layers)]

        def scales(wanted: bool) -> list[torch.Tensor] | None:
            if not (self.fp8 and wanted):
                return None
            return [torch.ones(shape[:-1], dtype=KV_SCALE_DTYPE, device=device) for _ in range(layers)]

        self.k_scale, self.v_scale = scales(scaled_keys), scales(scaled_values)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    @staticmethod
    def nbytes_for(config: ModelConfig, batch_size: int, max_len: int, storage: torch.dtype,
                   scaled_keys: bool = FP8_SCALED_KEYS, scaled_values: bool = FP8_SCALED_VALUES) -> int:
        """Bytes a cache of this size allocates with this storage dtype (what `nbytes` reports)."""
        positions = batch_size * config.num_key_value_heads * max_len
        per_layer = 2 * positions * config.head_dim * torch.empty((), dtype=storage).element_size()
        if is_fp8(storage):
            per_layer += (int(scaled_keys) + int(scaled_values)) * positions * torch.empty((), dtype=KV_SCALE_DTYPE).element_size()
        pointers = batch_size * max_len * torch.empty((), dtype=torch.bool).element_size() + batch_size * 8
        return config.num_hidden_layers * per_layer + pointers

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (keys, values, their scales, validity and pointers)."""
        return self.k + self.v + (self.k_scale or []) + (self.v_scale or []) + [self.key_valid, self.lengths]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def write(self, layer: int, write_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values [B, kv_heads, n, D] of layer `layer` at positions write_pos [B, n]."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        for store, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if self.fp8:
                x, scale = quantize_fp8(x, scaled=scales is not None)
                if scale is not None:
                    scales[layer][rows, :, write_pos] = scale.transpose(1, 2)
            # Advanced indices around a slice put the indexed dims first: [B, n, heads, D].
            store[layer][rows, :, write_pos] = x.transpose(1, 2).to(self.storage)

    def read(self, layer: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, kv_len, D] of layer `layer` in the activation dtype."""
        k, v = self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]
        if self.storage == self.dtype:
            return k, v
        return (dequantize(k, self._scale(self.k_scale, layer, kv_len), self.dtype),
                dequantize(v, self._scale(self.v_scale, layer, kv_len), self.dtype))

    @staticmethod
    def _scale(scales: list[torch.Tensor] | None, layer: int, kv_len: int) -> torch.Tensor | None:
        return None if scales is None else scales[layer][:, :, :kv_len]

    def attend(self, layer: int, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of queries q [B, heads, n, D] over the first mask.shape[-1] cached positions of `layer`.

        Eager: the cache is read (fp8 dequantized) and handed to SDPA. Under torch.compile an fp8
        cache goes through `fused_fp8_attention`, where the dequantisation is part of the attention
        kernels, so the fp8 bytes are read once and no dequantized copy is written.
        """
        kv_len = mask.shape[-1]
        if self.fp8 and torch.compiler.is_compiling():
            return fused_fp8_attention(q, self.k[layer][:, :, :kv_len], self._scale(self.k_scale, layer, kv_len),
                                       self.v[layer][:, :, :kv_len], self._scale(self.v_scale, layer, kv_len), mask)
        k, v = self.read(layer, kv_len)
        if q.device.type == "cpu" and q.shape[2] == 1 and q.dtype in (torch.bfloat16, torch.float16):
            # CPU SDPA has no fast reduced-precision path for one query: in float32 a decode step's
            # attention takes a quarter of the time (0.13 vs 0.48 ms at 560 keys) and rounds less.
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(),
                                                 enable_gqa=k.shape[1] != q.shape[1])
            return out.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])

    def rollback(self, counts: torch.Tensor | int) -> None:
        """Forget the last `counts` positions of each row (a tensor [B] or one int for all rows)."""
        self.lengths.sub_(counts)  # in place: a captured CUDA graph keeps reading this very tensor

    def release(self) -> None:
        """Drop the tensors so their memory can be reused (after cancel or at the end of a request)."""
        self.k, self.v = [], []
        self.k_scale = [] if self.k_scale is not None else None
        self.v_scale = [] if self.v_scale is not None else None
        self.key_valid = self.key_valid[:, :0]
        self.max_len = 0


def fused_fp8_attention(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None, v: torch.Tensor,
                        v_scale: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q [B, H, n, D] over fp8 keys/values [B, KV, L, D] with per-position scales [B, KV, L].

    Written as products and sums (not matmuls) so that torch.compile makes each of the two
    contractions one kernel that reads the fp8 cache directly, converting in registers: a matmul
    would first write a dequantized copy of the cache. The per-position scales factor out of both
    contractions (q.(s k) = s (q.k); sum p s v = sum (p s) v), so they scale the scores and the
    probabilities instead of the cache. Math in float32; mask [B, 1, n, L] additive. Eagerly this
    form would materialise [B, H, n, L, D] products: `KVCache.attend` uses it only when compiling.
    """
    b, h, n, d = q.shape
    kv, length = k.shape[1], k.shape[2]
    groups = h // kv
    qf = q.float().reshape(b, kv, groups, n, 1, d)
    scores = (qf * k.float()[:, :, None, None]).sum(-1) * d ** -0.5           # [B, KV, G, n, L]
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, None, :]
    scores = scores + mask.float().reshape(b, 1, 1, n, length)
    probs = torch.softmax(scores, dim=-1)
    if v_scale is not None:
        probs = probs * v_scale[:, :, None, None, :]
    out = (probs[..., None] * v.float()[:, :, None, None]).sum(-2)             # [B, KV, G, n, D]
    return out.reshape(b, h, n, d).to(q.dtype)
