"""`train vq`: train a small MoVQGAN image tokenizer with our own code (for embedded demo models).

Training images are square crops of every image (both panels of dual-panel items) and, for a
description with dual-panel items, also the two panels stacked (upper over lower, one code grid
each, as the pipeline decodes a dual-panel picture): the decoder's GroupNorm and attention see the
whole picture, and a decoder trained on single panels alone shifts the colours of a stacked pair.

Objective: L1 reconstruction + codebook + commitment losses from `MoVQGAN.forward`
(straight-through estimator). The released 270M model also used perceptual and adversarial
losses; those are deliberately left out here (no pretrained VGG offline, and a demo tokenizer
only needs to be consistent, not photorealistic). Codes that no image uses for a while are
re-seeded from current encoder outputs, so a small codebook stays in use.

The run folder holds `vq_state.pt` (model, optimizer, step, RNG; written atomically, resumed
automatically) and the result is written as an official-format flat `.ckpt` (`save_movqgan`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..fileio import atomic_path, atomic_write_text, load_torch_file
from .files import writing
from .options import PRECISION_DTYPES, Precision

logger = logging.getLogger(__name__)
STATE_FILE = "vq_state.pt"
EVAL_FILE = "vq_eval.json"
RESET_UNTIL = 0.8                       # dead codes are re-seeded during this fraction of the run only
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class VQOptions:
    """Settings of a `train vq` run (the `vq` command line is built from these fields)."""

    images: str = field(metadata={"help": "folder of images, or a dataset description (JSON/JSONL)"})
    out: str = field(metadata={"help": "run folder (vq_state.pt, vq_log.jsonl; resumed automatically)"})
    ckpt: str | None = _opt(None, "output .ckpt (default: <out>/movqgan.ckpt)")
    steps: int = _opt(1000, "optimizer steps")
    size: int = _opt(64, "square training crop side (multiple of 8)")
    batch: int = _opt(8, "images per step")
    lr: float = _opt(2e-4, "Adam learning rate")
    min_lr: float | None = _opt(None, "cosine-decay the lr to this by the last step (default: constant lr)")
    precision: Precision = _opt("fp32", "bf16: autocast encoder/decoder (about 1.5x faster on CPUs with bf16)")
    beta: float = _opt(0.25, "commitment-loss weight")
    ch: int = _opt(32, "base channels (multiple of 32: GroupNorm(32))")
    ch_mult: tuple[int, ...] = _opt((1, 2, 2, 4), "channel multipliers per level (4 levels = 8x down)")
    num_res_blocks: int = _opt(1, "residual blocks per level")
    n_embed: int = _opt(1024, "codebook size")
    embed_dim: int = _opt(4, "code vector size (270M: 4; small codebooks stay better separated with more, e.g. 32)")
    eval_images: int = _opt(256, "images held out of training to measure reconstruction PSNR at the end")
    pair_fraction: float = _opt(0.25, "share of steps on stacked dual-panel pairs from a description "
                                      "(0: single panels only)")
    reset_dead_every: int = _opt(100, "re-seed unused codes every N steps (0: never)")
    seed: int = _opt(0, "seed of the initial weights, the batches and the flips")
    save_every: int = _opt(200, "save vq_state.pt every N steps")
    log_every: int = _opt(10, "vq_log.jsonl record every N steps")
    device: str = _opt("cpu", "device to train on (cpu, cuda, ...)")

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        for name in ("steps", "size", "batch", "ch", "num_res_blocks", "n_embed", "embed_dim", "save_every",
                     "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        downsampling = 2 ** (len(self.ch_mult) - 1)
        if not self.ch_mult or any(m < 1 for m in self.ch_mult) or self.size % downsampling:
            raise InputError(f"size {self.size} must be a multiple of {downsampling} (2 ** (levels - 1)) and the "
                             f"channel multipliers positive, got {self.ch_mult}")
        if self.ch % 32:
            raise InputError(f"ch must be a multiple of 32 (GroupNorm(32)), got {self.ch}")
        if self.precision not in PRECISION_DTYPES:
            raise InputError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {self.precision!r}")
        if not 0.0 <= self.pair_fraction <= 1.0 or self.eval_images < 0 or self.reset_dead_every < 0:
            raise InputError("pair_fraction must lie in [0, 1], eval_images and reset_dead_every be >= 0")


def _entry_path(description: Path, path: str) -> Path:
    """A path named by a dataset description: absolute, or relative to the description's folder."""
    p = Path(path)
    return p if p.is_absolute() else description.parent / p


