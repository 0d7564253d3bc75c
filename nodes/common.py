"""Names and conversions shared by the nodes: custom type strings, category, IMAGE <-> PIL/pipeline pixels."""
from __future__ import annotations

import torch
from PIL import Image

from ..lumina_core.errors import InputError
from ..lumina_core.images import pil_to_unit, unit_to_uint8

CATEGORY = "Lumina-mGPT 2.0"

# Custom ComfyUI types (DESIGN.md "Types that travel between nodes").
PIPE = "LUMINA_PIPE"        # a lumina_core LuminaPipeline
REQUEST = "LUMINA_REQUEST"  # a lumina_core Request
CODES = "LUMINA_CODES"      # a lumina_core GeneratedCodes (codes [B, rows, cols] + request + seeds)


class NodeInputError(InputError):
    """A node input that cannot be used; the message says what is wrong and what is allowed."""


def comfy_image_to_pil(image: torch.Tensor, index: int = 0) -> Image.Image:
    """One image of a ComfyUI IMAGE batch ([B, H, W, C] float 0..1) as a PIL RGB image."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise NodeInputError(f"expected a ComfyUI IMAGE [batch, height, width, channels], got {shape}")
    if not 0 <= index < image.shape[0]:
        raise NodeInputError(f"image index {index} out of range for a batch of {image.shape[0]}")
    pixels = unit_to_uint8(image[index]).cpu().numpy()
    if pixels.shape[-1] == 1:
        return Image.fromarray(pixels[..., 0], "L").convert("RGB")
    if pixels.shape[-1] == 4:
        return Image.fromarray(pixels, "RGBA").convert("RGB")
    return Image.fromarray(pixels, "RGB")


def pipeline_pixels_to_comfy(images: torch.Tensor) -> torch.Tensor:
    """Pipeline pixels [B, 3, H, W] nominally in [-1, 1] -> ComfyUI IMAGE [B, H, W, 3] float32 0..1 on CPU."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected decoded images [B, 3, H, W], got {tuple(images.shape)}")
    return ((images.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous().cpu()


def comfy_to_pil_list(images: torch.Tensor) -> list[Image.Image]:
    """Every image of a ComfyUI IMAGE batch as PIL RGB."""
    return [comfy_image_to_pil(images, i) for i in range(images.shape[0])]


def pil_to_comfy(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> ComfyUI IMAGE [B, H, W, 3] float32 0..1."""
    return pil_to_unit(images)


# "Model default" on a node: 0 in a size or number widget, this entry in a combo. The value is
# resolved from the pipe's ModelDefaults at run time; an explicit value always wins.
MODEL_DEFAULT_SIZE = 0
MODEL_DEFAULT = "model default"
