"""Verifiers that read pixels only (no model): for the procedural demo model and for tests of selection."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .base import Verifier


class DemoCheckVerifier(Verifier):
    """Demo captions ('a red circle in the top left'): 1 point each for right colour, position and shape (0-3)."""

    name = "demo_check"

    def _load(self, dtype: torch.dtype) -> None:
        pass  # nothing to load

    def _score(self, images: list[Image.Image], prompt: str) -> torch.Tensor:
        from ..demo.checker import check_image
        from ..demo.data import parse_caption

        caption = parse_caption(prompt)
        scores = []
        for image in images:
            result = check_image(np.asarray(image, dtype=np.uint8), caption)
            scores.append(float(result.colour) + float(result.position) + float(result.shape))
        return torch.tensor(scores)
