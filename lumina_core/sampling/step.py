"""The decode step: the model's cached forward run eagerly, compiled (torch.compile), or replayed from CUDA graphs."""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)


def compile_step(model: nn.Module, mode: Optional[str] = None) -> Callable:
    """The model's decode step (`decode_step`) wrapped in torch.compile.

    Decoders call it with fixed window shapes and key lengths rounded up to buckets, so it compiles
    once per bucket. `mode` is passed to torch.compile (e.g. "max-autotune-no-cudagraphs").
    """
    return torch.compile(model.decode_step, mode=mode, dynamic=False)



class CUDAGraphStep:
    """A cached decode step (`decode_step` or its compiled form) replayed from CUDA graphs.

    Why: one 7B decode step is hundreds of small kernels; launched one by one from Python they took
    about 31 ms per step on an H200 (eager) against about 4 ms of memory traffic. A CUDA graph
    replays the whole step with one launch. One graph is captured per (KV cache, input shape, key
    length); decoders keep those few (fixed windows, key lengths rounded up to buckets). Graphs
    share one memory pool and run one at a time on one stream. The cache's pointer (`lengths`) is
    updated in place, so replays advance it like an eager step. Anything other than a CUDA cached
    step, or a step whose capture fails, runs eagerly.
    """

    def __init__(self, fn: Callable, warmup: int = 1) -> None:
        self.fn = fn
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None
        self.failed = False
        self.captures = 0
        self.capture_seconds = 0.0  # wall time spent warming up and capturing (benches report it per image)

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 position_ids: Optional[torch.Tensor] = None, cache=None, kv_len: Optional[int] = None) -> torch.Tensor:
        if (self.failed or cache is None or kv_len is None or position_ids is None or attention_mask is not None
                or input_ids.device.type != "cuda"):
            return self.fn(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                           kv_len=kv_len)
        key = (id(cache), cache.lengths.data_ptr(), tuple(input_ids.shape), tuple(position_ids.shape), kv_len)
        entry = self.graphs.get(key)
        if entry is None:
            started = time.perf_counter()
            try:
                entry = self._capture(input_ids, position_ids, cache, kv_len)
            except RuntimeError as e:  # an op that cannot be captured: keep working, eagerly
                logger.warning("CUDA graph capture failed (%s); decoding without CUDA graphs", e)
                self.failed = True
                self.graphs.clear()
                return self.fn(input_ids, position_ids=position_ids, cache=cache, kv_len=kv_len)
            self.graphs[key] = entry
            self.capture_seconds += time.perf_counter() - started
        graph, ids_buf, pos_buf, out = entry
        ids_buf.copy_(input_ids)
        pos_buf.copy_(position_ids)
        graph.replay()
        return out.clone()  # the static output is overwritten by the next replay

    def _capture(self, input_ids, position_ids, cache, kv_len):
        ids_buf, pos_buf = input_ids.clone(), position_ids.clone()
        pointer = cache.lengths.clone()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # Warm up on a side stream (lazy library initialisation must not happen during capture); the
        # warm-up writes keys beyond the pointer, which stay masked until real tokens overwrite them.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(ids_buf, position_ids=pos_buf, cache=cache, kv_len=kv_len)
                cache.lengths.copy_(pointer)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(ids_buf, position_ids=pos_buf, cache=cache, kv_len=kv_len)
        cache.lengths.copy_(pointer)  # capture records work without running it; keep the pointer as it was
        self.captures += 1
        return graph, ids_buf, pos_buf, out

    def reset(self) -> None:
        """Drop every graph (e.g. when the KV cache they read is freed) and their memory pool.

        The next capture takes a fresh pool: capturing into a pool whose graphs were all freed
        trips an allocator assertion (seen with torch 2.11 on an H200).
        """
        self.graphs.clear()
        self.pool = None
