"""`FitOptions`: every setting of `fit`, the single source of its defaults, help and checks.

The `fit` command line is built from these fields (`lumina_core.cli_options`); a field's help is its
`--help` text. `__post_init__` checks the values, so a call from Python is refused the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import InputError

# The one map from a precision name to what the loops compute in (bf16: autocast over float32 master weights).
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
Precision = Literal["bf16", "fp32"]


def _opt(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class FitOptions:
    """Everything `fit` needs (the CLI fills it)."""

    data: str = field(metadata={"help": "folder written by `prepare`"})
    out: str = field(metadata={"help": "run folder: checkpoints/, log.jsonl, samples/"})
    init_from: str | None = _opt(None, "official checkpoint folder to fine-tune ('demo': the embedded model)")
    config: str | None = _opt(None, "config.json (file or folder) or a preset (2b, 7b): train from scratch")
    steps: int | None = _opt(None, "optimizer steps in all (or --epochs)")
    epochs: float | None = _opt(None, "passes over the data in all (or --steps)")
    lr: float = _opt(2e-5, "peak learning rate")
    min_lr: float | None = _opt(None, "end of the cosine (default: --lr, as the official train.sh)")
    warmup_steps: int = _opt(0, "linear warm-up steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (not on norms and biases)")
    clip_grad: float = _opt(4.0, "gradient-norm clipping")
    micro_batch: int = _opt(1, "samples per forward on each process")
    accum: int = _opt(1, "gradient-accumulation micro-batches per step")
    max_seq_len: int = _opt(4096, "tokens per sample at most (longer ones are cut)")
    dropout: float = _opt(0.05, "residual dropout (official 0.05)")
    z_loss_weight: float = _opt(1e-5, "weight of the logsumexp^2 (z) loss")
    uncond_prob: float = _opt(0.1, "probability that a sample drops its prompt (image tokens only; official 0.1)")
    group_by_length: bool = _opt(False, "fill each step with samples of similar length (less padding on mixed data)")
    precision: Precision = _opt("bf16", "bf16: autocast with float32 master weights")
    grad_checkpointing: bool = _opt(True, "recompute each layer's activations in backward (--no-grad-checkpointing "
                                          "keeps them all: more memory)")
    offload_activations: bool = _opt(False, "with checkpointing: keep each layer's saved input in host memory "
                                            "(pinned) until backward (7B, 768 px: 2.3 GiB less on the GPU)")
    loss_chunk: int = _opt(4096, "positions per chunk of the vocabulary projection")
    seed: int = _opt(0, "seed of the data order, dropout and initial weights")
    save_every: int = _opt(1000, "checkpoint every N steps (and at the end)")
    keep: int = _opt(2, "checkpoints of this run to keep (0: all)")
    log_every: int = _opt(1, "log.jsonl record every N steps")
    sample_every: int = _opt(0, "write an image sample every K steps (0: never)")
    sample_prompt: str = _opt("a photo", "prompt of the image samples")
    sample_size: int = _opt(256, "side of the square sample image (px)")
    movqgan: str | None = _opt(None, "MoVQGAN .ckpt for samples (default: movqgan*.ckpt in --init-from)")
    resume: str = _opt("auto", "auto (newest intact checkpoint in --out), never, or a checkpoint folder")
    device: str | None = _opt(None, "cpu, cuda (default: cuda when available)")
    stop_after: int | None = _opt(None, "leave after this many steps of this invocation")
    # LoRA (train/lora.py): adapters on the frozen --init-from model through peft.
    lora_rank: int | None = _opt(None, "train a LoRA of this rank on the frozen --init-from model (checkpoints: "
                                       "adapter only)", flag="--lora", metavar="RANK")
    lora_alpha: float | None = _opt(None, "LoRA alpha (default: the rank, a scale of 1)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input (peft lora_dropout)")
    lora_targets: str = _opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                             "comma-separated projections that get adapters (default: every attention and MLP one)")
    base_quant: str | None = _opt(None, "LoRA: keep the frozen base torchao-quantized (weight-only)",
                                  choices=("int8", "int4"))

    def __post_init__(self) -> None:
        for name in ("micro_batch", "accum", "max_seq_len", "save_every", "log_every", "loss_chunk", "sample_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "keep", "sample_every"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISION_DTYPES:
            raise InputError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {self.precision!r}")
        if not 0.0 <= self.uncond_prob <= 1.0:
            raise InputError(f"uncond_prob must lie in [0, 1], got {self.uncond_prob}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.lr <= 0 or (self.min_lr is not None and self.min_lr < 0):
            raise InputError(f"lr must be > 0 and min_lr >= 0, got {self.lr} and {self.min_lr}")
        if (self.init_from is None) == (self.config is None):
            raise InputError("fit needs exactly one of --init-from (an official checkpoint folder) or --config "
                             "(config.json or a preset)")
        if (self.steps is None) == (self.epochs is None):
            raise InputError("fit needs exactly one of --steps or --epochs")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise InputError(f"--steps must be >= 1 and --epochs > 0, got {self.steps} and {self.epochs}")
        if self.stop_after is not None and self.stop_after < 1:
            raise InputError(f"stop_after must be >= 1, got {self.stop_after}")
        if self.offload_activations and not self.grad_checkpointing:
            raise InputError("--offload-activations moves the checkpointed layer inputs to host memory; it needs "
                             "gradient checkpointing (drop --no-grad-checkpointing)")
        if self.lora_rank is not None or self.base_quant is not None:
            from .lora import check_lora_options

            check_lora_options(self.lora_rank if self.lora_rank is not None else 0, self.lora_alpha, self.lora_dropout,
                               self.targets, self.base_quant, self.init_from)

    @property
    def targets(self) -> tuple[str, ...]:
        """The LoRA target projections, parsed from --lora-targets."""
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def dtype(self) -> torch.dtype:
        """What the forward computes in (the master weights stay float32)."""
        return PRECISION_DTYPES[self.precision]
