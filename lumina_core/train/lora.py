"""LoRA fine-tuning (`fit --lora RANK`) through `peft`: a frozen base (bf16, fp32, or torchao int8 / int4)
with low-rank adapters on the attention and MLP projections, trained by the same loop and loss.

Why it differs from a full fit: only the adapters train, so the optimizer state and the checkpoints
are megabytes, and every process holds the whole (possibly quantized) base. Under torchrun each
rank keeps a full base replica and the adapter gradients are averaged after backward (data
parallel); FSDP is not needed at LoRA sizes.

Checkpoints (`<out>/checkpoints/step_N`) hold only the adapter tensors (in `model.safetensors`,
under the names peft gives them inside the training wrapper), the AdamW state of those tensors, the
scheduler, RNG and trainer state. `train export` turns one into a peft adapter folder
(`adapter_config.json` + `adapter_model.safetensors`), or with `--merge` into an official-format
model folder with the adapter merged into the base weights.

Quantized bases: peft wraps torchao-quantized linears in `TorchaoLoraLinear`; the gradient flows
through the frozen quantized matmul to the input (checked on CPU for int8 and for int4 with
IntxWeightOnlyConfig). On CUDA, int4 uses the tile-packed tinygemm layout (see quant.py).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import InputError
from ..fileio import atomic_write_bytes, atomic_write_text
from ..lora import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, DEFAULT_TARGETS, PEFT_PREFIX, adapter_config_dict,
                    load_adapter, merged_weight)

logger = logging.getLogger(__name__)

LORA_BASE_QUANTS = ("int8", "int4")
WRAPPER_PREFIX = "transformer."  # TrainingModule holds the transformer under this name


def check_lora_options(rank: int, alpha: float | None, dropout: float, targets: tuple[str, ...],
                       base_quant: str | None, init_from: str | None) -> None:
    """Refuse LoRA settings that cannot train (one-line InputError)."""
    if rank < 1:
        raise InputError(f"--lora RANK must be >= 1, got {rank}")
    if alpha is not None and not alpha > 0:
        raise InputError(f"--lora-alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"--lora-dropout must lie in [0, 1), got {dropout}")
    unknown = sorted(set(targets) - set(DEFAULT_TARGETS))
    if not targets or unknown:
        raise InputError(f"--lora-targets {list(targets)}: allowed projections are {list(DEFAULT_TARGETS)}")
    if base_quant is not None and base_quant not in LORA_BASE_QUANTS:
        raise InputError(f"--base-quant {base_quant!r}: allowed none, {', '.join(LORA_BASE_QUANTS)}")
    if not init_from:
        raise InputError("fit --lora trains adapters for an existing model: give --init-from FOLDER (not --config)")


def lora_alpha(opts: Any) -> float:
    """The adapter's alpha: --lora-alpha, else the rank (a scale of 1)."""
    return float(opts.lora_alpha) if opts.lora_alpha is not None else float(opts.lora_rank)


def peft_config(opts: Any):
    """The `peft.LoraConfig` of a run (targets matched by module name suffix, as peft does)."""
    from peft import LoraConfig

    return LoraConfig(r=opts.lora_rank, lora_alpha=lora_alpha(opts), lora_dropout=opts.lora_dropout,
                      target_modules=list(opts.targets), bias="none")


def lora_base_dtype(opts: Any) -> torch.dtype:
    """The frozen base's storage dtype: bf16 when training in bf16 (autocast), else fp32."""
    return torch.bfloat16 if opts.precision == "bf16" else torch.float32


def build_lora_training_module(cfg: ModelConfig, opts: Any, device: torch.device) -> nn.Module:
    """The training wrapper around a frozen base from --init-from with fresh adapters injected by peft.

    The base is stored in `lora_base_dtype` and optionally quantized (int8 / int4 weight-only);
    adapters are fp32 master weights. lm_head and embeddings stay frozen.
    """
    from ..weights import load_transformer

    # Quantized layer by layer as it loads (int8 / int4 weight-only), so the bf16 base never sits whole in memory.
    transformer = load_transformer(opts.init_from, dtype=lora_base_dtype(opts), device=device, quant=opts.base_quant)
    return attach_lora(transformer, cfg, opts)


