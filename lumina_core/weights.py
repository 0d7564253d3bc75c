"""The one reader and writer of official model folders (config.json + safetensors, single file or shards).

Reading is strict and streaming: tensors go one decoder layer at a time from the (memory-mapped)
files to their final device and dtype, so the bf16 model never exists as a whole in memory; with
`quant` each layer is quantized as soon as it is complete, so the peak is the quantized model plus
one layer in the load dtype. Shard names come only from inside the folder, and every tensor's
dtype and shape are checked against config.json from the file header before its bytes are read.

This module takes folders; resolving repo ids and model names is the hub's job (the pipeline
calls it first).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Optional

import torch
from torch import nn

from .config import ModelConfig
from .errors import InputError
from .fileio import atomic_path, atomic_write_text
from .model import LuminaTransformer, build_transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Keys the official training code may leave in a checkpoint that inference never uses
# (Chameleon's own VQ encoder; deleted before the release was saved).
IGNORED_CHECKPOINT_PREFIXES = ("model.vqmodel.",)
# safetensors header dtype names of the floating types a checkpoint may store weights in.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(InputError):
    """An official model folder whose files cannot be used as they are (the message names the file)."""


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """A file the folder's layout needs is not there."""


# ---------------------------------------------------------------------------------------------
# The folder's files

def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of an official folder: model.safetensors, or the shards its index names."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        return sorted(set(read_index(folder).values()))
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise CheckpointFileMissing(
        f"no weights in {folder}: expected {SINGLE_FILE}, or model-0000N-of-0000M.safetensors shards "
        f"with {INDEX_FILE} (the layout of Alpha-VLLM/Lumina-mGPT-2.0)")


def read_index(folder: str | Path, check_files: bool = True) -> dict[str, Path]:
    """The index's weight_map as tensor name -> shard path; every shard a plain file name inside `folder`
    (and, with `check_files`, present)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{index} is not UTF-8 text; expected a JSON object with a 'weight_map'") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index} is not valid JSON ({e}); expected an object with a 'weight_map'") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        found = type(weight_map).__name__ if isinstance(data, dict) and "weight_map" in data else "none"
        raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to shard file "
                              f"names, found {found}")
    shards: dict[str, Path] = {}
    for name, shard in weight_map.items():
        shards[name] = _shard_path(folder, index, name, shard)
    missing = sorted({p.name for p in shards.values() if not p.is_file()})
    if missing and check_files:
        raise CheckpointFileMissing(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
    return shards


def _shard_path(folder: Path, index: Path, name: str, shard: object) -> Path:
    """A shard name checked as text, before anything is opened: one file name, no folders, no way out."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index}: the shard of {name!r} must be a file name, found {shard!r}")
    parts = PurePosixPath(shard.replace("\\", "/")).parts
    if len(parts) != 1 or parts[0] in (".", "..") or Path(shard).is_absolute() or not shard.endswith(".safetensors"):
        raise CheckpointError(f"{index}: shard {shard!r} of {name!r} is not a .safetensors file name inside "
                              f"the model folder (shards are files beside the index, e.g. "
                              f"model-00001-of-00002.safetensors)")
    return folder / shard


def _open(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e} (the file is truncated or not a safetensors file)") from None


# ---------------------------------------------------------------------------------------------
# Reading

class _TensorIndex:
    """Where each tensor of a folder lives (open handles, header-only until a tensor is read)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.handles: dict[Path, object] = {}
        self.file_of: dict[str, Path] = {}
        for file in checkpoint_files(folder):
            handle = _open(file)
            self.handles[file] = handle
            for name in handle.keys():
                if not name.startswith(IGNORED_CHECKPOINT_PREFIXES):
                    self.file_of[name] = file

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a tensor whose header dtype is not floating or whose shape differs from `shape`."""
        file = self.file_of[name]
        view = self.handles[file].get_slice(name)
        stored, found = view.get_dtype(), tuple(view.get_shape())
        if stored not in FLOAT_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} is stored as {stored}; weights must be floating point "
                                  f"({', '.join(FLOAT_DTYPES)}), not cast from another type")
        if found != shape:
            raise CheckpointError(f"{file.name}: tensor {name} has shape {found}, config.json implies {shape}")

    def read(self, name: str) -> torch.Tensor:
        return self.handles[self.file_of[name]].get_tensor(name)

    def close(self) -> None:
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()


