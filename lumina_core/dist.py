"""Where this process sits among torchrun's ranks, and the few collectives every multi-process job needs.

Batch generation and training both start here, so they agree on the device of a rank and on the
backend. One process without torchrun is rank 0 of 1 with no process group, and every function
below is then a cheap no-op: the same code runs with or without torchrun.

The one backend rule: gloo for objects and barriers (they live in host memory), plus NCCL for
tensors when the rank's device is CUDA (``"cpu:gloo,cuda:nccl"``). A batch run only gathers small
summaries; training all-reduces CUDA gradients through NCCL; neither needs another set-up.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import InputError

# torch's own default; jobs whose ranks finish far apart (a batch run's last barrier) pass more.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class RankInfo:
    """This process: global rank, world size, rank on its node, its device, and whether a process group is up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False   # False: no group (one process, or a rank simulated in a test); collectives no-op

    @property
    def is_main(self) -> bool:
        """True on the one process that writes shared files and prints summaries."""
        return self.rank == 0


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun describes them in the environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(requested: Optional[str], local_rank: int = 0) -> torch.device:
    """The device a rank computes on: as requested, where 'cuda' (or nothing, with CUDA present) means its local GPU.

    A device this torch cannot use is the user's mistake (InputError naming what is there).
    """
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"--device {requested!r} is not a device torch knows ({error}); "
                         "use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {requested}: this torch ({torch.__version__}) sees no CUDA GPU "
                             "(a CPU-only build, or no driver); use --device cpu")
        count = torch.cuda.device_count()
        index = local_rank % count if device.index is None else device.index
        if index >= count:
            raise InputError(f"--device {requested}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
        device = torch.device("cuda", index)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {requested}: this torch sees no MPS device; use --device cpu")
    return device


def backend_for(device: torch.device) -> str:
    """The one backend rule: gloo for host objects, plus NCCL for CUDA tensors on a CUDA rank."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init(device: Optional[str] = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> RankInfo:
    """Join the process group torchrun describes (if any) on this rank's device; return where this process sits.

    ``timeout`` bounds every collective of the group, barriers included (a batch run whose ranks
    finish hours apart passes a long one; torchrun still tears the job down when a rank dies).
    """
    rank, world_size, local_rank = env_ranks()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend=backend_for(dev), timeout=timeout,
                                    device_id=dev if dev.type == "cuda" else None)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return RankInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, distributed=world_size > 1)


def barrier(info: RankInfo) -> None:
    """Wait until every rank arrives here (no-op for one process)."""
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def gather(info: RankInfo, value: Any) -> list[Any]:
    """Every rank's (picklable) ``value`` on every rank, in rank order; ``[value]`` for one process."""
    if not info.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def shutdown(clean: bool = True) -> None:
    """Leave the process group (no-op without one); ``clean=False`` after an error skips the last barrier."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()  # nobody leaves while a peer still talks to it (gloo aborts on a closed peer)
        dist.destroy_process_group()