def attach_lora(transformer: nn.Module, cfg: ModelConfig, opts: Any) -> nn.Module:
    """Freeze a loaded (maybe quantized) base, inject fresh peft adapters (fp32), wrap it for training."""
    from peft import inject_adapter_in_model

    from .loop import TrainingModule

    transformer.config = cfg  # the same architecture, with the training overrides (dropout, z-loss)
    for layer in transformer.model.layers:
        layer.dropout.p = cfg.dropout
    for p in transformer.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)  # the same initial adapters on every rank and for any world size
        inject_adapter_in_model(peft_config(opts), transformer)
    for name, p in transformer.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    module = TrainingModule(transformer, opts.loss_chunk, opts.grad_checkpointing, opts.offload_activations)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    logger.info("LoRA rank %d (alpha %g) on %s: %d trainable parameters; base %s%s", opts.lora_rank,
                lora_alpha(opts), ",".join(opts.targets), trainable,
                str(lora_base_dtype(opts)).removeprefix("torch."), f" + {opts.base_quant}" if opts.base_quant else "")
    return module.train()


def is_lora_module(module: nn.Module) -> bool:
    """True for a training wrapper with peft adapters injected."""
    return any(".lora_A." in name for name, _ in module.named_parameters())


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors (CPU float32), named as inside the transformer (official module names)."""
    return {name.removeprefix(WRAPPER_PREFIX): p.detach().float().cpu().contiguous()
            for name, p in module.named_parameters() if p.requires_grad}


def load_adapter_state(module: nn.Module, state: dict[str, torch.Tensor], info: Any) -> None:
    """Load adapter tensors saved by `adapter_state` (rank 0's copy broadcast under torchrun), strictly."""
    if info.distributed:
        import torch.distributed as dist

        box = [state if info.is_main else None]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    params = {name.removeprefix(WRAPPER_PREFIX): p for name, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise InputError(f"the checkpoint's adapter does not match this run's --lora settings: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise InputError(f"checkpoint tensor {name} has shape {tuple(state[name].shape)}, this run "
                                 f"expects {tuple(p.shape)} (another --lora rank?)")
            p.copy_(state[name])


def average_adapter_gradients(module: nn.Module, info: Any) -> None:
    """Data parallel LoRA: average the adapter gradients over ranks (one flat all-reduce)."""
    if not info.distributed:
        return
    import torch.distributed as dist

    grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# --------------------------------------------------------------------------------------------
# Export: a peft adapter folder, or the base with the adapter merged in

def _peft_tensors(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint names (`<module>.lora_A.default.weight`) -> peft file names
    (`base_model.model.<module>.lora_A.weight`): official module names, as peft's save_pretrained writes."""
    return {PEFT_PREFIX + name.replace(".default.", "."): tensor.to(dtype).contiguous() for name, tensor in state.items()}


def is_lora_checkpoint(state: dict[str, Any]) -> bool:
    """True when a trainer_state.json belongs to a `fit --lora` run."""
    return bool((state.get("options") or {}).get("lora_rank"))


def shareable_base_name(init_from: str | None) -> str | None:
    """The base model as an adapter file names it: a local folder by its name only (a path would tell everyone
    who gets the file how your disk is laid out), a hub id or 'demo' as given."""
    if init_from and Path(init_from).expanduser().is_dir():
        return Path(init_from).expanduser().resolve().name
    return init_from


def export_adapter(checkpoint: Path, state: dict[str, Any], out: str | Path,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (peft format) from a LoRA checkpoint."""
    from safetensors.torch import load_file, save

    options = state["options"]
    tensors = _peft_tensors(load_file(str(checkpoint / "model.safetensors")), dtype)
    config = adapter_config_dict(rank=options["lora_rank"],
                                 alpha=options["lora_alpha"] if options.get("lora_alpha") else options["lora_rank"],
                                 dropout=options.get("lora_dropout", 0.0), targets=[t for t in str(options["lora_targets"]).split(",") if t],
                                 base_model=shareable_base_name(options.get("init_from")))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    # The config also rides in the file's metadata, so a lone .safetensors (models/loras) still loads.
    atomic_write_bytes(folder / ADAPTER_WEIGHTS_FILE,
                       save(tensors, metadata={"format": "pt", "adapter_config": json.dumps(config)}))
    atomic_write_text(folder / ADAPTER_CONFIG_FILE, json.dumps(config, indent=2))
    load_adapter(folder)  # what was written reads back through the inference loader
    return folder


def export_merged(adapter_folder: str | Path, base: str | Path, out: str | Path,
                  dtype: torch.dtype = torch.bfloat16, strength: float = 1.0) -> Path:
    """An official-format folder: the base with every targeted weight replaced by W + s·(alpha/r)·B·A.

    Written by the one official writer (weights.write_weights), a shard at a time, sharded like the
    base; the base's other files (tokenizer, sampling defaults, MoVQGAN) are copied, so the folder
    loads wherever the base does.
    """
    from safetensors import safe_open

    from ..weights import INDEX_FILE, checkpoint_files, write_weights

    base = Path(base)
    adapter = load_adapter(adapter_folder)
    out = Path(out)
    if out.resolve() == base.resolve():
        raise InputError(f"--out {out} is the base folder; write the merged model elsewhere")
    handles = {file: safe_open(str(file), framework="pt", device="cpu") for file in checkpoint_files(base)}
    file_of = {name: file for file, handle in handles.items() for name in handle.keys()}
    missing = sorted(m for m in adapter.modules if f"{m}.weight" not in file_of)
    if missing:
        raise InputError(f"{adapter.path}: targets {missing[:3]} are not weights of {base} (an adapter for another "
                         "base model?)")

    def read(name: str) -> torch.Tensor:
        tensor = handles[file_of[name]].get_tensor(name)
        module_name = name.removesuffix(".weight")
        return merged_weight(tensor, adapter, module_name, strength) if module_name in adapter.modules else tensor

    shapes = {name: handles[file].get_slice(name).get_shape() for name, file in file_of.items()}
    sharded = (base / INDEX_FILE).is_file()
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    write_weights(out, shapes, read, config, dtype=dtype, max_shard_bytes=5_000_000_000 if sharded else None)
    for item in base.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in ("config.json", INDEX_FILE):
            shutil.copy2(item, out / item.name)
    return out


def export_lora(checkpoint: str | Path, out: str | Path, merge: bool = False, base: str | Path | None = None,
                dtype: torch.dtype = torch.bfloat16) -> Path | None:
    """`train export` of a LoRA run: the peft adapter folder, or with `merge` the merged official folder.

    Returns None when `checkpoint` (a checkpoint or run folder) is not from a `fit --lora` run.
    """
    import tempfile

    from .checkpoint import CHECKPOINTS_DIR, STATE_FILE, latest_checkpoint

    folder = Path(checkpoint)
    if (folder / CHECKPOINTS_DIR).is_dir():
        folder = latest_checkpoint(folder) or folder
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if not is_lora_checkpoint(state):
        if merge:
            raise InputError(f"{folder} is a full fine-tune, not a LoRA run: --merge applies to LoRA checkpoints")
        return None
    if not merge:
        return export_adapter(folder, state, out, dtype=dtype)
    base = Path(base or state["options"]["init_from"])
    if not (base / "config.json").is_file():
        raise InputError(f"base model folder {base} (the run's --init-from) is not there; pass --base FOLDER")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = export_adapter(folder, state, tmp, dtype=torch.float32)
        return export_merged(adapter, base, out, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Memory accounting of a LoRA fit (train-side estimate; printed by bench/lora_memory.py)

GIB = 1024 ** 3
# Per token, the tensors one decoder layer saves for backward while it is recomputed, in units of
# hidden (H) and intermediate (I) elements: normed input, its float32 copy (2), q/k/v before and
# after their norms and RoPE (8), attention output, residual-side norm input, its float32 copy (2),
# normed MLP input (about 17 H); gate, silu(gate), up and their product (4 I).
LAYER_SAVED_H, LAYER_SAVED_I = 17, 4
GRADIENT_IN_FLIGHT = 1.5   # the layer's activation gradients live beside its saved tensors during backward
CUDA_CONTEXT_BYTES = GIB // 2   # CUDA context + cuBLAS workspace, outside torch's allocator


def checkpointed_input_bytes(config: ModelConfig, tokens: int, element_size: int = 2) -> int:
    """Bytes one checkpointed decoder layer saves: its input hidden states [tokens, H] and RoPE cos / sin [tokens, D]."""
    return tokens * (config.hidden_size + 2 * config.head_dim) * element_size


def lora_memory_estimate(config: ModelConfig, seq_len: int, rank: int = 16, targets: tuple[str, ...] = DEFAULT_TARGETS,
                         micro_batch: int = 1, base_quant: str | None = None, loss_chunk: int = 1024,
                         grad_checkpointing: bool = True, include_lm_head: bool = False,
                         offload_activations: bool = False) -> dict[str, float]:
    """Peak device memory (GiB) of one LoRA training step, by part; `total` adds them, `with_context` adds CUDA's own.

    Base in bf16, or int8 / int4 weight-only for the decoder layers' linears (embeddings, norms and
    lm_head stay bf16 unless `include_lm_head`); adapters fp32 with grads and AdamW moments (16 B per
    parameter); gradient checkpointing keeps each layer's inputs (the [tokens, H] hidden states and
    the RoPE cos/sin tables, bf16) and recomputes one layer at a time; with `offload_activations`
    those inputs wait in host memory (`host_checkpointed_inputs`, not in `total`) and one layer's
    are back on the device; attention is plain causal (no mask tensor); the loss projects
    `loss_chunk` positions to the vocabulary at a time (bf16 product, float32 logits and their gradient).
    """
    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    per_weight = {None: 2.0, "int8": 1.0, "int4": 0.5 + 4.0 / 128}   # int4: a bf16 scale + zero per group of 128
    layer_linear = n * sum(a * b for a, b in shapes.values())
    head = v * h * (per_weight[base_quant] if include_lm_head and base_quant else 2.0)
    base = layer_linear * per_weight[base_quant] + v * h * 2.0 + head + n * 4 * h * 2.0
    adapters = n * sum(rank * (a + b) for name, (a, b) in shapes.items() if name in targets) * 16.0
    tokens = seq_len * micro_batch
    layer_working = tokens * (LAYER_SAVED_H * h + LAYER_SAVED_I * i) * 2.0 * GRADIENT_IN_FLIGHT
    one_layer_inputs = checkpointed_input_bytes(config, tokens)
    rope_tables = one_layer_inputs - tokens * h * 2.0
    checkpointed, host = n * (one_layer_inputs - rope_tables) + rope_tables, 0.0   # all layers share one cos / sin
    if not grad_checkpointing:
        checkpointed, layer_working = n * layer_working / GRADIENT_IN_FLIGHT, layer_working
    elif offload_activations:   # each layer's pack copies its inputs, the shared tables included
        checkpointed, host = one_layer_inputs, n * one_layer_inputs
    loss = min(loss_chunk, tokens) * v * (2.0 + 4.0 + 4.0) + tokens * h * 2.0   # + the final hidden states
    parts = {"base_weights": base, "adapters_and_adamw": adapters, "checkpointed_inputs": checkpointed,
             "one_layer_recomputed": layer_working, "loss_chunk": loss}
    out = {k: round(b / GIB, 2) for k, b in parts.items()}
    out["total"] = round(sum(parts.values()) / GIB, 2)
    out["with_context"] = round((sum(parts.values()) + CUDA_CONTEXT_BYTES) / GIB, 2)
    out["host_checkpointed_inputs"] = round(host / GIB, 2)
    return out
