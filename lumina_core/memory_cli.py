"""`python -m lumina_core memory`: the memory plan of a generation printed (table or JSON), no weights loaded."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_options import DTYPES, gib_budget, torch_dtype
from .config import ModelConfig
from .fileio import load_torch_file
from .memory import DEFAULT_PROMPT_TOKENS, GIB, MemoryPlanError, estimate, plan
from .sampling import SamplingConfig


MEMORY_HELP = "print the memory a generation needs (weights, KV cache, activations, decode, peak); loads no weights"


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """The `memory` sub-command's options."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", default=None, choices=["2b", "7b"], help="a preset (default 7b)")
    src.add_argument("--model", default=None, help="a model folder (its config.json, tokenizer and MoVQGAN)")
    p.add_argument("--task", default="t2i")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--cfg", type=float, default=4.0, help="1.0 = no CFG (one row per image instead of two)")
    p.add_argument("--sjd", action="store_true")
    p.add_argument("--sjd-window", type=int, default=16)
    p.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--kv-cache", default="auto", choices=["auto", "bf16", "fp8"],
                   help="auto: the activation dtype, or (with --budget) fp8 where that makes it fit")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="whose weight layouts to count")
    p.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    p.add_argument("--budget", type=gib_budget, default=None, help="GiB free: plan within it (kv_cache auto may pick fp8)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--table", action="store_true", help="print the README table of the 7B rows")


# (side, quantization, KV storage, the target in GiB: the card it is for, less the display's share)
README_ROWS = ((768, "int4", "fp8", 9), (768, "int8", "fp8", 12), (768, None, "fp8", 18), (768, None, "bf16", 22.5),
               (512, "int4", "fp8", 6))


def run_memory(args: argparse.Namespace) -> int:
    """The `memory` sub-command: print the estimate (or plan) as text, JSON or the README table."""
    from .request import Request

    dtype = torch_dtype(args.dtype)
    kwargs: dict = {"dtype": dtype, "device": args.device, "prompt_tokens": args.prompt_tokens}
    if args.model:
        folder = Path(args.model)
        config = ModelConfig.from_pretrained(folder)
        kwargs.update(folder_facts(folder))
    else:
        config = ModelConfig.preset(args.config or "7b")
    quant = None if args.quant == "none" else args.quant
    sampling = SamplingConfig(cfg=args.cfg, sjd=args.sjd, sjd_window=args.sjd_window, num_images=args.num_images)
    if args.table:
        print("| size | weights | KV cache | images | weights GiB | KV GiB | activations GiB | decode GiB (dtype) "
              "| peak GiB | target GiB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for side, q, kv, target in README_ROWS:
            # Planned within the target: a float32 decode where it fits, else bf16 (CUDA); over it, the fp32 figures.
            try:
                row = plan(int(target * GIB), config, Request(width=side, height=side), SamplingConfig(), quant=q,
                           kv_cache=kv, **kwargs)
            except MemoryPlanError:
                row = estimate(config, Request(width=side, height=side), SamplingConfig(), quant=q, kv_cache=kv,
                               **kwargs)
            print(f"{row.table_row()} {target} |")
        return 0
    request = Request(task=args.task, width=args.width, height=args.height,
                      reference=_placeholder_reference(args.task, args.width, args.height))
    if args.budget is not None:
        result = plan(int(args.budget * GIB), config, request, sampling, quant=quant, kv_cache=args.kv_cache, **kwargs)
    else:
        result = estimate(config, request, sampling, quant=quant, kv_cache=args.kv_cache, **kwargs)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        for name, value in result.to_dict().items():
            shown = f"{value / GIB:.2f} GiB" if name.endswith("_bytes") else value
            print(f"{name:20s} {shown}")
    return 0


def _placeholder_reference(task: str, width: int, height: int):
    """A blank reference for tasks that need one: the plan depends on its size only."""
    from PIL import Image

    from .tasks import get_task

    return Image.new("RGB", (width, height // 2)) if get_task(task).reference_upper else None


def folder_facts(folder: Path) -> dict:
    """What a model folder adds to the config: its image-code count and its MoVQGAN's architecture."""
    from .movqgan import config_from_state_dict

    facts: dict = {}
    ckpts = sorted(folder.glob("movqgan*.ckpt"))
    if ckpts:
        state = load_torch_file(ckpts[0], "a MoVQGAN checkpoint (movqgan_270M.ckpt)", mmap=True)
        movq = config_from_state_dict(state.get("state_dict", state))
        facts["movq_config"] = movq
        facts["num_image_codes"] = movq.n_embed
    return facts


