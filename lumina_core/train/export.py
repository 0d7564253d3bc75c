"""`train export`: a training checkpoint (full or sharded) -> an official HF-format model folder.

The folder holds config.json, sharded safetensors with their index, the tokenizer files, the
starting model's ``sampling_defaults.json`` (sizes, cfg, guidance, top-k the model was made for:
without it a fine-tune of the demo would sample at the 7B's 768x768, cfg 4, top-k 4096) and,
optionally, the MoVQGAN checkpoint. Tensors are read one output shard at a time, so exporting a
7B never holds the whole model, also from a sharded FSDP checkpoint.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import InputError
from ..defaults import DEFAULTS_FILE as SAMPLING_DEFAULTS_FILE  # read by the CLI and the nodes
from ..fileio import atomic_path
from ..weights import official_order, write_weights
from .checkpoint import (CHECKPOINTS_DIR, STATE_FILE, checkpoint_problem, checkpoint_tensor_names, choose_resume,
                         read_checkpoint_tensors)
from .files import copy_file, writing

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder's newest intact checkpoint; InputError for anything else."""
    path = Path(path)
    if (path / CHECKPOINTS_DIR).is_dir():  # a run folder: take its newest intact checkpoint
        point = choose_resume(path, "auto")
        if point.folder is None:
            raise InputError(f"{path} is a run folder without a checkpoint yet; let `fit` save one first")
        if point.note:
            logger.warning("%s", point.note.replace("resuming from", "exporting"))
        return point.folder
    if not path.is_dir():
        raise InputError(f"{path} does not exist; give a run folder (--out of `fit`) or one of its checkpoints")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise InputError(f"{path} is not a training checkpoint ({problem}); give a run folder (--out of `fit`) "
                         f"or one of its {CHECKPOINTS_DIR}/step_* folders")
    return path


def export_official(checkpoint: str | Path, out_folder: str | Path, tokenizer_dir: str | Path | None = None,
                    dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5_000_000_000,
                    movqgan: str | Path | None = None) -> Path:
    """Write config.json, sharded safetensors + index, tokenizer files and sampling defaults: an official folder.

    With `movqgan`, that .ckpt is copied in too, so the folder alone is enough for the Loader node.
    """
    from .data import TOKENIZER_FILES

    checkpoint = resolve_checkpoint(checkpoint)
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    config = ModelConfig(**state["model_config"])
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else (
        Path(state["tokenizer_dir"]) if state.get("tokenizer_dir") else None)
    if tok is None or not (tok / "tokenizer.json").is_file():
        raise InputError(f"no tokenizer files to copy (looked in {tok}); pass --tokenizer MODEL_FOLDER")
    if movqgan is not None and not Path(movqgan).is_file():
        raise InputError(f"MoVQGAN checkpoint not found: {movqgan}")
    out = Path(out_folder)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                copy_file(tok / name, out / name)
        defaults = _sampling_defaults_source(state, tok)
        if defaults is not None:
            copy_file(defaults, out / SAMPLING_DEFAULTS_FILE)
        if movqgan is not None:
            with atomic_path(out / Path(movqgan).name) as tmp:
                copy_file(Path(movqgan), tmp)
        shapes = {name: shape for name, (shape, _) in checkpoint_tensor_names(checkpoint).items()}
        # config.json is written last: a folder with it is complete.
        write_weights(out, shapes, LayerReader(checkpoint, list(shapes)), _official_config(config, state, tok, dtype),
                      dtype=dtype, max_shard_bytes=max_shard_bytes)
    return out


class LayerReader:
    """`read(name)` for the weights writer: reads a checkpoint one decoder layer (or root group) at a time.

    A sharded checkpoint is read through torch.distributed.checkpoint, one layer's pieces per call,
    so memory holds one output shard plus one layer, never the whole model.
    """

    def __init__(self, checkpoint: Path, names: list[str]) -> None:
        self.checkpoint = checkpoint
        self.groups: dict[tuple[int, int], list[str]] = {}
        for name in names:
            self.groups.setdefault(official_order(name)[:2], []).append(name)
        self.cached: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None

    def __call__(self, name: str) -> torch.Tensor:
        group = official_order(name)[:2]
        if self.cached is None or self.cached[0] != group:
            self.cached = None  # drop the previous layer before reading the next
            self.cached = (group, read_checkpoint_tensors(self.checkpoint, self.groups[group]))
        return self.cached[1][name]


def _sampling_defaults_source(state: dict[str, Any], tokenizer_dir: Path) -> Path | None:
    """The starting model's sampling_defaults.json (the model a fine-tune started from), if it has one."""
    init_from = (state.get("options") or {}).get("init_from")
    for folder in (Path(init_from) if init_from else None, tokenizer_dir):
        if folder is not None and (folder / SAMPLING_DEFAULTS_FILE).is_file():
            return folder / SAMPLING_DEFAULTS_FILE
    return None


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
