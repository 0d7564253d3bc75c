"""Memory accounting of `fit --lora` on the 7B (train-side estimate, lumina_core.train.lora.lora_memory_estimate).

    python bench/lora_memory.py [--size 768] [--rank 16] [--loss-chunk 512]

One micro-batch of a 768x768 t2i sample (image tokens from lumina_core.request, plus 128 prompt
tokens), gradient checkpointing, bf16 / int8 / int4 base, with and without --offload-activations. An estimate from the tensor shapes, not
a measurement (no GPU in CI; bench/gpu.sh is where a measurement would go).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lumina_core.config import ModelConfig  # noqa: E402
from lumina_core.request import Request  # noqa: E402
from lumina_core.train.lora import lora_memory_estimate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--loss-chunk", type=int, default=512)
    args = parser.parse_args()
    config = ModelConfig.preset("7b")
    seq_len = Request(task="t2i", prompt="x", width=args.size, height=args.size).image_tokens + args.prompt_tokens
    rows = {}
    for offload in (False, True):   # fit --offload-activations: the checkpointed layer inputs in host memory
        for base in (None, "int8", "int4"):
            name = (base or "bf16") + (" + offload-activations" if offload else "")
            rows[name] = lora_memory_estimate(config, seq_len, rank=args.rank, base_quant=base,
                                              loss_chunk=args.loss_chunk, offload_activations=offload)
    print(json.dumps({"seq_len": seq_len, "rank": args.rank, "loss_chunk": args.loss_chunk, "GiB": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
