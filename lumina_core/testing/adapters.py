"""Random peft-format LoRA adapters for a model folder (tests and benches, not the runtime)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from ..config import ModelConfig
from ..fileio import atomic_write_bytes, atomic_write_text
from ..lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, DEFAULT_TARGETS, PEFT_PREFIX, adapter_config_dict
from ..model import build_transformer


def write_random_adapter(out: str | Path, model_folder: str | Path, rank: int = 4, alpha: float | None = None,
                         targets: Iterable[str] = DEFAULT_TARGETS, seed: int = 0, std: float = 0.05,
                         rename: dict[str, str] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors with random A, B for every targeted linear.

    `rename` replaces substrings of module names (to make an adapter that targets modules the model lacks).
    """
    from safetensors.torch import save

    targets = tuple(targets)
    config = ModelConfig.from_pretrained(model_folder)
    with torch.device("meta"):
        model = build_transformer(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in targets:
            for old, new in (rename or {}).items():
                name = name.replace(old, new)
            down = torch.randn(rank, module.in_features, generator=generator) * std
            up = torch.randn(module.out_features, rank, generator=generator) * std
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = down
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = up
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    adapter_config = adapter_config_dict(rank, alpha if alpha is not None else rank, 0.0, targets,
                                         base_model=str(model_folder))
    atomic_write_bytes(folder / ADAPTER_WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / ADAPTER_CONFIG_FILE, json.dumps(adapter_config, indent=2))
    return folder
