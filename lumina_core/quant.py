"""Weight quantization (torchao) and the choice of kernel per device, GPU capability and installed packages.

Decoding reads every weight once per step for 2 rows (plain CFG) or 2 x window rows (SJD), so
the step is bound by weight bytes, and the kernel decides whether fewer bytes become less time:
torch's own int4 kernel (tinygemm, "tile-packed" layout) is fine at 2 rows but slow at SJD's 32.
`choose_kernels` lists, fastest first for those shapes, the kernels this machine can run; the
first one that quantizes is used, the choice is logged once, a failure falls back to the next one
with a warning. The optional kernels come with `pip install lumina-mgpt2[cuda-kernels]`.
"""
from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUANT_MODES = ("int8", "int4", "fp8")
INT4_GROUP_SIZE = 128


@dataclass(frozen=True)
class Kernel:
    """One way to run a quantized linear: the torchao config that selects it and what it needs."""

    name: str
    quant: str
    device: str                                   # "cuda" or "cpu"
    summary: str
    package: Optional[str] = None                 # pip distribution it needs beyond torch + torchao
    min_capability: Optional[tuple[int, int]] = None

    def config(self, group_size: int = INT4_GROUP_SIZE):
        """The torchao config that quantizes a linear for this kernel."""
        import torchao.quantization as tq

        if self.name == "int8-weight-only":
            return tq.Int8WeightOnlyConfig()
        if self.name == "int4-gemlite":
            from torchao.prototype.quantization.quant_api import UIntxWeightOnlyConfig
            return UIntxWeightOnlyConfig(group_size=group_size, bit_width=4)
        if self.name == "int4-preshuffled":
            return tq.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="preshuffled")
        if self.name == "int4-tile-packed":
            return tq.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
        if self.name == "int4-intx":
            from torchao.quantization.granularity import PerGroup
            return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
        if self.name == "fp8-rowwise":
            from torchao.quantization.granularity import PerRow
            return tq.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        if self.name == "fp8-weight-only":
            return tq.Float8WeightOnlyConfig()
        raise ValueError(f"no torchao config for kernel {self.name!r}")


# Fastest first for the decode shapes (2 and 32 rows), per quantization and device. Order from
# published small-batch figures (Marlin-class int4 ~3x bf16 at 2 rows, ~2.3x at 32; tinygemm slow
# at 32 rows; fp8 row-wise ~1.2x bf16); `bench/gpu.sh` prints the per-kernel table that checks it.
KERNELS: tuple[Kernel, ...] = (
    Kernel("int4-gemlite", "int4", "cuda", "GemLite Triton int4 (groups of 128)", "gemlite", (8, 0)),
    Kernel("int4-preshuffled", "int4", "cuda", "torchao int4, fbgemm preshuffled layout", "fbgemm-gpu-genai", (9, 0)),
    Kernel("int4-tile-packed", "int4", "cuda", "torchao int4, tile-packed layout (torch's tinygemm)", None, (8, 0)),
    Kernel("int4-intx", "int4", "cpu", "torchao IntxWeightOnly int4 per group"),
    Kernel("int8-weight-only", "int8", "cuda", "torchao Int8WeightOnly per channel"),
    Kernel("int8-weight-only", "int8", "cpu", "torchao Int8WeightOnly per channel"),
    Kernel("fp8-rowwise", "fp8", "cuda", "fp8 e4m3 weights and activations, row-wise scales (sm89+)", None, (8, 9)),
    Kernel("fp8-weight-only", "fp8", "cuda", "fp8 e4m3 weights, dequantized into bf16 matmuls"),
    Kernel("fp8-weight-only", "fp8", "cpu", "fp8 e4m3 weights, dequantized into the activation dtype"),
)
OPTIONAL_PACKAGES = tuple(sorted({k.package for k in KERNELS if k.package}))


