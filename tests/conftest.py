"""Test-wide settings."""
import os

# One intra-op thread: the tiny models of these tests run up to ~60x slower with torch's default
# thread pool on a shared 2-core machine, and subprocesses (torchrun, CLI) inherit the same
# setting, so float reductions, and so sampled codes, match between processes bit for bit.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment variable, which torch reads at import)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
