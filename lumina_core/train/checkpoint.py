"""Training checkpoints: atomic, resumable exactly, checked before a resume, sharded under FSDP.

A training checkpoint is a folder ``<out>/checkpoints/step_NNNNNNN`` holding ``scheduler.pt``,
``rng.pt`` (Python, NumPy and torch states of every rank), ``trainer_state.json`` (step, data
position, configuration) and the weights with the AdamW state in one of two formats:

- full (one process): ``model.safetensors`` (float32 master weights, official names) and
  ``optimizer.pt`` (AdamW state keyed by parameter name);
- sharded (FSDP under torchrun): a ``torch.distributed.checkpoint`` folder (``.metadata`` and one
  ``__R_0.distcp`` per rank): every rank writes its own shard, nobody gathers the model, and any
  world size (one process included) loads it back, resharded.

It is written to a temporary ``.step_NNNNNNN.*.tmp`` folder and renamed, and
``<out>/checkpoints/latest`` names the newest one. A resume takes the newest checkpoint that is
intact (every file present and readable) and says why when that is not the one ``latest`` names.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..fileio import atomic_write_text, load_torch_file
from ..dist import RankInfo, barrier, gather
from .distributed import broadcast_object
from .files import folder_mode, remove_stale_temp_folders, save_safetensors, writing

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
SHARDED_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint
STEP_NAME = re.compile(r"step_(\d+)")
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

    from .lora import adapter_state, is_lora_module

    if is_lora_module(module):  # LoRA: only the adapters (MBs); the base is the run's --init-from
        return adapter_state(module)
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(MODEL_PREFIX): v for k, v in sd.items()}


def load_full_model_state(module: nn.Module, state: dict[str, torch.Tensor], info: RankInfo) -> None:
    """Load a full state dict (official names) into the (possibly sharded) training wrapper, strictly.

    Distributed: only rank 0 needs the tensors (the others pass an empty dict); they are broadcast
    and sharded one by one, so no other rank ever holds the whole model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from .lora import is_lora_module, load_adapter_state

    if is_lora_module(module):
        return load_adapter_state(module, state, info)
    if info.distributed and not info.is_main:
        state = {}
    result = set_model_state_dict(module, {MODEL_PREFIX + k: v for k, v in state.items()},
                                  options=StateDictOptions(full_state_dict=True, strict=True,
                                                           broadcast_from_rank0=info.distributed))
    missing = getattr(result, "missing_keys", [])
    unexpected = getattr(result, "unexpected_keys", [])
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def read_official_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an official checkpoint folder (single file or shards), float32, vqmodel keys dropped."""
    from ..weights import read_state_dict

    return read_state_dict(folder, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Finding checkpoints and checking them before a resume

def checkpoint_root(out_dir: str | Path) -> Path:
    """``<out>/checkpoints``."""
    return Path(out_dir) / CHECKPOINTS_DIR


def step_of(folder: Path) -> int:
    """The step a ``step_NNNNNNN`` folder holds."""
    match = STEP_NAME.fullmatch(folder.name)
    if match is None:
        raise ValueError(f"{folder} is not a checkpoint folder name (step_NNNNNNN)")
    return int(match.group(1))


def step_folders(out_dir: str | Path) -> list[Path]:
    """Every ``step_NNNNNNN`` folder of a run, oldest first (temporary and set-aside folders excluded)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name)), key=step_of)


def is_sharded(folder: Path) -> bool:
    """True for a torch.distributed.checkpoint (sharded) checkpoint, False for a full-state one."""
    return (folder / SHARDED_METADATA_FILE).is_file()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


def _sharded_problem(folder: Path) -> str | None:
    """A missing or short shard file of a sharded checkpoint (as its metadata lists them), or None."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata makes the checkpoint unusable
        return f"{SHARDED_METADATA_FILE} is unreadable ({_one_line(e)})"
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            return f"shard {name} is missing"
        if path.stat().st_size < size:
            return f"shard {name} is truncated ({path.stat().st_size} of {size} bytes)"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (a missing, short or unreadable file), or None when it is intact.

    Every file is opened and its index read (safetensors header, zip directories, shard sizes);
    tensor bytes are not checksummed, so a bit flip inside a tensor is not found here.
    """
    from safetensors import safe_open

    if not folder.is_dir():
        return "the folder is gone"
    try:
        int(json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))["step"])
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (ValueError, KeyError, TypeError) as e:
        return f"{STATE_FILE} is unreadable ({_one_line(e)})"
    sharded = is_sharded(folder)
    for name in (SCHEDULER_FILE, RNG_FILE) + (() if sharded else (OPTIMIZER_FILE,)):
        if not (folder / name).is_file():
            return f"no {name}"
        try:  # mmap: the zip directory is read, the tensors (GBs for the optimizer) are not
            load_torch_file(folder / name, "a training checkpoint's state", mmap=True)
        except Exception as e:  # noqa: BLE001
            return f"{name} is unreadable ({_one_line(e)})"
    if sharded:
        return _sharded_problem(folder)
    if not (folder / MODEL_FILE).is_file():
        return f"no {MODEL_FILE} (nor a sharded {SHARDED_METADATA_FILE})"
    try:
        with safe_open(str(folder / MODEL_FILE), framework="pt", device="cpu") as handle:
            names = list(handle.keys())
        if not names:
            return f"{MODEL_FILE} holds no tensors"
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError alike
        return f"{MODEL_FILE} is unreadable ({_one_line(e)})"
    return None


