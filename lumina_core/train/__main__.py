"""`python -m lumina_core.train {prepare,fit,export,vq}`: fine-tune Lumina-mGPT 2.0 from the shell.

Also runs under torchrun: `torchrun --nproc-per-node N -m lumina_core.train fit ...` (FSDP2).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="pre-tokenise a dataset description (JSON/JSONL) into shards + index")
    p.add_argument("description", help="JSON list or JSONL of items {task, prompt, image[, second_image]}")
    p.add_argument("--out", required=True, help="output folder (shards, index.json, bad_items.jsonl, tokenizer/)")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json + tokenizer_config.json "
                                                      "(the model folder)")
    p.add_argument("--movqgan", required=True, help="MoVQGAN checkpoint (movqgan_270M.ckpt)")
    p.add_argument("--target-size", type=int, default=512,
                   help="official variable-size crop: images get at most target_size^2 pixels (default 512)")
    p.add_argument("--shard-size", type=int, default=1000, help="records per shard (also the resume granularity)")
    p.add_argument("--max-seq-len", type=int, default=None, help="skip items longer than this many tokens")
    p.add_argument("--device", default="cpu", help="device for MoVQGAN encoding (cpu, cuda, ...)")
    p.add_argument("--sizeless-prompt-prob", type=float, default=0.0,
                   help="share of t2i items given the official size-free prompt (official pre-tokeniser: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the size-free prompt choice")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_fit(sub: argparse._SubParsersAction) -> None:
    from ..cli_options import add_options
    from .options import FitOptions

    add_options(sub.add_parser("fit", help="train (single process, or FSDP under torchrun)"), FitOptions)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an official-format model folder from a training checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one the run recorded)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--movqgan", default=None, help="also copy this MoVQGAN .ckpt into the folder (self-contained)")
    p.add_argument("--merge", action="store_true",
                   help="LoRA runs: write the base with the adapter merged in (official format) instead of the "
                        "peft adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", default=None, help="LoRA --merge: the base folder (default: the run's --init-from)")


def _add_vq(sub: argparse._SubParsersAction) -> None:
    from ..cli_options import add_options
    from .vq import VQOptions

    p = sub.add_parser("vq", help="train a small MoVQGAN image tokenizer (demo models); writes an official .ckpt")
    images = next(f for f in dataclasses.fields(VQOptions) if f.name == "images")
    p.add_argument("images", help=images.metadata["help"])  # positional, as `prepare`'s description
    add_options(p, VQOptions, exclude=["images"])


def build_parser() -> argparse.ArgumentParser:
    """The CLI: prepare, fit, export."""
    parser = argparse.ArgumentParser(prog="python -m lumina_core.train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_fit(sub)
    _add_export(sub)
    _add_vq(sub)
    return parser


def builtin_or_path(value: str | None) -> str | None:
    """A packaged model's folder for its name ('demo'), else the value as given (a path)."""
    from ..hub import BUILTIN_MODELS

    return str(BUILTIN_MODELS[value]) if value in BUILTIN_MODELS else value


def movqgan_file(value: str | None) -> str | None:
    """--movqgan: a .ckpt, or a model folder ('demo' included) holding one."""
    from ..pipeline import find_movqgan

    path = builtin_or_path(value)
    if path is not None and Path(path).is_dir() and any(Path(path).glob("movqgan*.ckpt")):
        return str(find_movqgan(Path(path)))
    return path


def run(args: argparse.Namespace) -> int:
    """Run one parsed sub-command; returns the exit status (raises InputError for bad input)."""
    if args.command == "prepare":
        from .data import prepare

        summary = prepare(args.description, args.out, builtin_or_path(args.tokenizer), movqgan_file(args.movqgan),
                          target_size=args.target_size, shard_size=args.shard_size, max_seq_len=args.max_seq_len,
                          device=args.device, progress=not args.no_progress,
                          sizeless_prompt_prob=args.sizeless_prompt_prob, seed=args.seed)
        print(f"prepare: {summary}")
        return 0
    if args.command == "fit":
        from ..cli_options import from_args
        from .loop import fit
        from .options import FitOptions

        opts = from_args(FitOptions, args, init_from=builtin_or_path(args.init_from),
                         movqgan=movqgan_file(args.movqgan))
        result = fit(opts)
        state = "interrupted, checkpoint saved" if result.interrupted else "done"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"fit: step {result.step}/{result.total_steps} ({state}); checkpoint {result.checkpoint}")
        return 0
    if args.command == "export":
        from .export import export_official

        from .lora import export_lora

        dtype = getattr(torch, args.dtype)
        out = export_lora(args.checkpoint, args.out, merge=args.merge, base=args.base, dtype=dtype)
        if out is not None:  # a LoRA run: its peft adapter, or the merged model
            print(f"export: wrote {out}")
            return 0
        out = export_official(args.checkpoint, args.out, tokenizer_dir=builtin_or_path(args.tokenizer), dtype=dtype,
                              max_shard_bytes=int(args.max_shard_gb * 1e9), movqgan=movqgan_file(args.movqgan))
        print(f"export: wrote {out}")
        return 0
    if args.command == "vq":
        from ..cli_options import from_args
        from .vq import VQOptions, train_vq

        print(f"vq: wrote {train_vq(from_args(VQOptions, args))}")
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; returns the process exit status (2 with a one-line message for bad input)."""
    from ..errors import InputError
    from ..dist import shutdown

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        status = run(args)
    except InputError as e:
        shutdown(clean=False)
        parser.exit(2, f"error: {e}\n")
    except OSError as e:  # a file the user named that cannot be opened (missing, permissions)
        shutdown(clean=False)
        where = f" {e.filename}" if e.filename else ""
        parser.exit(2, f"error: {e.strerror or e}{':' + where if where else ''}\n")
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
