"""Peak GPU memory of one `fit --lora` step on a 7B-shaped model against the train-side estimate (issue 17).

    python bench/gpu_lora.py [--base bf16|int8|int4] [--offload-activations] [--size 768] [--rank 16]

Random weights of the 7B's shapes (the memory does not depend on their values), the frozen base in bf16
or torchao weight-only int8 / int4, fresh rank-16 adapters through the same `attach_lora` as `fit --lora`,
gradient checkpointing, `--loss-chunk 512`, micro-batch 1 of a 768x768 t2i sample (9,316 image tokens +
128 prompt tokens). Two optimizer steps (AdamW's state appears in the first); prints one JSON line with
the allocator's peak (torch.cuda.max_memory_allocated) beside `lora_memory_estimate`'s `total`, the
weights as allocated, and the second step's seconds. `--config tiny --device cpu` runs the same code
on a tiny model (the test does; there is no allocator peak on CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lumina_core.config import ModelConfig  # noqa: E402
from lumina_core.model import build_transformer  # noqa: E402
from lumina_core.request import Request  # noqa: E402
from lumina_core.train import FitOptions  # noqa: E402
from lumina_core.train.lora import attach_lora, lora_memory_estimate  # noqa: E402

GIB = 2 ** 30
TINY = ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2)


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="7b", help="a preset (2b, 7b) or 'tiny' (a test shape)")
    parser.add_argument("--base", choices=("bf16", "int8", "int4"), default="bf16")
    parser.add_argument("--offload-activations", action="store_true")
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--loss-chunk", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = TINY if args.config == "tiny" else ModelConfig.preset(args.config)
    quant = None if args.base == "bf16" else args.base
    opts = FitOptions(data=".", out=".", init_from="random weights", steps=2, lora_rank=args.rank, base_quant=quant,
                      offload_activations=args.offload_activations, loss_chunk=args.loss_chunk, precision="bf16",
                      dropout=0.0)
    seq_len = Request(task="t2i", prompt="x", width=args.size, height=args.size).image_tokens + args.prompt_tokens
    estimate = lora_memory_estimate(config, seq_len, rank=args.rank, base_quant=quant, loss_chunk=args.loss_chunk,
                                    offload_activations=args.offload_activations)

    with torch.device(device):
        transformer = build_transformer(config).to(torch.bfloat16)   # random weights: only the shapes matter
    if quant:
        from lumina_core.quant import quantize_module

        quantize_module(transformer, quant, device=device)
    module = attach_lora(transformer, config, opts)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    weights = allocated(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device, generator=generator)
    labels = ids.clone()
    labels[:, :args.prompt_tokens] = -100
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss, _ = module(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    out = {"config": args.config, "base": args.base, "offload_activations": args.offload_activations,
           "seq_len": seq_len, "rank": args.rank, "loss": round(loss.item(), 4),
           "estimate_total_GiB": estimate["total"], "estimate_parts_GiB": estimate,
           "measured_peak_GiB": None if peak is None else round(peak / GIB, 2),
           "measured_weights_GiB": None if weights is None else round(weights / GIB, 2),
           "second_step_s": round(seconds[-1], 3)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
