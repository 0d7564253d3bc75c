"""CPU threads for small models: one intra-op thread while a tiny model samples, the global setting restored after.

A tiny model (the embedded demo: 3.6 M parameters, 256-wide layers) does microsecond-sized matrix
products per decode step; splitting each over torch's thread pool costs more than the work, and on
a machine shared with other processes the pool's threads wait for each other: the README's demo
command took 3.6 s of sampling with one thread and 66 s with torch's default two on the 2-core
machine. Large models keep torch's setting (their products are big enough to split).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

# Below this many parameters a model's per-step products are too small to split across threads.
SMALL_MODEL_PARAMETERS = 50_000_000


def threads_for(num_parameters: int, device: torch.device | str) -> int:
    """Intra-op threads to use for a model of this size on this device: 1 for small models on CPU, else torch's."""
    if torch.device(device).type == "cpu" and num_parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return torch.get_num_threads()


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the process's setting (ComfyUI's, a user's)."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
