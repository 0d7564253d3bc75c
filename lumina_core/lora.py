"""LoRA adapters in the peft format: load, check against a transformer, apply beside its linears with a
strength (plain or torchao-quantized; never merged into the weight), remove.

A peft adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<official module name>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r].
Applied, a targeted linear becomes a `LoraLinear`: ``y = base(x) + sum_i s_i * B_i (A_i x)`` with
``s_i = strength_i * alpha_i / r_i``. The base linear object (and its possibly quantized weight) is
kept untouched inside, so removing an adapter is putting the base module back.

`install(transformer, stack)` makes a transformer carry exactly one stack of (adapter, strength):
pipelines that share a transformer (ComfyUI's LoRA node returns a new pipeline over the same
weights) each re-install their own stack before generating, and nothing happens when it is already
there. Inside ComfyUI the node hands the same wrapper modules to ModelPatcher as object patches,
so ComfyUI installs and restores them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The official names of the attention and MLP projections inside each decoder layer.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Adapters shipped with the pack (demo_bar: the demo's "bar" lesson from bench/lora_demo.py); the LoRA
# node lists them after models/loras, and `--lora demo_bar` takes one by name.
BUILTIN_LORA_DIR = Path(__file__).resolve().parent / "assets" / "demo_loras"
# Strength slider / --lora PATH:STRENGTH bounds (ComfyUI's own LoRA loader allows a wide range too).
STRENGTH_RANGE = (-10.0, 10.0)

LoraStack = list  # [(LoraAdapter, strength), ...] in application order


@dataclass(eq=False)
class LoraAdapter:
    """A loaded adapter: per targeted module (official name) its down (A [r, in]) and up (B [out, r]) matrices."""

    path: Path
    alpha: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    use_rslora: bool = False
    config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The adapter's folder name (or file stem of a lone .safetensors)."""
        return adapter_name(self.path)

    @property
    def rank(self) -> int:
        """The largest rank over the targeted modules."""
        return max(a.shape[0] for a, _ in self.modules.values())

    def scale(self, module_name: str) -> float:
        """alpha / r of one module (alpha / sqrt(r) for rsLoRA), as peft scales it."""
        r = self.modules[module_name][0].shape[0]
        return self.alpha / (math.sqrt(r) if self.use_rslora else r)

    def delta(self, module_name: str, strength: float = 1.0) -> torch.Tensor:
        """The float32 weight update strength * scale * B @ A of one module [out, in]."""
        down, up = self.modules[module_name]
        return (up.float() @ down.float()) * (strength * self.scale(module_name))


def adapter_config_dict(rank: int, alpha: float, dropout: float, targets: Iterable[str],
                        base_model: Optional[str] = None) -> dict:
    """The adapter_config.json peft writes for a LoRA of these settings (peft reads it back)."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "r": int(rank),
            "lora_alpha": float(alpha), "lora_dropout": float(dropout), "target_modules": sorted(targets),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None}


def adapter_name(path: Path) -> str:
    """How an adapter is named to users: its folder (peft layout) or the stem of a lone .safetensors."""
    if path.name == ADAPTER_WEIGHTS_FILE:
        return path.parent.name
    return path.stem if path.suffix == ".safetensors" else path.name


def check_strength(strength: float) -> float:
    """The strength as a float, or an InputError when it is not a finite number in STRENGTH_RANGE."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise InputError(f"LoRA strength {strength!r} is not a number") from None
    low, high = STRENGTH_RANGE
    if not (math.isfinite(value) and low <= value <= high):
        raise InputError(f"LoRA strength {strength!r} is out of range: allowed {low} to {high}")
    return value


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:STRENGTH]`` (command line) -> (path, strength); strength defaults to 1."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, check_strength(float(tail))
        except ValueError:
            if any(c.isdigit() for c in tail) and "/" not in tail and "\\" not in tail:
                raise InputError(f"--lora {text!r}: the strength after ':' must be a number in "
                                 f"{STRENGTH_RANGE[0]}..{STRENGTH_RANGE[1]}") from None
    return text, 1.0


def check_lora_args(specs: Iterable[str] | None) -> None:
    """Every ``--lora PATH[:STRENGTH]`` names a readable-looking adapter: checked before the model loads,
    so a wrong path fails in a second, not after minutes of loading (the files are read when applied)."""
    for spec in specs or ():
        _adapter_files(Path(parse_lora_arg(spec)[0]))


