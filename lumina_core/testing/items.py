"""Tiny training items for tests: smooth colour-field images written with PIL and their t2i records."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_smooth_t2i_items(root: Path, rng: np.random.Generator, count: int = 6) -> list[dict]:
    """Write `count` 32x32 smooth colour fields `img{i}.png` into `root`; return their t2i item records.

    Smooth fields (not noise), so a tiny random MoVQGAN gives repeated codes.
    """
    items = []
    for i in range(count):
        base = rng.integers(0, 255, 3)
        arr = np.clip(base + np.arange(32)[:, None, None] * rng.integers(-3, 4, 3), 0, 255).astype(np.uint8)
        Image.fromarray(np.broadcast_to(arr, (32, 32, 3)).copy()).save(root / f"img{i}.png")
        items.append({"task": "t2i", "prompt": f"a red fox {i}", "image": f"img{i}.png"})
    return items
