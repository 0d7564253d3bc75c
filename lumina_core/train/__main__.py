"""`python -m lumina_core.train {prepare,fit,export,vq}`: fine-tune Lumina-mGPT 2.0 from the shell.

Also runs under torchrun: `torchrun --nproc-per-node N -m lumina_core.train fit ...` (FSDP2).
"""
from __future__ import annotations

import argparse
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
    p = sub.add_parser("fit", help="train (single process, or FSDP under torchrun)")
    p.add_argument("--data", required=True, help="folder written by `prepare`")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, log.jsonl")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--init-from", help="official checkpoint folder to fine-tune")
    src.add_argument("--config", help="config.json (file or folder) or a preset (2b, 7b): train from scratch")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimizer steps in all")
    length.add_argument("--epochs", type=float, help="passes over the data in all")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--min-lr", type=float, default=None, help="end of the cosine (default: --lr, as train.sh)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=4.0)
    p.add_argument("--micro-batch", type=int, default=1, help="samples per forward on each process")
    p.add_argument("--accum", type=int, default=1, help="gradient-accumulation micro-batches per step")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--dropout", type=float, default=0.05, help="residual dropout (official 0.05)")
    p.add_argument("--z-loss-weight", type=float, default=1e-5)
    p.add_argument("--uncond-prob", type=float, default=0.1,
                   help="probability that a sample drops its prompt (image tokens only; official 0.1)")
    p.add_argument("--group-by-length", action="store_true",
                   help="fill each step with samples of similar length (less padding when data mixes lengths)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: autocast with float32 master weights")
    p.add_argument("--no-grad-checkpointing", action="store_true", help="keep all activations (more memory)")
    p.add_argument("--loss-chunk", type=int, default=4096, help="positions per chunk of the vocabulary projection")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--sample-every", type=int, default=0, help="write an image sample every K steps (0: never)")
    p.add_argument("--sample-prompt", default="a photo")
    p.add_argument("--sample-size", type=int, default=256, help="side of the square sample image (px)")
    p.add_argument("--movqgan", default=None, help="MoVQGAN .ckpt for samples (default: movqgan*.ckpt in --init-from)")
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint in --out), never, or a checkpoint folder")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--stop-after", type=int, default=None, help="leave after this many steps of this invocation")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an official-format model folder from a training checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one the run recorded)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--movqgan", default=None, help="also copy this MoVQGAN .ckpt into the folder (self-contained)")


def _add_vq(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vq", help="train a small MoVQGAN image tokenizer (demo models); writes an official .ckpt")
    p.add_argument("images", help="folder of images, or a dataset description (JSON/JSONL)")
    p.add_argument("--out", required=True, help="run folder (vq_state.pt, vq_log.jsonl; resumed automatically)")
    p.add_argument("--ckpt", default=None, help="output .ckpt (default: <out>/movqgan.ckpt)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--size", type=int, default=64, help="square training crop side (multiple of 8)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--min-lr", type=float, default=None, help="cosine-decay the lr to this by the last step")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="fp32", help="bf16: autocast (faster on CPUs with bf16)")
    p.add_argument("--beta", type=float, default=0.25, help="commitment-loss weight")
    p.add_argument("--ch", type=int, default=32, help="base channels (multiple of 32: GroupNorm(32))")
    p.add_argument("--ch-mult", default="1,2,2,4", help="channel multipliers per level (4 levels = 8x down)")
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--n-embed", type=int, default=1024, help="codebook size")
    p.add_argument("--embed-dim", type=int, default=4,
                   help="code vector size (270M: 4; small codebooks stay better separated with more, e.g. 32)")
    p.add_argument("--pair-fraction", type=float, default=0.25,
                   help="share of steps on stacked dual-panel pairs from a description (0: single panels only)")
    p.add_argument("--eval-images", type=int, default=256,
                   help="images held out of training to measure reconstruction PSNR at the end")
    p.add_argument("--reset-dead-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--device", default="cpu")


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
        from .loop import FitOptions, fit

        opts = FitOptions(
            data=args.data, out=args.out, init_from=builtin_or_path(args.init_from), config=args.config,
            steps=args.steps, epochs=args.epochs, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay, clip_grad=args.clip_grad, micro_batch=args.micro_batch,
            accum=args.accum, max_seq_len=args.max_seq_len, dropout=args.dropout,
            z_loss_weight=args.z_loss_weight, uncond_prob=args.uncond_prob, group_by_length=args.group_by_length,
            precision=args.precision,
            grad_checkpointing=not args.no_grad_checkpointing, loss_chunk=args.loss_chunk, seed=args.seed,
            save_every=args.save_every, keep=args.keep, log_every=args.log_every, sample_every=args.sample_every,
            sample_prompt=args.sample_prompt, sample_size=args.sample_size, movqgan=movqgan_file(args.movqgan),
            resume=args.resume, device=args.device, stop_after=args.stop_after)
        result = fit(opts)
        state = "interrupted, checkpoint saved" if result.interrupted else "done"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"fit: step {result.step}/{result.total_steps} ({state}); checkpoint {result.checkpoint}")
        return 0
    if args.command == "export":
        from .export import export_official

        dtype = getattr(torch, args.dtype)
        out = export_official(args.checkpoint, args.out, tokenizer_dir=builtin_or_path(args.tokenizer), dtype=dtype,
                              max_shard_bytes=int(args.max_shard_gb * 1e9), movqgan=movqgan_file(args.movqgan))
        print(f"export: wrote {out}")
        return 0
    if args.command == "vq":
        from .vq import VQOptions, train_vq

        opts = VQOptions(images=args.images, out=args.out, ckpt=args.ckpt, steps=args.steps, size=args.size,
                         batch=args.batch, lr=args.lr, min_lr=args.min_lr, precision=args.precision, beta=args.beta, ch=args.ch,
                         ch_mult=tuple(int(x) for x in args.ch_mult.split(",")), num_res_blocks=args.num_res_blocks,
                         n_embed=args.n_embed, embed_dim=args.embed_dim, eval_images=args.eval_images,
                         pair_fraction=args.pair_fraction,
                         reset_dead_every=args.reset_dead_every, seed=args.seed,
                         save_every=args.save_every, device=args.device)
        print(f"vq: wrote {train_vq(opts)}")
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; returns the process exit status (2 with a one-line message for bad input)."""
    from ..errors import InputError
    from .distributed import shutdown_distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        status = run(args)
    except InputError as e:
        shutdown_distributed(clean=False)
        parser.exit(2, f"error: {e}\n")
    except OSError as e:  # a file the user named that cannot be opened (missing, permissions)
        shutdown_distributed(clean=False)
        where = f" {e.filename}" if e.filename else ""
        parser.exit(2, f"error: {e.strerror or e}{':' + where if where else ''}\n")
    except BaseException:
        shutdown_distributed(clean=False)
        raise
    shutdown_distributed()
    return status


if __name__ == "__main__":
    sys.exit(main())