def installed_packages(names: Iterable[str] = OPTIONAL_PACKAGES) -> frozenset[str]:
    """Which of the optional kernel packages are installed (by pip distribution name)."""
    found = set()
    for name in names:
        try:
            importlib.metadata.distribution(name)
            found.add(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return frozenset(found)


def gpu_capability(device: torch.device | str) -> Optional[tuple[int, int]]:
    """Compute capability (major, minor) of a CUDA device; None for any other device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def choose_kernels(quant: str, device_type: str, capability: Optional[tuple[int, int]] = None,
                   installed: Iterable[str] = ()) -> list[Kernel]:
    """The kernels that can run `quant` here, fastest first (the first is the choice, the rest are fallbacks).

    `capability` None means unknown (no CUDA runtime to ask): no kernel is ruled out by it.
    """
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quant {quant!r}; supported: None (no quantization), {', '.join(QUANT_MODES)}")
    installed = set(installed)
    usable = [k for k in KERNELS if k.quant == quant and k.device == device_type
              and (k.package is None or k.package in installed)
              and (k.min_capability is None or capability is None or tuple(capability) >= k.min_capability)]
    if not usable:
        need = [k for k in KERNELS if k.quant == quant and k.device == device_type]
        if not need:
            raise ValueError(f"quant={quant!r} is supported on cpu and cuda, not on {device_type}; use quant=None there")
        raise ValueError(f"quant={quant!r} on this GPU (compute capability {capability}) has no kernel; "
                         f"it needs sm{''.join(map(str, min(k.min_capability for k in need)))} or newer")
    return usable


def check_quant(mode: Optional[str], device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise a clear error for combinations we do not support (before any weights are loaded)."""
    if mode is None:
        return
    device = torch.device(device)
    choose_kernels(mode, device.type, gpu_capability(device))
    if mode == "int4" and device.type == "cuda" and dtype != torch.bfloat16:
        raise ValueError(f"int4 on CUDA (torchao int4 kernels) needs dtype=torch.bfloat16, got {dtype}")


_logged: set[tuple] = set()


def _is_plain(weight: torch.Tensor) -> bool:
    return type(weight.data) is torch.Tensor


def quantize_module(module: nn.Module, quant: str, device: Optional[torch.device | str] = None,
                    include_lm_head: bool = False, group_size: int = INT4_GROUP_SIZE,
                    kernel: Optional[str] = None) -> str:
    """Quantize every eligible nn.Linear inside `module` in place for `device`; return the kernel's name.

    Works on a whole transformer or on one decoder layer (the streaming loader quantizes layer by
    layer). `device` (default: where the module's weights are) decides the kernel and is where the
    quantized weights end up; `kernel` forces one by name (benches). lm_head stays high precision
    unless `include_lm_head`; embeddings and norms are never quantized. int4 uses groups of
    `group_size` input channels.
    """
    param = next(module.parameters())
    device = torch.device(device) if device is not None else param.device
    check_quant(quant, device, param.dtype)
    from torchao.quantization import quantize_

    def wanted(m: nn.Module, name: str) -> bool:
        return (isinstance(m, nn.Linear) and (include_lm_head or name != "lm_head")
                and _is_plain(m.weight))  # already quantized by a kernel that failed half way: leave it

    if quant == "int4":
        bad = [name for name, m in module.named_modules() if wanted(m, name) and m.in_features % group_size]
        if bad:
            raise ValueError(f"int4 groups of {group_size} need in_features divisible by {group_size}; "
                             f"not so for {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    candidates = choose_kernels(quant, device.type, gpu_capability(device), installed_packages())
    if kernel is not None:
        candidates = [k for k in candidates if k.name == kernel]
        if not candidates:
            raise ValueError(f"kernel {kernel!r} cannot run quant={quant!r} on this machine")
    for i, choice in enumerate(candidates):
        try:
            quantize_(module, choice.config(group_size), filter_fn=wanted, device=device)
        except (ImportError, RuntimeError, AssertionError, NotImplementedError, ValueError) as e:
            if i + 1 == len(candidates):
                raise
            logger.warning("quant=%s: kernel %s failed (%s); falling back to %s", quant, choice.name,
                           str(e).splitlines()[0][:200], candidates[i + 1].name)
            continue
        key = (quant, device.type, choice.name)
        if key not in _logged:
            _logged.add(key)
            logger.info("quant=%s on %s: kernel %s (%s)", quant, device.type, choice.name, choice.summary)
        return choice.name
    raise AssertionError("unreachable: the candidate list is never empty")


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