@dataclass
class ResumePoint:
    """Where a run starts: a checkpoint (or None: the initial weights), why, and what it may prune."""

    folder: Path | None
    note: str = ""                                         # why this folder, when `latest` names another
    prunable: list[Path] = field(default_factory=list)     # this run's history: the resumed checkpoint and older
    damaged: list[Path] = field(default_factory=list)      # newer checkpoints that are not intact


def choose_resume(out_dir: str | Path, resume: str) -> ResumePoint:
    """The checkpoint to resume from for ``--resume auto | never | FOLDER``; raises InputError when none is usable.

    auto: the newest intact ``step_*`` folder (a ``latest`` pointer to a missing or damaged one is
    reported, not followed); nothing intact while checkpoints (or a pointer) exist is an error, not
    a silent restart. Only checkpoints older than the resumed one may be pruned later: newer ones
    this run did not write are set aside, never deleted.
    """
    root = checkpoint_root(out_dir)
    folders = step_folders(out_dir)
    if resume == "never":
        if folders:
            raise InputError(f"{root} already holds checkpoints ({', '.join(f.name for f in folders)}); "
                             "--resume never would overwrite them: use another --out, or --resume auto")
        return ResumePoint(None)
    if resume != "auto":
        folder = Path(resume)
        problem = checkpoint_problem(folder)
        if problem is not None:
            raise InputError(f"--resume {folder}: cannot resume from it: {problem}")
        same_run = folder.parent.resolve() == root.resolve()
        return ResumePoint(folder, prunable=[f for f in folders if same_run and step_of(f) <= step_of(folder)])
    pointer = root / LATEST_FILE
    named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    damaged: list[tuple[Path, str]] = []
    for folder in reversed(folders):
        problem = checkpoint_problem(folder)
        if problem is not None:
            damaged.append((folder, problem))
            continue
        reasons = [f"{f.name} is damaged ({why})" for f, why in damaged]
        if named is not None and named != folder.name and not (root / named).is_dir():
            reasons.insert(0, f"{LATEST_FILE} names {named}, which is gone")
        elif named is not None and named != folder.name and not damaged:
            reasons.append(f"{LATEST_FILE} still names {named} (killed between the save and the pointer?)")
        note = f"resuming from {folder.name}, the newest intact checkpoint: " + "; ".join(reasons) if reasons else ""
        return ResumePoint(folder, note, prunable=[f for f in folders if step_of(f) <= step_of(folder)],
                           damaged=[f for f, _ in damaged])
    if damaged or named is not None:
        found = [f"{f.name}: {why}" for f, why in damaged] or [f"{LATEST_FILE} names {named}, which is gone"]
        raise InputError(f"nothing intact to resume from in {root} ({'; '.join(found)}); repair them, or start "
                         "over in another --out (or with --resume never after removing them)")
    return ResumePoint(None)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest intact checkpoint folder of a run, or None."""
    for folder in reversed(step_folders(out_dir)):
        if checkpoint_problem(folder) is None:
            return folder
    return None


def set_aside(folders: list[Path]) -> None:
    """Rename damaged checkpoints to ``step_NNNNNNN.damaged[.K]``: kept for a look, never resumed or overwritten."""
    for folder in folders:
        target, n = folder.with_name(folder.name + ".damaged"), 1
        while target.exists():
            target, n = folder.with_name(f"{folder.name}.damaged.{n}"), n + 1
        os.replace(folder, target)
        logger.warning("set aside the damaged checkpoint %s as %s", folder, target.name)


def start_run_folder(out_dir: str | Path) -> None:
    """Before a run (rank 0): remove the temporary folders a killed save left behind."""
    for stale in remove_stale_temp_folders(checkpoint_root(out_dir)):
        logger.warning("removed %s, left by a save that did not finish", stale)


# --------------------------------------------------------------------------------------------
# Save / resume

def _save_sharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its own shard of the weights and the AdamW state (collective); nothing is gathered."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    # Sharded state dicts hold views of this rank's shards; the writer copies one tensor at a time.
    state = {"model": get_model_state_dict(module), "optimizer": get_optimizer_state_dict(module, optimizer)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)))


@contextlib.contextmanager
def _quiet_single_process(single: bool) -> Iterator[None]:
    """DCP warns on every load without a process group even when asked for one process (no_dist=True)."""
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _load_sharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into this world size's (possibly unsharded) module and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    # The state dicts of this process's layout say what to read; DCP reshards the saved pieces into them.
    state = {"model": get_model_state_dict(module), "optimizer": get_optimizer_state_dict(module, optimizer)}
    single = not torch.distributed.is_initialized()
    with _quiet_single_process(single):
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=single)
    set_model_state_dict(module, state["model"])
    set_optimizer_state_dict(module, optimizer, state["optimizer"])


def _save_full(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer, info: RankInfo) -> None:
    """Full state (one process): model.safetensors with official names and optimizer.pt keyed by name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model_state = full_model_state(module)
    optim_state = get_optimizer_state_dict(module, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        save_safetensors({k: v.contiguous() for k, v in model_state.items()}, folder / MODEL_FILE,
                         metadata={"format": "pt"})
        torch.save(optim_state, folder / OPTIMIZER_FILE)


def save_checkpoint(out_dir: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: dict[str, Any], info: RankInfo, keep: int = 2,
                    prunable: list[Path] | None = None) -> Path:
    """Write a training checkpoint atomically (collective: every rank must call it); returns its folder.

    Sharded under FSDP (world size > 1), full state otherwise. `prunable` lists this run's older
    checkpoints: the oldest of them are removed so that `keep` remain (the new one included; 0:
    keep all), and the new folder is appended to it. Nothing outside that list is ever removed.
    """
    root = checkpoint_root(out_dir)
    name = f"step_{state['step']:07d}"
    final = root / name
    from .lora import is_lora_module

    sharded = info.distributed and not is_lora_module(module)  # LoRA: every rank holds the same small adapter
    tmp = None
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}.{os.getpid()}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(mode=folder_mode())
    if sharded:
        tmp = broadcast_object(tmp, info)
    try:
        with writing(final):  # the folder the user knows; the temp folder goes in any case
            if sharded:
                _save_sharded(tmp, module, optimizer)
            else:
                _save_full(tmp, module, optimizer, info)
            rngs = gather(info, rng_state(info.device))
            if info.is_main:
                torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
                torch.save({"ranks": rngs}, tmp / RNG_FILE)
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
                if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                atomic_write_text(root / LATEST_FILE, name)
    finally:
        if info.is_main and tmp.exists():
            shutil.rmtree(tmp)
    if info.is_main and prunable is not None:
        history = sorted((p for p in prunable if p != final), key=step_of)
        excess = len(history) - (keep - 1) if keep > 0 else 0
        for stale in history[:max(0, excess)]:
            shutil.rmtree(stale, ignore_errors=True)
            prunable.remove(stale)
        if final not in prunable:
            prunable.append(final)
    barrier(info)
    return final


