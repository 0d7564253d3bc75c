"""Weight-only quantization (torchao) and the choice of kernel per device and shape."""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUANT_MODES = ("int8", "int4")
INT4_GROUP_SIZE = 128


def check_quant(mode: Optional[str], device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise a clear error for combinations we do not support (before any weights are loaded)."""
    if mode is None:
        return
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quant {mode!r}; supported: None (no quantization), {', '.join(QUANT_MODES)}")
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"quant={mode!r} is supported on cpu and cuda, not on {kind}; use quant=None there")
    if mode == "int4" and kind == "cuda" and dtype != torch.bfloat16:
        raise ValueError(f"int4 on CUDA (torchao Int4WeightOnlyConfig) needs dtype=torch.bfloat16, got {dtype}")


def quantize_module(module: nn.Module, quant: str, device: Optional[torch.device | str] = None,
                    include_lm_head: bool = False, group_size: int = INT4_GROUP_SIZE) -> None:
    """Quantize every eligible nn.Linear inside `module` in place (weight-only), for `device`.

    Works on a whole transformer or on one decoder layer (the streaming loader quantizes layer by
    layer). `device` (default: where the module's weights are) picks the kernel and is where the
    quantized weights end up. lm_head stays high precision unless `include_lm_head`; embeddings and
    norms are never quantized. int8: torchao Int8WeightOnlyConfig (per-channel). int4: groups of
    `group_size` input channels, Int4WeightOnlyConfig on CUDA, IntxWeightOnlyConfig(int4, PerGroup)
    on CPU.
    """
    param = next(module.parameters())
    device = torch.device(device) if device is not None else param.device
    check_quant(quant, device, param.dtype)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    def wanted(m: nn.Module, name: str) -> bool:
        return isinstance(m, nn.Linear) and (include_lm_head or name != "lm_head")

    if quant == "int4":
        bad = [name for name, m in module.named_modules() if wanted(m, name) and m.in_features % group_size]
        if bad:
            raise ValueError(f"int4 groups of {group_size} need in_features divisible by {group_size}; "
                             f"not so for {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
        if device.type == "cuda":
            from torchao.quantization import Int4WeightOnlyConfig
            # The tile-packed layout runs on torch's own tinygemm kernel (aten._weight_int4pack_mm);
            # torchao's default "plain" layout needs the separate fbgemm-gpu-genai package.
            config = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
        else:
            from torchao.quantization import IntxWeightOnlyConfig
            from torchao.quantization.granularity import PerGroup
            config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    else:
        config = Int8WeightOnlyConfig()
    quantize_(module, config, filter_fn=wanted, device=device)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters as stored (quantized tensors count their packed data)."""
    total = 0
    for p in model.parameters():
        data = p.data if isinstance(p, nn.Parameter) else p
        inner = getattr(data, "__tensor_flatten__", None)
        if inner is not None and type(data) is not torch.Tensor:
            names, _ = data.__tensor_flatten__()
            total += sum(getattr(data, n).numel() * getattr(data, n).element_size() for n in names)
        else:
            total += data.numel() * data.element_size()
    return total
