"""lumina_core.dist: rank info, one backend rule, barrier and gather, with and without a process group."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from lumina_core import dist
from lumina_core.errors import InputError


def test_one_process_is_rank_zero_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = dist.init("cpu")
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    assert info.device == torch.device("cpu")
    dist.barrier(info)
    assert dist.gather(info, {"a": 1}) == [{"a": 1}]


def test_backend_rule():
    assert dist.backend_for(torch.device("cpu")) == "gloo"
    assert dist.backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch_is_a_clear_input_error():
    with pytest.raises(InputError, match="sees no CUDA GPU.*--device cpu"):
        dist.resolve_device("cuda")
    with pytest.raises(InputError, match="not a device torch knows"):
        dist.resolve_device("gpu7")
    assert dist.resolve_device(None) == torch.device("cpu")


def _worker(rank: int, port: int, queue) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = dist.init("cpu")
    dist.barrier(info)
    queue.put((info.rank, info.world_size, dist.gather(info, f"rank{info.rank}")))
    dist.shutdown()


def test_two_processes_gather_in_rank_order():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [(0, 2, ["rank0", "rank1"]), (1, 2, ["rank0", "rank1"])]