def image_paths(source: str | os.PathLike) -> list[Path]:
    """Every image of a folder (sorted), or every image a dataset description names (both panels)."""
    from .data import read_description

    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        paths = []
        for entry in read_description(source):
            if not isinstance(entry, dict):
                continue
            for key in ("image", "image_path", "second_image"):
                if isinstance(entry.get(key), str):
                    paths.append(_entry_path(source, entry[key]))
    usable = [p for p in paths if p.is_file()]
    if not usable:
        raise InputError(f"no images found in {source} (looked for {', '.join(IMAGE_SUFFIXES)} files)")
    return usable


def pair_paths(source: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(upper, lower) image paths of the dual-panel items of a dataset description (none for a folder)."""
    from .data import read_description

    source = Path(source)
    if source.is_dir():
        return []
    pairs = []
    for entry in read_description(source):
        if isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(entry.get("second_image"), str):
            upper, lower = _entry_path(source, entry["image"]), _entry_path(source, entry["second_image"])
            if upper.is_file() and lower.is_file():
                pairs.append((upper, lower))
    return pairs


def load_pairs(pairs: list[tuple[Path, Path]], size: int) -> torch.Tensor:
    """Dual-panel pictures [N, 3, 2*size, size]: each panel cropped to size x size, upper over lower."""
    if not pairs:
        return torch.empty(0, 3, 2 * size, size)
    upper = load_images([p[0] for p in pairs], size)
    lower = load_images([p[1] for p in pairs], size)
    if len(upper) != len(lower):
        raise InputError("some dual-panel images could not be read; fix or drop those items")
    return torch.cat([upper, lower], dim=2)


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """Images center-cropped (official crop) to size x size, float [N, 3, size, size] in [-1, 1]; bad files skipped.

    Transparent pixels are blended onto white, as the training data and the batch runner do.
    """
    from PIL import Image, UnidentifiedImageError

    from ..images import center_crop, pil_to_tensor, whiten_transparency

    tensors = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                image = whiten_transparency(im.copy())  # whitened before the crop resamples it
        except (UnidentifiedImageError, OSError) as e:
            logger.warning("skipping %s: %s", path, e)
            continue
        tensors.append(pil_to_tensor(center_crop(image, (size, size))))
    if not tensors:
        raise InputError(f"none of the {len(paths)} images could be read (first: {paths[0] if paths else None})")
    return torch.stack(tensors)


def _save_state(path: Path, state: dict) -> None:
    with writing(path), atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_vq(opts: VQOptions) -> Path:
    """Train (or resume) a MoVQGAN and write it as an official-format .ckpt; returns the .ckpt path."""
    from ..movqgan import MoVQConfig, MoVQGAN, save_movqgan
    from .checkpoint import rng_state, set_rng_state
    from .loop import _StopRequest

    device = torch.device(opts.device)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    images = load_images(image_paths(opts.images), opts.size)
    held_out = min(opts.eval_images, len(images) // 5)
    eval_set, images = images[:held_out], images[held_out:]
    pairs = load_pairs(pair_paths(opts.images), opts.size) if opts.pair_fraction > 0 else load_pairs([], opts.size)
    held_out_pairs = min(opts.eval_images // 4, len(pairs) // 5)
    eval_pairs, pairs = pairs[:held_out_pairs], pairs[held_out_pairs:]
    cfg = MoVQConfig(ch=opts.ch, ch_mult=tuple(opts.ch_mult), num_res_blocks=opts.num_res_blocks,
                     n_embed=opts.n_embed, z_channels=opts.embed_dim, embed_dim=opts.embed_dim)
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    model = MoVQGAN(cfg).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr, betas=(0.5, 0.9))
    usage = torch.zeros(cfg.n_embed, dtype=torch.long)
    step = 0
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = load_torch_file(state_path, "the state of an interrupted `vq` run")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        usage = state["usage"]
        step = state["step"]
        set_rng_state(state["rng"], device)
        logger.info("resumed vq training at step %d", step)

    def save() -> None:
        _save_state(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "usage": usage,
                                 "step": step, "rng": rng_state(device), "options": json.dumps(asdict(opts))})

    stopper = _StopRequest()
    stopper.install()
    log = out / "vq_log.jsonl"
    try:
        while step < opts.steps:
            if len(pairs) and float(torch.rand(())) < opts.pair_fraction:
                batch = pairs[torch.randint(len(pairs), (max(1, opts.batch // 2),))]  # same pixels per step
            else:
                batch = images[torch.randint(len(images), (opts.batch,))]
            # Random flips: cheap augmentation for tiny demo sets.
            flip = torch.rand(len(batch)) < 0.5
            batch[flip] = batch[flip].flip(-1)
            batch = batch.to(device)
            if opts.min_lr is not None:
                progress = step / max(1, opts.steps)
                for group in optimizer.param_groups:
                    group["lr"] = opts.min_lr + (opts.lr - opts.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
            dtype = PRECISION_DTYPES[opts.precision]
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
                recon, codebook_loss, commitment_loss, codes = model(batch, beta=opts.beta)
            rec_loss = F.l1_loss(recon.float(), batch)
            loss = rec_loss + codebook_loss + commitment_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            usage += torch.bincount(codes.flatten().cpu(), minlength=cfg.n_embed)
            step += 1
            if step % opts.log_every == 0 or step == opts.steps:
                record = {"step": step, "loss": loss.item(), "rec": rec_loss.item(), "codebook": codebook_loss.item(),
                          "commit": commitment_loss.item(), "codes_used": int((usage > 0).sum())}
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                logger.info("vq step %d/%d rec %.4f codebook %.4f commit %.4f", step, opts.steps, record["rec"],
                            record["codebook"], record["commit"])
            # No re-seeding in the last fifth: a code re-seeded at the end sits on real encoder outputs
            # (so encoding picks it) while the decoder never learned to decode it.
            if opts.reset_dead_every and step % opts.reset_dead_every == 0 and step <= RESET_UNTIL * opts.steps:
                _reset_dead_codes(model, batch, usage)
                usage.zero_()
            if stopper.requested or step % opts.save_every == 0 or step == opts.steps:
                save()
            if stopper.requested:
                break
    finally:
        stopper.restore()
    ckpt = Path(opts.ckpt) if opts.ckpt else out / "movqgan.ckpt"
    if held_out and step >= opts.steps:
        report = evaluate_reconstruction(model.eval(), eval_set)
        if held_out_pairs:
            pair_report = evaluate_reconstruction(model, eval_pairs)
            report.update(pair_images=held_out_pairs, pair_psnr_db=pair_report["psnr_db"])
        atomic_write_text(out / EVAL_FILE, json.dumps({"step": step, "images": held_out, **report}, indent=2))
        logger.info("vq held-out reconstruction: PSNR %.2f dB, %d codes used", report["psnr_db"], report["codes_used"])
    with writing(ckpt):
        save_movqgan(model.eval(), ckpt)
    return ckpt


@torch.no_grad()
def evaluate_reconstruction(model, images: torch.Tensor, batch: int = 64) -> dict:
    """PSNR (dB, on the 8-bit pixels a saved image holds) and codes used."""
    from ..images import tensor_to_uint8

    squared_error, pixels, used = 0.0, 0, set()
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        codes = model.encode(x)
        used.update(codes.unique().tolist())
        recon = tensor_to_uint8(model.decode(codes)).float()
        squared_error += float((recon - tensor_to_uint8(x).float()).pow(2).sum())
        pixels += x.numel()
    mse = squared_error / max(pixels, 1)
    return {"psnr_db": round(10 * math.log10(255 ** 2 / max(mse, 1e-12)), 2), "codes_used": len(used)}


@torch.no_grad()
def _reset_dead_codes(model, batch: torch.Tensor, usage: torch.Tensor) -> None:
    """Move codes unused since the last reset onto random current encoder outputs (keeps the codebook alive)."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return
    latent = model.encode_latent(batch)
    vectors = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
    pick = torch.randint(len(vectors), (dead.numel(),))
    model.codebook[dead.to(model.codebook.device)] = vectors[pick] + 1e-3 * torch.randn_like(vectors[pick])
