"""LuminaPipeline: transformer + MoVQGAN + tokenizer + token layout; request -> codes -> pixels."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .defaults import ModelDefaults
from .model import LuminaTransformer
from .request import Request, RequestError
from .sampling import SamplingConfig
from .sampling.ar import decode_ar
from .sampling.state import DecodeJob
from .sampling.sjd import decode_sjd
from .threads import cpu_threads, threads_for
from .tokens import LATENT_PER_GRID, TokenLayout, dual_panel_prefix_ids, load_tokens, prompt_ids
from .weights import load_transformer


@dataclass
class GeneratedCodes:
    """Generated code grids [B, rows, cols] (full image, reference rows included) with their request and seeds."""

    codes: torch.Tensor
    request: Request
    seeds: list[int]
    stats: dict = field(default_factory=dict)


def _merged_stats(parts: list[dict]) -> dict:
    """Stats of sub-batches as one run: counts and seconds summed, the rest from the first sub-batch."""
    merged = dict(parts[0])
    for key, value in parts[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ("forward_passes", "seconds", "tokens"):
            merged[key] = sum(p.get(key, 0) for p in parts)
    merged["sub_batches"] = len(parts)
    return merged


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def find_movqgan(folder: Path, auto_download: bool = False) -> Path:
    """`movqgan*.ckpt` inside the model folder, else the hub's resolver (search paths / download)."""
    local = sorted(folder.glob("movqgan*.ckpt"))
    if local:
        return local[0]
    from .hub import resolve_movqgan
    return Path(resolve_movqgan(search_dirs=[folder, folder.parent], auto_download=auto_download))


def decode_token_ids(layout: TokenLayout) -> list[int]:
    """Tokens a decode step may feed besides image codes: the forced new line and end, and every token
    a prefix can end with (SJD feeds it again): the size tokens, the image start."""
    return [layout.new_line, layout.image_end, layout.image_start, *layout.size_token_ids.values()]


