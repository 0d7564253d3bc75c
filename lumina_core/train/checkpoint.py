"""Training checkpoints (atomic, resumable exactly) and export to the official HF-format folder.

A training checkpoint is a folder ``<out>/checkpoints/step_NNNNNNN`` holding ``model.safetensors``
(float32 master weights, official names), ``optimizer.pt`` (full AdamW state keyed by parameter
name, so any world size can load it), ``scheduler.pt``, ``rng.pt`` (Python, NumPy and torch
states of every rank) and ``trainer_state.json`` (step, data position, configuration). It is
written to a temporary folder and renamed, and ``<out>/checkpoints/latest`` names the newest one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..fileio import atomic_path, atomic_write_text
from .distributed import DistInfo, barrier, gather_objects

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
MODEL_PREFIX = "transformer."  # the training wrapper holds the transformer under this name


# --------------------------------------------------------------------------------------------
# RNG states

def rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy and torch RNG states of this process (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------
# Full state dicts through torch.distributed.checkpoint's API (works with and without FSDP)

def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict of the transformer inside the training wrapper, official names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(MODEL_PREFIX): v for k, v in sd.items()}


def load_full_model_state(module: nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    """Load a full state dict (official names) into the (possibly sharded) training wrapper, strictly.

    Distributed: only rank 0 needs the tensors (the others pass an empty dict); they are broadcast
    and sharded one by one, so no other rank ever holds the whole model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if info.enabled and not info.is_main:
        state = {}
    result = set_model_state_dict(module, {MODEL_PREFIX + k: v for k, v in state.items()},
                                  options=StateDictOptions(full_state_dict=True, strict=True,
                                                           broadcast_from_rank0=info.enabled))
    missing = getattr(result, "missing_keys", [])
    unexpected = getattr(result, "unexpected_keys", [])
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def read_official_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an official checkpoint folder (single file or shards), float32, vqmodel keys dropped."""
    from ..weights import read_state_dict

    return read_state_dict(folder, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Save / resume

def checkpoint_root(out_dir: str | Path) -> Path:
    """``<out>/checkpoints``."""
    return Path(out_dir) / CHECKPOINTS_DIR


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    pointer = checkpoint_root(out_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    folder = checkpoint_root(out_dir) / pointer.read_text(encoding="utf-8").strip()
    return folder if (folder / STATE_FILE).is_file() else None


def save_checkpoint(out_dir: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], info: DistInfo, keep: int = 2) -> Path | None:
    """Write a training checkpoint atomically (collective: every rank must call it); returns its folder on rank 0."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model_state = full_model_state(module)
    optim_state = get_optimizer_state_dict(module, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = gather_objects(rng_state(info.device), info)
    final = None
    if info.is_main:
        root = checkpoint_root(out_dir)
        root.mkdir(parents=True, exist_ok=True)
        name = f"step_{state['step']:07d}"
        final = root / name
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
        try:
            save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE),
                      metadata={"format": "pt"})
            torch.save(optim_state, tmp / OPTIMIZER_FILE)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            torch.save({"ranks": rngs}, tmp / RNG_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        atomic_write_text(root / LATEST_FILE, name)
        older = sorted(p for p in root.glob("step_*") if p.is_dir() and p != final)
        for stale in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    info: DistInfo) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from a checkpoint folder; returns its state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    reads = info.is_main or not info.enabled  # other ranks receive broadcasts instead of reading files
    load_full_model_state(module, load_file(str(folder / MODEL_FILE)) if reads else {}, info)
    optim_state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True) if reads else {}
    set_optimizer_state_dict(module, optimizer, optim_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.enabled))
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    rngs = torch.load(folder / RNG_FILE, map_location="cpu", weights_only=True)["ranks"]
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank], info.device)
    else:
        # Another world size: dropout masks cannot continue bit-exactly; the data order still does.
        torch.manual_seed(int(state.get("seed", 0)) + 7919 * state["step"] + info.rank)
    return state


# --------------------------------------------------------------------------------------------
# Export to the official format

def export_official(checkpoint: str | Path, out_folder: str | Path, tokenizer_dir: str | Path | None = None,
                    dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5_000_000_000,
                    movqgan: str | Path | None = None) -> Path:
    """Write config.json, sharded safetensors + index and the tokenizer files: an official-format model folder.

    With `movqgan`, that .ckpt is copied in too, so the folder alone is enough for the Loader node.
    """
    from safetensors import safe_open

    from ..weights import write_weights
    from .data import TOKENIZER_FILES

    checkpoint = Path(checkpoint)
    if (checkpoint / CHECKPOINTS_DIR).is_dir():  # a run folder: take its newest checkpoint
        latest = latest_checkpoint(checkpoint)
        if latest is None:
            raise FileNotFoundError(f"{checkpoint} has no complete checkpoint to export")
        checkpoint = latest
    if not (checkpoint / STATE_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint (no {STATE_FILE})")
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    config = ModelConfig(**state["model_config"])
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)

    tok = Path(tokenizer_dir) if tokenizer_dir is not None else (
        Path(state["tokenizer_dir"]) if state.get("tokenizer_dir") else None)
    if tok is None or not (tok / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer files to copy (looked in {tok}); pass --tokenizer")
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copy2(tok / name, out / name)
    if movqgan is not None:
        movqgan = Path(movqgan)
        if not movqgan.is_file():
            raise FileNotFoundError(f"MoVQGAN checkpoint not found: {movqgan}")
        with atomic_path(out / movqgan.name) as tmp:
            shutil.copyfile(movqgan, tmp)
    with safe_open(str(checkpoint / MODEL_FILE), framework="pt", device="cpu") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
        # config.json is written last: a folder with it is complete.
        write_weights(out, shapes, handle.get_tensor, _official_config(config, state, tok, dtype), dtype=dtype,
                      max_shard_bytes=max_shard_bytes)
    return out


def _official_config(config: ModelConfig, state: dict[str, Any], tokenizer_dir: Path, dtype: torch.dtype) -> dict:
    """config.json: the starting checkpoint's fields (vq_config, ...) updated with ours, plus vocabulary_map.

    The official sampler finds the image tokens through `vocabulary_map` (names starting with
    "<MOVQGAN"), so it is written from the tokenizer when the starting config had none.
    """
    base: dict[str, Any] = {}
    init_from = (state.get("options") or {}).get("init_from")
    if init_from and (Path(init_from) / "config.json").is_file():
        base = json.loads((Path(init_from) / "config.json").read_text(encoding="utf-8"))
    base.update(config.to_hf_dict())
    base["torch_dtype"] = str(dtype).removeprefix("torch.")
    if not base.get("vocabulary_map"):
        from ..tokens import load_text_tokenizer

        vocab = load_text_tokenizer(tokenizer_dir).get_vocab()
        base["vocabulary_map"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    return base