def load_lora_args(pipe, specs: Iterable[str] | None):
    """Apply every ``--lora PATH[:STRENGTH]`` of a command line to a pipeline, in order; returns it."""
    for spec in specs or ():
        path, strength = parse_lora_arg(spec)
        pipe.load_lora(path, strength)
    return pipe


def lora_labels(specs: Iterable[str]) -> list[str]:
    """``name:strength`` of each ``--lora`` spec (for PNG metadata: no local paths)."""
    labels = []
    for spec in specs:
        path, strength = parse_lora_arg(spec)
        labels.append(f"{adapter_name(Path(path))}:{strength:g}")
    return labels


def shipped_adapters() -> list[str]:
    """Names of the adapters that ship with the pack (folders of BUILTIN_LORA_DIR), e.g. 'demo_bar'."""
    if not BUILTIN_LORA_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_LORA_DIR.iterdir() if (p / ADAPTER_WEIGHTS_FILE).is_file())


def _adapter_files(path: Path) -> tuple[Path, Optional[Path]]:
    """(weights file, config file or None) of an adapter folder or a lone .safetensors file; a bare name that
    is no file here but a shipped adapter's (`shipped_adapters`) means that one, as `--model demo` does."""
    if not path.exists() and str(path) in shipped_adapters():
        path = BUILTIN_LORA_DIR / str(path)
    if path.is_dir():
        weights = path / ADAPTER_WEIGHTS_FILE
        if not weights.is_file():
            bins = sorted(p.name for p in path.glob("adapter_model*"))
            hint = f" (found {', '.join(bins)}: only safetensors is read, pickles never)" if bins else ""
            raise InputError(f"{path} is not a LoRA adapter folder: no {ADAPTER_WEIGHTS_FILE}{hint}")
    elif path.is_file():
        weights = path
    else:
        shipped = ", ".join(shipped_adapters()) or "none"
        raise InputError(f"LoRA adapter not found: {path} (give an adapter folder or its .safetensors file; "
                         f"shipped with the pack, by name: {shipped})")
    if weights.suffix != ".safetensors":
        raise InputError(f"{weights.name}: LoRA files must be .safetensors (pickled .bin/.pt/.ckpt files are "
                         "refused, never unpickled)")
    config = weights.parent / ADAPTER_CONFIG_FILE
    return weights, config if config.is_file() else None


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read a peft LoRA adapter (folder, or its .safetensors with the config beside it or in its metadata)."""
    from safetensors import SafetensorError, safe_open

    weights, config_file = _adapter_files(Path(path))
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    with handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if config_file is not None:
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{config_file}: not valid JSON ({e})") from None
    elif "adapter_config" in metadata:
        config = json.loads(metadata["adapter_config"])
    else:
        raise InputError(f"{weights}: no {ADAPTER_CONFIG_FILE} beside it and no adapter config in its metadata "
                         "(lora_alpha unknown)")
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise InputError(f"{weights}: adapter config is not a LoRA (peft_type {config.get('peft_type')!r})")
    if config.get("use_dora"):
        raise InputError(f"{weights}: DoRA adapters are not supported (use_dora is set)")
    if config.get("alpha_pattern"):
        raise InputError(f"{weights}: per-module alpha_pattern is not supported")
    try:
        alpha = float(config.get("lora_alpha", config.get("r", 8)))
    except (TypeError, ValueError):
        raise InputError(f"{weights}: lora_alpha {config.get('lora_alpha')!r} is not a number") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):
                if name.endswith(suffix):
                    pairs.setdefault(name.removesuffix(suffix), {})[part] = tensor
                    break
            else:
                continue
            break
        else:
            raise InputError(f"{weights}: tensor {key!r} is not a LoRA matrix (expected "
                             f"{PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
    if not pairs:
        raise InputError(f"{weights}: holds no LoRA matrices")
    modules = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise InputError(f"{weights}: module {name} has only {', '.join(pair)} (needs lora_A and lora_B)")
        down, up = pair["lora_A"], pair["lora_B"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1] or down.shape[0] < 1:
            raise InputError(f"{weights}: module {name}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} "
                             "are not a rank-r pair [r, in], [out, r]")
        modules[name] = (down, up)
    return LoraAdapter(path=weights, alpha=alpha, modules=modules, use_rslora=bool(config.get("use_rslora")),
                       config=config)


def base_of(module: nn.Module) -> nn.Module:
    """The plain (or quantized) linear under a LoraLinear, or the module itself."""
    return module.base if isinstance(module, LoraLinear) else module


def check_adapter(adapter: LoraAdapter, transformer: nn.Module) -> None:
    """InputError naming the first target that is no linear of this transformer or whose shapes differ."""
    for name, (down, up) in adapter.modules.items():
        try:
            module = base_of(transformer.get_submodule(name))
        except AttributeError:
            raise InputError(f"LoRA {adapter.name}: target {name} is not a module of this model (an adapter for "
                             "another base model?)") from None
        if not isinstance(module, nn.Linear):
            raise InputError(f"LoRA {adapter.name}: target {name} is a {type(module).__name__}, not a linear layer")
        if down.shape[1] != module.in_features or up.shape[0] != module.out_features:
            raise InputError(f"LoRA {adapter.name}: {name} is {module.in_features} -> {module.out_features} in this "
                             f"model, the adapter's is {down.shape[1]} -> {up.shape[0]} (an adapter for another "
                             "base model size?)")


class LoraLinear(nn.Module):
    """A linear (plain or torchao-quantized, left as it is) with low-rank updates computed beside it."""

    def __init__(self, base: nn.Module, entries: list[tuple[LoraAdapter, float]], module_name: str) -> None:
        super().__init__()
        self.base = base
        weight = base.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.scales: list[float] = []
        for i, (adapter, strength) in enumerate(entries):
            down, up = adapter.modules[module_name]
            # Not persistent: the model's state dict keeps its official names; .to() still moves them.
            self.register_buffer(f"lora_down_{i}", down.to(weight.device, dtype), persistent=False)
            self.register_buffer(f"lora_up_{i}", up.to(weight.device, dtype), persistent=False)
            self.scales.append(strength * adapter.scale(module_name))
        self.stack_key = stack_key(entries)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (unchanged by the adapters)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales and self.lora_down_0.device != x.device:
            # Made while the base sat on another device (ComfyUI offload); follow the input once.
            for name, buffer in list(self._buffers.items()):
                self._buffers[name] = buffer.to(x.device)
        out = self.base(x)
        for i, scale in enumerate(self.scales):
            down, up = getattr(self, f"lora_down_{i}"), getattr(self, f"lora_up_{i}")
            out = out + (F.linear(F.linear(x.to(down.dtype), down), up) * scale).to(out.dtype)
        return out


def stack_key(entries: Iterable[tuple[LoraAdapter, float]]) -> tuple:
    """Identity of a stack as applied to one module: which adapter objects, at which strengths, in order."""
    return tuple((id(adapter), float(strength)) for adapter, strength in entries)


def entries_for(stack: LoraStack, module_name: str) -> list[tuple[LoraAdapter, float]]:
    """The stack's adapters that target one module."""
    return [(adapter, strength) for adapter, strength in stack if module_name in adapter.modules]


