"""Sampling settings and the two decoders (plain AR and speculative Jacobi) over one target distribution."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..kv_cache import KV_CACHE_MODES

GUIDANCE_MODES = ("official", "constant")


class GenerationCancelled(RuntimeError):
    """Raised by `generate` when `should_cancel()` returned True; the KV cache is already released."""


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: guidance, top-k, temperature, decoder (plain or SJD), seed and image count.

    `cfg` is the classifier-free guidance scale (1.0 disables CFG); `guidance` "official" applies
    the official schedule (reference section e.1), "constant" keeps `cfg` everywhere. `top_k`
    limits image codes (the image header, start, height and width, is written from the request,
    never sampled, so no text top-k exists).
    Image i of a call uses seed `seed + i`. `kv_cache` is the KV cache's storage: "bf16", "fp8"
    (e4m3, half the bytes) or "auto" (the activation dtype unless a memory plan chose fp8;
    `lumina_core.kv_cache.kv_storage_dtype` resolves it).
    """

    # metadata["help"]: the command line's help (lumina_core.cli_options builds the options from these fields).
    cfg: float = field(default=4.0, metadata={"help": "classifier-free guidance scale (1.0: no guidance)"})
    guidance: str = field(default="official", metadata={
        "help": "official: the official CFG schedule; constant: cfg at every step", "choices": GUIDANCE_MODES})
    top_k: int = field(default=4096, metadata={"help": "image codes kept at each step"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    sjd: bool = field(default=False, metadata={"help": "speculative Jacobi decoding (same distribution, fewer passes)"})
    sjd_window: int = field(default=16, metadata={"help": "tokens SJD drafts at once (2..64)"})
    sjd_coupled: bool = field(default=False, metadata={"help": "coupled-noise SJD variant (needs --sjd)",
                                                        "flag": "--coupled"})
    seed: int = field(default=0, metadata={"help": "seed of the first image (image i uses seed + i)"})
    num_images: int = field(default=1, metadata={"help": "images per prompt"})
    kv_cache: str = field(default="auto", metadata={
        "help": "KV cache storage: bf16, fp8 (e4m3, half the bytes) or auto (the activation dtype unless the "
                "memory plan chooses fp8)", "choices": KV_CACHE_MODES})

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.cfg, (int, float)) and self.cfg >= 1.0):
            problems.append(f"cfg must be a number >= 1.0 (1.0 disables guidance), got {self.cfg!r}")
        if self.guidance not in GUIDANCE_MODES:
            problems.append(f"guidance must be one of {list(GUIDANCE_MODES)}, got {self.guidance!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            problems.append(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            problems.append(f"temperature must be a number > 0, got {self.temperature!r}")
        if not isinstance(self.sjd_window, int) or isinstance(self.sjd_window, bool) or not 2 <= self.sjd_window <= 64:
            problems.append(f"sjd_window must be an integer in 2..64, got {self.sjd_window!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            problems.append(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")
        if not isinstance(self.num_images, int) or isinstance(self.num_images, bool) or self.num_images < 1:
            problems.append(f"num_images must be an integer >= 1, got {self.num_images!r}")
        if self.kv_cache not in KV_CACHE_MODES:
            problems.append(f"kv_cache must be one of {list(KV_CACHE_MODES)}, got {self.kv_cache!r}")
        if self.sjd_coupled and not self.sjd:
            problems.append("sjd_coupled=True needs sjd=True (it is a variant of speculative Jacobi decoding)")
        if problems:
            raise ValueError("invalid SamplingConfig: " + "; ".join(problems))

    @property
    def seeds(self) -> list[int]:
        """One seed per image: seed, seed+1, ..."""
        return [self.seed + i for i in range(self.num_images)]


__all__ = ["SamplingConfig", "GenerationCancelled", "GUIDANCE_MODES"]