def load_transformer(folder: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                     quant: Optional[str] = None) -> LuminaTransformer:
    """Load an official folder strictly onto `device`, one decoder layer at a time (quantized as it arrives)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointFileMissing(f"model folder {folder} does not exist (resolve names and repo ids with "
                                    "lumina_core.hub.resolve_model or LuminaPipeline.from_pretrained)")
    device = torch.device(device)
    if quant is not None:
        from .quant import check_quant
        check_quant(quant, device, dtype)
    config = ModelConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = build_transformer(config)
    tensors = _TensorIndex(folder)
    try:
        _check_names(folder, set(model.state_dict()), set(tensors.file_of))
        for prefix, group, is_layer in load_groups(model):
            for name, param in group.named_parameters():
                tensors.check(prefix + name, tuple(param.shape))
                # From the mmap'd file to the final device and dtype; the file-dtype copy is freed here.
                _set_tensor(group, name, tensors.read(prefix + name).to(device=device, dtype=dtype))
            if quant is not None and is_layer:
                from .quant import quantize_module
                quantize_module(group, quant, device)
                if device.type == "cpu":
                    from .memory import trim_host_heap
                    trim_host_heap()
    finally:
        tensors.close()
    return model.eval()


def load_groups(model: LuminaTransformer) -> list[tuple[str, nn.Module, bool]]:
    """(name prefix, module, is a decoder layer) in load order: embeddings, each layer, norm, lm_head."""
    layers = [(f"model.layers.{i}.", layer, True) for i, layer in enumerate(model.model.layers)]
    return [("model.embed_tokens.", model.model.embed_tokens, False), *layers,
            ("model.norm.", model.model.norm, False), ("lm_head.", model.lm_head, False)]


def _check_names(folder: Path, expected: set[str], found: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint in {folder} does not match its config.json: "
            f"{len(missing)} missing keys {_preview(missing)}, {len(unexpected)} unexpected keys {_preview(unexpected)}")


def read_state_dict(folder: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of an official folder (vqmodel keys dropped) in `dtype`, after the same checks as a load."""
    folder = Path(folder)
    config = ModelConfig.from_pretrained(folder)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build_transformer(config).state_dict().items()}
    tensors = _TensorIndex(folder)
    try:
        _check_names(folder, set(expected), set(tensors.file_of))
        state = {}
        for name, shape in expected.items():
            tensors.check(name, shape)
            state[name] = tensors.read(name).to(dtype)
        return state
    finally:
        tensors.close()


def _preview(names: list[str], limit: int = 6) -> str:
    if not names:
        return "[]"
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))


# ---------------------------------------------------------------------------------------------
# Writing

def official_order(name: str) -> tuple[int, int, str]:
    """Sort key of the official files: embeddings, layers by index, final norm, lm_head."""
    if name.startswith("model.embed_tokens."):
        return (0, 0, name)
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    if name.startswith("model.norm."):
        return (2, 0, name)
    return (3, 0, name)


def write_weights(folder: str | Path, shapes: Mapping[str, Iterable[int]], read: Callable[[str], torch.Tensor],
                  config: dict, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: Optional[int] = None) -> Path:
    """Write an official folder: safetensors (one file, or shards + index when `max_shard_bytes` is given), config.json.

    `shapes` names every tensor and its shape (to plan the shards before reading); `read(name)` returns
    it. Tensors are read one shard at a time, so a model larger than memory can be written. Every file
    is written atomically, config.json last; model files of an earlier write that are no longer part of
    the folder are removed.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    element = torch.empty((), dtype=dtype).element_size()
    names = sorted(shapes, key=official_order)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = element
        for d in shapes[name]:
            nbytes *= int(d)
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, shard in enumerate(shards, start=1):
        file_name = SINGLE_FILE if max_shard_bytes is None else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: read(n).detach().to("cpu", dtype).contiguous() for n in shard}
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        with atomic_path(folder / file_name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        del tensors
        weight_map.update({n: file_name for n in shard})
    written = set(weight_map.values())
    for stale in folder.glob("model*.safetensors"):
        if stale.name not in written:
            stale.unlink()
    if max_shard_bytes is None:
        (folder / INDEX_FILE).unlink(missing_ok=True)
    else:
        atomic_write_text(folder / INDEX_FILE, json.dumps(
            {"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    config = dict(config)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    return folder


def save_transformer(model: LuminaTransformer, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                     max_shard_bytes: Optional[int] = None) -> Path:
    """Write a model's weights and its config.json as an official folder."""
    state = model.state_dict()
    return write_weights(folder, {n: t.shape for n, t in state.items()}, state.__getitem__,
                         model.config.to_hf_dict(), dtype=dtype, max_shard_bytes=max_shard_bytes)