def load_checkpoint(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    info: RankInfo) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from a checkpoint folder; returns its state."""
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    if is_sharded(folder):
        _load_sharded(folder, module, optimizer)
    else:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        reads = info.is_main or not info.distributed  # other ranks receive broadcasts instead of reading files
        load_full_model_state(module, load_file(str(folder / MODEL_FILE)) if reads else {}, info)
        optim_state = load_torch_file(folder / OPTIMIZER_FILE, "the optimizer state") if reads else {}
        set_optimizer_state_dict(module, optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.distributed))
    scheduler.load_state_dict(load_torch_file(folder / SCHEDULER_FILE, "the scheduler state"))
    rngs = load_torch_file(folder / RNG_FILE, "the random generators' state")["ranks"]
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank], info.device)
    else:
        # Another world size: dropout masks cannot continue bit-exactly; the data order still does.
        torch.manual_seed(int(state.get("seed", 0)) + 7919 * state["step"] + info.rank)
    return state


def checkpoint_tensor_names(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Official name -> (shape, dtype) of every weight in a checkpoint (full or sharded), without reading tensors."""
    if is_sharded(folder):
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        prefix = "model." + MODEL_PREFIX
        return {k.removeprefix(prefix): (tuple(m.size), m.properties.dtype)
                for k, m in metadata.items() if k.startswith(prefix)}
    from safetensors import safe_open

    with safe_open(str(folder / MODEL_FILE), framework="pt", device="cpu") as handle:
        return {n: (tuple(handle.get_slice(n).get_shape()), torch.float32) for n in handle.keys()}


def read_checkpoint_tensors(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named weights (official names) of a checkpoint, full or sharded, read alone (one process)."""
    if not is_sharded(folder):
        from safetensors import safe_open

        with safe_open(str(folder / MODEL_FILE), framework="pt", device="cpu") as handle:
            return {n: handle.get_tensor(n) for n in names}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    shapes = checkpoint_tensor_names(folder)
    tensors = {MODEL_PREFIX + n: torch.empty(shapes[n][0], dtype=shapes[n][1]) for n in names}
    # A partial load reads only these tensors' pieces from every rank's shard file.
    with _quiet_single_process(True):
        dcp.load({"model": tensors}, storage_reader=dcp.FileSystemReader(str(folder)),
                 planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    return {k.removeprefix(MODEL_PREFIX): v for k, v in tensors.items()}
