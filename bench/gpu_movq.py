"""GPU timing and peak memory of the 270M MoVQGAN (random weights) decoding and encoding a 768x768 image.

Run through bench/gpu.sh. The decoder's attention level works on the full 96x96 latent at 768 px, so
this is where image decoding spends its memory.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_core.movqgan import MoVQConfig, MoVQGAN  # noqa: E402


def timed(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    """Print ms per 768x768 decode/encode (fp32 and bf16) and the peak memory of each."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    base = MoVQGAN(MoVQConfig()).eval()
    codes = torch.randint(0, 16384, (1, 96, 96), device=device)
    image = torch.rand(1, 3, 768, 768, device=device) * 2 - 1
    for dtype in (torch.float32, torch.bfloat16):
        model = base.to(device=device, dtype=dtype)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        dec = timed(lambda: model.decode(codes))
        dec_peak = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
        enc = timed(lambda: model.encode(image.to(dtype)))
        enc_peak = torch.cuda.max_memory_allocated() / 1e9
        print(f"[movqgan 270M {str(dtype)[6:]}] decode 768x768 {1e3 * dec:.0f} ms (peak {dec_peak:.1f} GB); "
              f"encode {1e3 * enc:.0f} ms (peak {enc_peak:.1f} GB)", flush=True)


if __name__ == "__main__":
    main()
