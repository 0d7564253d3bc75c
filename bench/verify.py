"""Benchmark the verifiers: seconds and peak memory per candidate on tiny random models, and the weight
memory the real checkpoints need (from their architectures, nothing downloaded).

    python bench/verify.py [--device cpu] [--candidates 8] [--size 256] [--repeats 3]

Tiny-model timings measure the scoring code path (pre-processing, batching, forward), not the speed
of the real models; the second table is what the real models need on a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lumina_core.verify import get_verifier, weight_memory  # noqa: E402
from lumina_core.testing.verifiers import make_tiny_aesthetic_head, make_tiny_clip, make_tiny_qwen_vl  # noqa: E402


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak extra memory while the block runs: CUDA allocator peak on GPUs, sampled RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss_bytes()
            self.high = self.base
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.high = max(self.high, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.high, _rss_bytes()) - self.base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="candidate image side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(args.candidates, 3, args.size, args.size)
    prompt = "a red cube on a blue table"

    with tempfile.TemporaryDirectory() as root:
        clip = make_tiny_clip(os.path.join(root, "clip"))
        head = make_tiny_aesthetic_head(os.path.join(root, "head.pth"))
        qwen = make_tiny_qwen_vl(os.path.join(root, "qwen"))
        verifiers = {
            "vqascore": get_verifier("vqascore", model=qwen, device=device),
            "aesthetic": get_verifier("aesthetic", model=clip, head=head, device=device),
            "pickscore": get_verifier("pickscore", model=clip, device=device),
            "clipscore": get_verifier("clipscore", model=clip, device=device),
            "demo_check": get_verifier("demo_check", device=device),
        }
        demo_images = torch.ones(args.candidates, 3, 64, 64)  # demo_check reads 64 px demo images
        print(f"tiny random models on {device}, {args.candidates} candidates of {args.size}x{args.size}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"{'verifier':<11} {'load s':>8} {'s/candidate':>12} {'peak MiB/candidate':>19}")
        for name, verifier in verifiers.items():
            batch, text = (demo_images, "a red circle in the center") if name == "demo_check" else (images, prompt)
            start = time.perf_counter()
            verifier.load()
            load_s = time.perf_counter() - start
            verifier.score(batch[:1], text)  # warm-up
            best, peak = float("inf"), 0
            for _ in range(args.repeats):
                with PeakMemory(device) as memory:
                    start = time.perf_counter()
                    verifier.score(batch, text)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    best = min(best, time.perf_counter() - start)
                peak = max(peak, memory.peak)
            print(f"{name:<11} {load_s:>8.3f} {best / args.candidates:>12.5f} "
                  f"{peak / args.candidates / 2**20:>19.3f}")
            verifier.unload()

    print("\nreal checkpoints: weight memory only (activations come on top; measure them on a GPU with --device cuda)")
    print(f"{'verifier':<11} {'checkpoint':<32} {'parameters':>14} {'bf16 GiB':>9} {'fp32 GiB':>9}")
    rows = [("vqascore", None), ("vqascore", "Qwen/Qwen2.5-VL-3B-Instruct"), ("aesthetic", None),
            ("pickscore", None), ("clipscore", None)]
    for name, model in rows:
        bf16 = weight_memory(name, model, torch.bfloat16)
        fp32 = weight_memory(name, model, torch.float32)
        print(f"{name:<11} {bf16['model']:<32} {bf16['parameters']:>14,} {bf16['bytes'] / 2**30:>9.2f} "
              f"{fp32['bytes'] / 2**30:>9.2f}")


if __name__ == "__main__":
    main()
