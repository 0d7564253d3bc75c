"""What training adds to `lumina_core.dist`: FSDP2 (`fully_shard`) wrapping and the loop's small collectives.

Rank info, the process group (one backend rule), barrier and gather come from `lumina_core.dist`,
shared with batch generation. One process without torchrun runs the same code with no process group.
"""
from __future__ import annotations

import torch
from torch import nn

from ..dist import RankInfo


def all_reduce_mean(value: torch.Tensor, info: RankInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (returned as a new tensor)."""
    value = value.detach().clone()
    if info.distributed:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def any_rank(flag: bool, info: RankInfo) -> bool:
    """True when `flag` is true on at least one rank (e.g. a SIGTERM seen by one process)."""
    if not info.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: object, info: RankInfo) -> object:
    """Rank 0's `obj` on every rank (unchanged for a single process)."""
    if not info.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_model(module: nn.Module, layers: nn.ModuleList, mixed_precision: torch.dtype | None) -> nn.Module:
    """FSDP2: one `fully_shard` unit per decoder layer, then the root (embeddings, final norm, lm_head).

    With `mixed_precision` (bf16), parameters are all-gathered and used in that dtype while the
    sharded master copy and the gradient reduction stay float32 (as the official FSDP set-up).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32) \
        if mixed_precision is not None else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module
