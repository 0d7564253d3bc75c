"""The memory plan: bytes of weights, KV cache, activations and the MoVQGAN decode, before any run.

Every figure is counted from shapes, the way the code allocates them: weights by dtype and
quantization layout (torchao's tensors as they are laid out per device), the KV cache through
`KVCache.nbytes_for`, the cache length through the sampler's own `cache_length`, sizes through
the request. `plan(free_bytes, ...)` picks the settings that fit (KV storage, images per
sub-batch) or refuses with a message naming the need, the free memory and the options that fit.

Phases of one generation and what is resident in each (the peak is the larger):
  sampling: transformer weights + MoVQGAN weights + KV cache + the largest step's activations
  decode:   transformer weights + MoVQGAN weights + one image's decode activations
The KV cache is released before the MoVQGAN decode, so the two never add up.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .config import ModelConfig
from .errors import InputError
from .kv_cache import KVCache
from .request import Request
from .sampling import SamplingConfig

GIB = 2**30
KV_CHOICES = ("bf16", "fp8")
# Prompt length the planner assumes when it has no tokenizer (a long prompt of the official template).
DEFAULT_PROMPT_TOKENS = 256
INT4_GROUP_SIZE = 128
# Image codes the MoVQGAN of Lumina-mGPT 2.0 has (16,384); the decode vocabulary keeps these rows.
DEFAULT_IMAGE_CODES = 16384
# Tokens besides image codes a decode step may feed (new line, end, image start, size tokens).
DECODE_EXTRA_TOKENS = 3 + 64


class MemoryPlanError(InputError):
    """No setting fits the free memory; the message names the need, the free memory and what would fit."""


def _element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def trim_host_heap() -> None:
    """Give freed heap memory back to the OS (glibc only; elsewhere nothing to do).

    Why: glibc serves large buffers from its heap once the first ones are freed (its mmap threshold
    adapts upwards) and keeps freed ones there: without this, an int8 CPU load held about twice the
    int8 model (the freed bf16 layers), and a decode after sampling sat on the freed KV cache.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # another C library (musl) has no malloc_trim
        pass


# ---------------------------------------------------------------------------------------------
# Weights