class LuminaPipeline:
    """Everything needed to turn a Request into images; `generate` samples codes, `decode` makes pixels."""

    def __init__(self, transformer: LuminaTransformer, movqgan, tokenizer, layout: TokenLayout,
                 max_positions: Optional[int] = None, step_fn: Optional[Callable] = None, quant: Optional[str] = None,
                 defaults: Optional[ModelDefaults] = None) -> None:
        self.transformer = transformer
        self.movqgan = movqgan
        self.tokenizer = tokenizer
        self.layout = layout
        self.config = transformer.config
        self.max_positions = max_positions or self.config.max_position_embeddings
        self.step_fn = step_fn
        self.quant = quant
        # Decoding reads only the image-code rows of lm_head and the embedding rows it feeds; the
        # full tables stay on the host, where the prompt is embedded.
        transformer.use_decode_vocabulary(decode_token_ids(layout), layout.image_code_offset, layout.num_image_codes)
        self.defaults = defaults or ModelDefaults.official()  # the model's own sizes and sampling settings
        self.loras: list = []  # [(lora.LoraAdapter, strength)], applied beside the linears (lumina_core/lora.py)
        self.decode_images_per_batch: Optional[int] = None  # set by a memory plan
        self.decode_dtype = "fp32"  # "bf16" when a memory plan found no room for a float32 decode (CUDA)

    @property
    def device(self) -> torch.device:
        """Device of the transformer's layers."""
        return self.transformer.device

    @property
    def threads(self) -> int:
        """CPU threads for this model's sampling and decoding (one for tiny models; see threads.py)."""
        return threads_for(sum(p.numel() for p in self.transformer.parameters()), self.device)

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype of the transformer."""
        return self.transformer.dtype

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: Optional[torch.dtype] = None,
                        device: Optional[torch.device | str] = None, quant: Optional[str] = None,
                        compile: bool = False, auto_download: bool = False,
                        movqgan_path: Optional[str | Path] = None, search_dirs: tuple = (),
                        cuda_graphs: bool = True) -> "LuminaPipeline":
        """Load an official-format folder or repo id (bf16 on CUDA, float32 on CPU unless `dtype` says otherwise).

        On CUDA the decode step is replayed from CUDA graphs (`cuda_graphs`; same kernels, one launch
        per step); `compile` also fuses it with torch.compile.
        """
        from .hub import resolve_model
        from .movqgan import load_movqgan
        from .quant import check_quant
        from .sampling.step import CUDAGraphStep, compile_step

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        check_quant(quant, device, dtype)
        folder = Path(resolve_model(name_or_path, search_dirs=search_dirs, auto_download=auto_download))
        # The small parts first: a tokenizer or MoVQGAN of another model is refused before the big load.
        ckpt = Path(movqgan_path) if movqgan_path else find_movqgan(folder, auto_download)
        movqgan = load_movqgan(ckpt, device=device)
        tokenizer, layout = load_tokens(folder, movqgan.config.n_embed, movqgan_source=str(ckpt))
        # Quantized layer by layer as the weights stream in: the unquantized model never exists whole.
        transformer = load_transformer(folder, dtype=dtype, device=device, quant=quant)
        step_fn = compile_step(transformer) if compile else None
        if cuda_graphs and device.type == "cuda":
            step_fn = CUDAGraphStep(step_fn or transformer.decode_step)
        return cls(transformer, movqgan, tokenizer, layout, step_fn=step_fn, quant=quant,
                   defaults=ModelDefaults.from_folder(folder))

    def to(self, device: torch.device | str) -> "LuminaPipeline":
        """Move transformer and MoVQGAN to `device` (the full vocabulary tables stay on the host)."""
        self.transformer.to(device)
        self.transformer.offload_full_vocabulary()
        if self.movqgan is not None:
            self.movqgan.to(device)
        return self

    # --- LoRA adapters ---------------------------------------------------------------------
    def load_lora(self, path: str | Path, strength: float = 1.0) -> "LuminaPipeline":
        """Add a peft-format LoRA (adapter folder or its .safetensors) at `strength`; adapters stack; returns self."""
        from .lora import check_adapter, check_strength, load_adapter

        adapter = load_adapter(path)
        check_adapter(adapter, self.transformer)
        self.loras = [*self.loras, (adapter, check_strength(strength))]
        self.apply_loras()
        return self

    def with_lora(self, adapter, strength: float) -> "LuminaPipeline":
        """A new pipeline over the same weights whose stack adds `adapter` (a lora.LoraAdapter); self is unchanged."""
        import copy

        from .lora import check_adapter, check_strength

        check_adapter(adapter, self.transformer)
        clone = copy.copy(self)
        clone.loras = [*self.loras, (adapter, check_strength(strength))]
        return clone

    def unload_loras(self) -> None:
        """Remove every adapter: the base linears are back."""
        self.loras = []
        self.apply_loras()

    def apply_loras(self) -> None:
        """Make the (possibly shared) transformer carry exactly this pipeline's adapters.

        A change drops captured CUDA graphs (they read the old modules' tensors); torch.compile
        re-traces on its own (its guards see the swapped modules).
        """
        from .lora import install

        if install(self.transformer, self.loras):
            reset = getattr(self.step_fn, "reset", None)
            if reset is not None:
                reset()

    # --- request -> token job ---------------------------------------------------------------
    def prompt_tokens(self, request: Request) -> int:
        """Positions the request's prompt takes before the image (the size rules count them)."""
        return len(prompt_ids(self.tokenizer, self.layout, request.prompt_text()))

    def prepare(self, request: Request) -> DecodeJob:
        """Tokenise the prompt, encode the reference (I2I) and check the size against the cache budget."""
        layout = self.layout
        prompt = prompt_ids(self.tokenizer, layout, request.prompt_text())
        request.validate(max_positions=self.max_positions, prompt_tokens=len(prompt))
        rows, cols = request.latent_size
        h_grids, w_grids = rows // LATENT_PER_GRID, cols // LATENT_PER_GRID
        if max(h_grids, w_grids) > layout.max_grids:
            raise RequestError(f"{request.width}x{request.height} needs size tokens for {max(h_grids, w_grids)} grids; "
                               f"this tokenizer has them up to {layout.max_grids} grids ({layout.max_grids * 32} px)")
        reference_codes, first_row = None, 0
        if request.needs_reference:
            pixels = request.reference_pixels()
            expected = (1, 3, request.height // 2, request.width)
            if tuple(pixels.shape) != expected:
                raise RequestError(f"reference for task {request.task!r} must be {request.width}x{request.height // 2} "
                                   f"(the upper panel) after cropping; got {tuple(pixels.shape[-1:-3:-1])}")
            if self.movqgan is None:
                raise RuntimeError("this pipeline has no MoVQGAN, so it cannot encode the reference image")
            reference_codes = self.movqgan.encode(pixels.to(self.device))[0].cpu()
            header = dual_panel_prefix_ids(layout, reference_codes)
            first_row = reference_codes.shape[0]
        else:
            header = [layout.image_start, layout.size_token(h_grids), layout.size_token(w_grids)]
        # The requested size is WRITTEN into the prefix (the official code samples start/H/W), so the
        # output always has the size the user asked for.
        return DecodeJob(cond_prefix=tuple(prompt + header), uncond_prefix=tuple(header), rows=rows, cols=cols,
                          new_line=layout.new_line, image_end=layout.image_end, code_offset=layout.image_code_offset,
                          num_codes=layout.num_image_codes, first_row=first_row, reference_codes=reference_codes)

    def generate(self, request: Request, sampling: Optional[SamplingConfig] = None,
                 progress: Optional[Callable[[int, int, torch.Tensor], None]] = None,
                 should_cancel: Optional[Callable[[], bool]] = None, plan=None) -> GeneratedCodes:
        """Sample `sampling.num_images` code grids for `request` (image i uses seed + i).

        With a memory `plan` (`plan_memory`), its KV storage is used and the images run
        `plan.images_per_batch` at a time: every image keeps its own seed and random stream, so the
        codes do not depend on the split.
        """
        from .memory import sub_batches, trim_host_heap

        sampling = sampling or SamplingConfig()
        self.apply_loras()
        job = self.prepare(request)
        per_batch = sampling.num_images
        if plan is not None:
            per_batch = plan.images_per_batch
            sampling = dataclasses.replace(sampling, kv_cache=plan.kv_cache)
            self.decode_images_per_batch = per_batch
            self.decode_dtype = plan.decode_dtype
        decoder = decode_sjd if sampling.sjd else decode_ar
        grids, parts = [], []
        # Sampling never reads the MoVQGAN: off the compute device meanwhile, its memory is the KV
        # cache's (previews decode where it is; `decode` brings it back).
        with self._movqgan_on("cpu"), cpu_threads(self.threads):
            for start, count in sub_batches(sampling.num_images, per_batch):
                part = dataclasses.replace(sampling, seed=sampling.seed + start, num_images=count)
                codes, stats = decoder(self.transformer, job, part, part.seeds, progress, should_cancel,
                                       step_fn=self.step_fn)
                grids.append(codes.cpu())
                parts.append(stats)
        if self.device.type == "cpu":
            trim_host_heap()  # the released KV cache, before the decode allocates its maps
        stats = parts[0] if len(parts) == 1 else _merged_stats(parts)
        stats["prompt_tokens"] = job.prompt_tokens
        return GeneratedCodes(codes=torch.cat(grids), request=request, seeds=sampling.seeds, stats=stats)

    def plan_memory(self, request: Request, sampling: SamplingConfig, free_bytes: int):
        """The memory plan of `generate` within `free_bytes` (lumina_core.memory.plan), or MemoryPlanError."""
        from .memory import plan_for_pipeline

        return plan_for_pipeline(self, request, sampling, free_bytes)

    @contextlib.contextmanager
    def _movqgan_on(self, device: torch.device | str):
        """Keep the MoVQGAN on `device` inside the block when the compute device is another one (not on CPU)."""
        if self.movqgan is None or self.device.type == "cpu":
            yield
            return
        home = self.movqgan.codebook.device
        self.movqgan.to(device)
        try:
            yield
        finally:
            self.movqgan.to(home)

    @torch.no_grad()
    def decode(self, codes: GeneratedCodes | torch.Tensor) -> torch.Tensor:
        """Codes [B, rows, cols] (or GeneratedCodes) -> float images [B, 3, H, W] clamped to [-1, 1]."""
        grid = codes.codes if isinstance(codes, GeneratedCodes) else codes
        if self.movqgan is None:
            raise RuntimeError("this pipeline has no MoVQGAN to decode with")
        device = self.movqgan.codebook.device
        # A memory plan sized the decode for this many images at a time (a 768x768 decode holds ~6 GiB).
        chunk = self.decode_images_per_batch or grid.shape[0]
        with cpu_threads(self.threads), self._decoder() as movqgan:
            return torch.cat([movqgan.decode(grid[i:i + chunk].to(device)).clamp(-1, 1)
                              for i in range(0, grid.shape[0], chunk)])

    @contextlib.contextmanager
    def _decoder(self):
        """The MoVQGAN in `decode_dtype`: itself in float32; for bf16 a copy made on the host, so the device
        holds only the bf16 weights (half the bytes, as memory.estimate counts) and the float32 ones stay exact."""
        from .memory import DECODE_DTYPES

        dtype = DECODE_DTYPES[self.decode_dtype]
        if dtype == self.movqgan.codebook.dtype:
            yield self.movqgan
            return
        home = self.movqgan.codebook.device
        self.movqgan.to("cpu")
        try:
            yield copy.deepcopy(self.movqgan).to(dtype=dtype).to(home)
        finally:
            self.movqgan.to(home)
