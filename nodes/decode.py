"""VQDecode: LUMINA_CODES -> IMAGE (full) plus the upper and lower panels of dual-panel tasks."""
from __future__ import annotations

from typing import Any

import torch

from . import comfy_bridge as bridge
from .common import CATEGORY, CODES, PIPE, NodeInputError, pipeline_pixels_to_comfy


def split_panels(images: torch.Tensor, dual_panel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper, lower) halves of IMAGE [B, H, W, 3] for dual-panel tasks; both are the full image otherwise."""
    if not dual_panel:
        return images, images
    half = images.shape[1] // 2
    return images[:, :half].contiguous(), images[:, half:].contiguous()


class LuminaMGPT2VQDecode:
    """Turns generated codes into pixels with MoVQGAN."""

    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE")
    RETURN_NAMES = ("image", "upper_panel", "lower_panel")
    OUTPUT_TOOLTIPS = ("The full generated image (both panels for dual-panel tasks).",
                       "Upper panel (dual-panel tasks; the full image otherwise).",
                       "Lower panel: the generated result of control/edit/subject tasks, the map of dense "
                       "tasks (the full image for single-panel tasks).")
    DESCRIPTION = "Decodes LUMINA_CODES to images; dual-panel results are also split into their two panels."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """pipe and codes."""
        return {"required": {"pipe": (PIPE, {"tooltip": "The Loader's pipe (its MoVQGAN decodes the codes)."}),
                             "codes": (CODES, {"tooltip": "Codes from ARSampler-SJD."})}}

    def decode(self, pipe: Any, codes: Any) -> tuple:
        """Decode every image of the batch; return full, upper and lower IMAGE batches."""
        grid = getattr(codes, "codes", None)
        if not isinstance(grid, torch.Tensor) or grid.dim() != 3:
            raise NodeInputError("the codes input must come from ARSampler-SJD (LUMINA_CODES)")
        bridge.load_on_device(pipe)
        with torch.inference_mode():
            pixels = pipe.decode(grid.to(pipe.device))
        images = pipeline_pixels_to_comfy(pixels)
        upper, lower = split_panels(images, bool(codes.request.is_dual_panel))
        return (images, upper, lower)