def linear_bytes(out_features: int, in_features: int, dtype: torch.dtype, quant: Optional[str], device: str) -> int:
    """Bytes of one nn.Linear weight as torchao lays it out for `device` (no bias: the release has none)."""
    if quant is None:
        return out_features * in_features * _element(dtype)
    if quant == "int8":
        # Int8Tensor: int8 data, a float32 scale and an int8 zero point per output channel.
        return out_features * in_features + out_features * (4 + 1)
    if quant == "int4":
        groups = in_features // INT4_GROUP_SIZE
        if device == "cuda":
            # Int4TilePackedTo4dTensor: padded to in % 1024 and out % 8, two codes per byte, and a
            # bf16 (scale, zero) pair per group and output channel.
            out_p, in_p = -(-out_features // 8) * 8, -(-in_features // 1024) * 1024
            return out_p * in_p // 2 + (in_p // INT4_GROUP_SIZE) * out_p * 2 * 2
        # IntxUnpackedToInt8Tensor (CPU): one int8 per code, a scale (weight dtype) and an int8 zero per group.
        return out_features * in_features + out_features * groups * (_element(dtype) + 1)
    if quant == "fp8":
        # fp8 weights with a float32 scale per output channel (counted from the layout, not yet measured).
        return out_features * in_features + out_features * 4
    raise InputError(f"unknown quant {quant!r}; allowed: none, int8, int4, fp8")


def layer_bytes(config: ModelConfig, dtype: torch.dtype, quant: Optional[str], device: str) -> int:
    """Bytes of one decoder layer: seven linears (maybe quantized), two RMSNorms, the q/k LayerNorm affines."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q_out, kv_out = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = [(q_out, h), (kv_out, h), (kv_out, h), (h, q_out), (i, h), (i, h), (h, i)]
    linears = sum(linear_bytes(o, n, dtype, quant, device) for o, n in shapes)
    norms = (2 * h + 4 * config.model_parallel_size * d) * _element(dtype)
    return linears + norms


def decode_vocabulary_rows(num_image_codes: int) -> int:
    """Embedding rows a decode step can meet: the image codes and the few tokens the grammar forces."""
    return num_image_codes + DECODE_EXTRA_TOKENS


def transformer_bytes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16, quant: Optional[str] = None,
                      device: str = "cuda", num_image_codes: int = DEFAULT_IMAGE_CODES,
                      vocabulary_rows: Optional[int] = None) -> int:
    """Bytes the transformer holds on `device` once a pipeline has it (`weights.load_transformer` +
    `use_decode_vocabulary`): layers, final norm and the decode vocabulary (its embedding rows with their
    ids, the image-code rows of lm_head). The full embedding table and lm_head live on the host, so on
    a CPU device they count too (and the head rows are a view of lm_head there, not a copy).
    """
    from .model import DecodeVocabulary

    e = _element(dtype)
    rows = vocabulary_rows if vocabulary_rows is not None else decode_vocabulary_rows(num_image_codes)
    vocab = DecodeVocabulary.nbytes_for(config.hidden_size, rows, num_image_codes, dtype)
    if device == "cpu":
        vocab += 2 * config.vocab_size * config.hidden_size * e - num_image_codes * config.hidden_size * e
    return config.num_hidden_layers * layer_bytes(config, dtype, quant, device) + config.hidden_size * e + vocab


# ---------------------------------------------------------------------------------------------
# KV cache, activations, decode

def planning_job(request: Request, prompt_tokens: int):
    """A DecodeJob with the request's shape and a prompt of `prompt_tokens` (ids are placeholders)."""
    from .sampling.state import DecodeJob

    rows, cols = request.latent_size
    first_row = rows // 2 if request.needs_reference else 0
    header = (0,) * (3 + first_row * (cols + 1))
    return DecodeJob(cond_prefix=(0,) * prompt_tokens + header, uncond_prefix=header, rows=rows, cols=cols,
                     new_line=0, image_end=0, code_offset=0, num_codes=1, first_row=first_row)


def window_of(sampling: SamplingConfig) -> int:
    """Tokens one decode step feeds: the SJD window, or 1 for plain AR."""
    return sampling.sjd_window if sampling.sjd else 1


def kv_storage(kv_cache: str, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype for a `kv_cache` setting, as the sampler resolves it."""
    from .kv_cache import kv_storage_dtype

    return kv_storage_dtype(kv_cache, dtype)


def step_activation_bytes(config: ModelConfig, dtype: torch.dtype, batch_rows: int, tokens: int, kv_len: int,
                          num_codes: int, dequantized_kv: bool) -> int:
    """Largest live activations of one forward of `tokens` tokens per row over `kv_len` keys (one layer at a time).

    The residual stream and a layer's temporaries (norm, q/k/v with their rotated copies, the MLP's
    gate/up/product), the additive mask and its boolean source, the dequantized keys and values of
    one layer when the cache is stored in another dtype, and the float32 image logits of the last
    positions with the sampler's few copies of them (guided logits, probabilities, top-k).
    """
    e = _element(dtype)
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    rn = batch_rows * tokens
    hidden = rn * h * e
    qkv = rn * (heads + 2 * kv_heads) * d * e * 2          # projections and their rotated copies
    mlp = rn * i * e * 3                                    # gate, up, silu(gate) * up
    mask = batch_rows * tokens * kv_len * (e + 1)
    kv_copy = 2 * batch_rows * kv_heads * kv_len * d * e if dequantized_kv else 0
    logits = batch_rows * min(tokens, 64) * num_codes * 4 * 4
    return 4 * hidden + max(qkv, mlp) + mask + kv_copy + logits


# The MoVQGAN decode's dtypes: float32 (as loaded: today's numerics) or a bfloat16 copy (half the bytes).
DECODE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.lru_cache(maxsize=8)
def movqgan_weight_bytes(movq_config=None, decode_dtype: str = "fp32") -> int:
    """Bytes of the MoVQGAN in `decode_dtype` (encoder and decoder): 1.0 GiB for the 270M release in float32."""
    from .movqgan import MoVQConfig, MoVQGAN

    with torch.device("meta"):
        model = MoVQGAN(movq_config or MoVQConfig())
    size = DECODE_DTYPES[decode_dtype].itemsize
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in model.parameters())


def decode_activation_bytes(width: int, height: int, movq_config=None, images: int = 1,
                            decode_dtype: str = "fp32") -> int:
    """Largest live activations of a MoVQGAN decode of `images` images of width x height in `decode_dtype`.

    Measured on CPU (bench/memory_plan.py): about 10 feature maps of the full-resolution level (ch
    channels: the upsampled input, the spatially conditioned norm's scale, shift, product and sum,
    activations and convolution outputs), plus the attention scores of the latent-resolution blocks.
    """
    from .movqgan import MoVQConfig

    cfg = movq_config or MoVQConfig()
    size = DECODE_DTYPES[decode_dtype].itemsize
    full_map = images * cfg.ch * cfg.ch_mult[0] * width * height * size
    latent = (width // cfg.downsample_factor) * (height // cfg.downsample_factor)
    return 10 * full_map + images * latent * latent * size


# ---------------------------------------------------------------------------------------------
# The estimate

@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the compute device of one generation with these settings (GiB = 2^30 in `table_row`)."""

    weights_bytes: int          # transformer (as resident while sampling) + MoVQGAN
    transformer_bytes: int
    movqgan_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    decode_bytes: int           # MoVQGAN decode activations of one sub-batch, in decode_dtype
    peak_bytes: int
    kv_cache: str
    quant: Optional[str]
    images_per_batch: int
    num_images: int
    cache_positions: int
    width: int
    height: int
    decode_dtype: str = "fp32"  # "bf16" where a float32 decode beside the transformer would not fit

    def to_dict(self) -> dict:
        """JSON-ready fields (what `memory --json` prints)."""
        return dataclasses.asdict(self)

    def table_row(self) -> str:
        """One README table row: size, quant, KV, images, weights, KV, activations, decode, peak in GiB."""
        g = lambda n: f"{n / GIB:.2f}"  # noqa: E731
        return (f"| {self.width}x{self.height} | {self.quant or 'bf16'} | {self.kv_cache} | {self.num_images} "
                f"({self.images_per_batch} at a time) | {g(self.weights_bytes)} | {g(self.kv_cache_bytes)} | "
                f"{g(self.activation_bytes)} | {g(self.decode_bytes)} ({self.decode_dtype}) | "
                f"**{g(self.peak_bytes)}** |")


def estimate(config: ModelConfig, request: Request, sampling: SamplingConfig, quant: Optional[str] = None,
             kv_cache: str = "auto", dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
             prompt_tokens: int = DEFAULT_PROMPT_TOKENS, images_per_batch: Optional[int] = None,
             num_image_codes: int = DEFAULT_IMAGE_CODES, movq_config=None, vocabulary_rows: Optional[int] = None,
             transformer_resident_bytes: Optional[int] = None, decode_dtype: str = "fp32") -> MemoryEstimate:
    """Bytes of one generation on `device` with these settings (`kv_cache` as SamplingConfig takes it).

    `decode_dtype` "bf16": the decode runs on a bfloat16 copy of the MoVQGAN (the float32 one off the device).

    `transformer_resident_bytes` replaces the count from the config (a loaded pipeline counts its own).
    """
    from .sampling.state import cache_length

    device = torch.device(device).type
    per_batch = min(images_per_batch or sampling.num_images, sampling.num_images)
    rows = per_batch * (2 if sampling.cfg != 1.0 else 1)
    job = planning_job(request, prompt_tokens)
    window = window_of(sampling)
    positions = cache_length(job, window)
    storage = kv_storage(kv_cache, dtype)
    kv_bytes = KVCache.nbytes_for(config, rows, positions, storage)
    prefix = len(job.cond_prefix)
    prefill = step_activation_bytes(config, dtype, rows, prefix, prefix, num_image_codes, storage != dtype)
    step = step_activation_bytes(config, dtype, rows, window, positions, num_image_codes, storage != dtype)
    activations = max(prefill, step)
    model_bytes = transformer_resident_bytes if transformer_resident_bytes is not None else \
        transformer_bytes(config, dtype, quant, device, num_image_codes, vocabulary_rows)
    if decode_dtype not in DECODE_DTYPES:
        raise InputError(f"unknown decode_dtype {decode_dtype!r}; allowed: {', '.join(DECODE_DTYPES)}")
    movq = movqgan_weight_bytes(movq_config)
    decode = decode_activation_bytes(request.width, request.height, movq_config, images=per_batch,
                                     decode_dtype=decode_dtype)
    # Off the host, the MoVQGAN waits on the host while sampling (LuminaPipeline.generate).
    sampling_phase = model_bytes + kv_bytes + activations + (movq if device == "cpu" else 0)
    decode_phase = model_bytes + movqgan_weight_bytes(movq_config, decode_dtype) + decode
    return MemoryEstimate(weights_bytes=model_bytes + movq, transformer_bytes=model_bytes, movqgan_bytes=movq,
                          kv_cache_bytes=kv_bytes, activation_bytes=activations, decode_bytes=decode,
                          peak_bytes=max(sampling_phase, decode_phase), kv_cache=kv_cache, quant=quant,
                          images_per_batch=per_batch, num_images=sampling.num_images, cache_positions=positions,
                          width=request.width, height=request.height, decode_dtype=decode_dtype)


# ---------------------------------------------------------------------------------------------
# The plan

def _kv_options(kv_cache: str) -> tuple[str, ...]:
    """KV settings a plan may pick: "auto" tries the activation dtype, then fp8 (where torch has it)."""
    from .kv_cache import FP8_KV_DTYPE, KV_CACHE_MODES

    if kv_cache not in KV_CACHE_MODES:
        raise InputError(f"unknown kv_cache {kv_cache!r}; allowed: {', '.join(KV_CACHE_MODES)}")
    if kv_cache == "auto":
        return ("auto", "fp8") if FP8_KV_DTYPE is not None else ("auto",)
    return (kv_cache,)


def _decode_options(device: str) -> tuple[str, ...]:
    """Decode dtypes a plan may pick: float32 first (today's numerics); bf16 only on CUDA, where it halves the decode."""
    return ("fp32", "bf16") if torch.device(device).type == "cuda" else ("fp32",)


def _settings(num_images: int, kv_cache: str, decodes: tuple[str, ...]):
    """(images per sub-batch, kv_cache, decode dtype) in the order a plan prefers them: the most images at a
    time, then the KV options of `kv_cache` (unquantized first), then the decode dtypes (float32 first)."""
    for per_batch in range(num_images, 0, -1):
        for kv in _kv_options(kv_cache):
            for dec in decodes:
                yield per_batch, kv, dec


def _first_fit(estimates, free_bytes: int) -> tuple[Optional[MemoryEstimate], MemoryEstimate]:
    """The first of `estimates` within `free_bytes` (None when none is) and the first made (a refusal quotes it)."""
    first = None
    for guess in estimates:
        first = first or guess
        if guess.peak_bytes <= free_bytes:
            return guess, first
    return None, first


def plan(free_bytes: int, config: ModelConfig, request: Request, sampling: SamplingConfig,
         quant: Optional[str] = None, kv_cache: str = "auto", **kwargs) -> MemoryEstimate:
    """The settings that fit `free_bytes`: the most images per sub-batch, unquantized KV before fp8 at equal count,
    a float32 decode before a bf16 one (CUDA only; `decode_dtype=` fixes it).

    Raises MemoryPlanError naming the need, the free memory and the options that would fit (fp8 KV,
    fewer images at a time, another quantization), or the smallest run that fits at all.
    """
    decodes = (kwargs.pop("decode_dtype"),) if "decode_dtype" in kwargs else _decode_options(kwargs.get("device", "cuda"))
    fit, first = _first_fit((estimate(config, request, sampling, quant=quant, kv_cache=kv, images_per_batch=per_batch,
                                      decode_dtype=dec, **kwargs)
                             for per_batch, kv, dec in _settings(sampling.num_images, kv_cache, decodes)), free_bytes)
    if fit is None:
        raise MemoryPlanError(_refusal(free_bytes, config, request, sampling, quant, kv_cache, first, kwargs))
    return fit


def choose_quant(free_bytes: Optional[int], config: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                 device: str = "cuda") -> Optional[str]:
    """The least quantization (none, int8, int4) whose 768x768 image with CFG fits `free_bytes` (None: no limit).

    When nothing fits it is int4, the smallest; the sampler's plan then names what would fit.
    """
    if free_bytes is None:
        return None
    for quant in (None, "int8", "int4"):
        try:
            plan(free_bytes, config, Request(width=768, height=768), SamplingConfig(), quant=quant, dtype=dtype,
                 device=device)
            return quant
        except MemoryPlanError:
            continue
    return "int4"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _refusal(free_bytes: int, config: ModelConfig, request: Request, sampling: SamplingConfig,
             quant: Optional[str], kv_cache: str, asked: MemoryEstimate, kwargs: dict) -> str:
    """'768x768 x4 ... needs 21.3 GiB, 11.6 GiB free; fits: ...' or the smallest run that would fit."""
    head = (f"{request.width}x{request.height} x{sampling.num_images} with quantization {quant or 'none'} and "
            f"kv_cache {kv_cache} needs {_gib(asked.peak_bytes)}, {_gib(free_bytes)} free")
    options = []
    decodes = _decode_options(kwargs.get("device", "cuda"))
    for other in (quant, *[q for q in (None, "int8", "int4") if q != quant]):
        fit, _ = _first_fit((estimate(config, request, sampling, quant=other, kv_cache=kv, images_per_batch=per_batch,
                                      decode_dtype=dec, **kwargs)
                             for per_batch, kv, dec in _settings(sampling.num_images, "auto", decodes)), free_bytes)
        if fit is not None:
            per_batch = fit.images_per_batch
            at_a_time = f", {per_batch} image(s) at a time" if per_batch < sampling.num_images else ""
            options.append(f"quantization {other or 'none'}, kv_cache {fit.kv_cache}{at_a_time} "
                           f"({_gib(fit.peak_bytes)})")
    if options:
        return f"{head}; fits: " + "; or ".join(options)
    one = dataclasses.replace(sampling, num_images=1)
    smallest = min((estimate(config, Request(width=side, height=side), one, quant=q, kv_cache=kv, decode_dtype=dec,
                             **kwargs)
                    for side in (256, 512) for q in (None, "int8", "int4") for kv in _kv_options("auto")
                    for dec in decodes),
                   key=lambda e: e.peak_bytes)
    return (f"{head}; nothing fits: the smallest run of this model ({smallest.width}x{smallest.height}, 1 image, "
            f"quantization {smallest.quant or 'none'}, kv_cache {smallest.kv_cache}) needs "
            f"{_gib(smallest.peak_bytes)}")


def plan_for_pipeline(pipe, request: Request, sampling: SamplingConfig, free_bytes: int) -> MemoryEstimate:
    """`plan` for a loaded pipeline (its quantization is fixed; KV storage and images at a time are chosen)."""
    settings = _settings(sampling.num_images, sampling.kv_cache, _decode_options(pipe.device.type))
    fit, first = _first_fit((estimate_for_pipeline(pipe, request, sampling, kv_cache=kv, images_per_batch=per_batch,
                                                   decode_dtype=dec) for per_batch, kv, dec in settings), free_bytes)
    if fit is not None:
        return fit
    kwargs = {"dtype": pipe.dtype, "device": pipe.device.type, "num_image_codes": pipe.layout.num_image_codes,
              "movq_config": pipe.movqgan.config if pipe.movqgan is not None else None}
    raise MemoryPlanError(_refusal(free_bytes, pipe.config, request, sampling, pipe.quant, sampling.kv_cache, first,
                                   kwargs))


def resident_bytes(module: torch.nn.Module, device: torch.device | str) -> int:
    """Bytes of the distinct tensor storages a module holds on `device` (parameters, buffers, torchao's inner data)."""
    device = torch.device(device)
    seen: dict[int, int] = {}

    def visit(t: torch.Tensor) -> None:
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                visit(getattr(t, name))
            return
        if t.device.type == device.type:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())

    for t in [*module.parameters(), *module.buffers()]:
        visit(t.data if isinstance(t, torch.nn.Parameter) else t)
    return sum(seen.values())


