"""torch.distributed set-up from the torchrun environment and FSDP2 (`fully_shard`) wrapping.

One process without torchrun runs the same code with `world_size == 1` and no process group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when a process group is running (more than one process)."""
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Start the process group when launched by torchrun (gloo on CPU, nccl on CUDA); else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown_distributed(clean: bool = True) -> None:
    """Tear the process group down (no-op for a single process); `clean=False` after an error skips the barrier."""
    if dist.is_initialized():
        if clean:
            dist.barrier()  # nobody leaves while a peer still talks to it (gloo aborts on a closed peer)
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for a single process)."""
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (returned as a new tensor)."""
    value = value.detach().clone()
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when `flag` is true on at least one rank (e.g. a SIGTERM seen by one process)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's `obj`, in rank order (a one-element list for a single process)."""
    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's `obj` on every rank (unchanged for a single process)."""
    if not info.enabled:
        return obj
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