def lora_modules(get_module: Callable[[str], nn.Module], stack: LoraStack,
                 names: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Module to install at each targeted name (plus `names`): a LoraLinear, or the base where nothing targets it."""
    wanted = dict.fromkeys([*names, *(n for adapter, _ in stack for n in adapter.modules)])
    out = {}
    for name in wanted:
        base = base_of(get_module(name))
        entries = entries_for(stack, name)
        out[name] = LoraLinear(base, entries, name) if entries else base
    return out


def wrapped_names(transformer: nn.Module) -> list[str]:
    """Names of the modules that are LoraLinear now."""
    return [name for name, m in transformer.named_modules() if isinstance(m, LoraLinear)]


def install(transformer: nn.Module, stack: LoraStack) -> bool:
    """Make `transformer` carry exactly `stack` (others' adapters removed); True when a module was swapped."""
    changed = False
    names = dict.fromkeys([*wrapped_names(transformer), *(n for adapter, _ in stack for n in adapter.modules)])
    for name in names:
        current = transformer.get_submodule(name)
        entries = entries_for(stack, name)
        if getattr(current, "stack_key", ()) == stack_key(entries):
            continue
        base = base_of(current)
        transformer.set_submodule(name, LoraLinear(base, entries, name) if entries else base)
        changed = True
    return changed


def merged_weight(weight: torch.Tensor, adapter: LoraAdapter, module_name: str, strength: float = 1.0) -> torch.Tensor:
    """weight + strength * delta in float32 (for `train export --merge`, plain weights only)."""
    return weight.float() + adapter.delta(module_name, strength)


def file_size(adapter: LoraAdapter) -> int:
    """Bytes of the adapter's safetensors file."""
    return adapter.path.stat().st_size