def estimate_for_pipeline(pipe, request: Request, sampling: SamplingConfig, kv_cache: str = "auto",
                          images_per_batch: Optional[int] = None, decode_dtype: str = "fp32") -> MemoryEstimate:
    """`estimate` for a loaded pipeline: its config, device, dtype, quantization, prompt length, MoVQGAN and
    the bytes its transformer really holds on the device."""
    from .tokens import prompt_ids

    prompt = len(prompt_ids(pipe.tokenizer, pipe.layout, request.prompt_text()))
    movq = pipe.movqgan.config if pipe.movqgan is not None else None
    return estimate(pipe.config, request, sampling, quant=pipe.quant, kv_cache=kv_cache, dtype=pipe.dtype,
                    device=pipe.device.type, prompt_tokens=prompt, images_per_batch=images_per_batch,
                    num_image_codes=pipe.layout.num_image_codes, movq_config=movq,
                    transformer_resident_bytes=resident_bytes(pipe.transformer, pipe.device),
                    decode_dtype=decode_dtype)


def sub_batches(num_images: int, per_batch: int) -> list[tuple[int, int]]:
    """(first image, count) of each sub-batch; image i keeps seed + i whatever the split."""
    return [(start, min(per_batch, num_images - start)) for start in range(0, num_images, per_batch)]
