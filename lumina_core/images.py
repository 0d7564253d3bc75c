"""Image preprocessing as the official release does it (reference section c), and pixel conversions."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image


def center_crop(image: Image.Image, size: Sequence[int]) -> Image.Image:
    """Official center crop to ``size`` = (width, height): BOX halving, BICUBIC scale, centre cut."""
    crop_w, crop_h = int(size[0]), int(size[1])
    if crop_w <= 0 or crop_h <= 0:
        raise ValueError(f"crop size must be positive, got {crop_w}x{crop_h}")
    # Halve with a box filter while both sides stay at least twice the target (cheap, alias-free).
    while image.size[0] >= 2 * crop_w and image.size[1] >= 2 * crop_h:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = max(crop_w / image.size[0], crop_h / image.size[1])
    # Python round() (banker's rounding) as the official code uses it.
    image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), resample=Image.BICUBIC)
    left = (image.size[0] - crop_w) // 2
    top = (image.size[1] - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def generate_crop_size_list(num_patches: int, patch_size: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """Training crop sizes (w, h): multiples of ``patch_size`` with at most ``num_patches`` patches, aspect <= max_ratio."""
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    sizes = []
    # Walk the boundary w*h <= num_patches from the widest shape (w = num_patches, h = 1) down.
    w_patches, h_patches = num_patches, 1
    while w_patches > 0:
        if max(w_patches, h_patches) / min(w_patches, h_patches) <= max_ratio:
            sizes.append((w_patches * patch_size, h_patches * patch_size))
        if (h_patches + 1) * w_patches <= num_patches:
            h_patches += 1
        else:
            w_patches -= 1
    return sizes


def var_center_crop(image: Image.Image, crop_size_list: Sequence[tuple[int, int]]) -> Image.Image:
    """Center-crop to the listed size that keeps the largest fraction of the image (training crops)."""
    if not crop_size_list:
        raise ValueError("crop_size_list is empty")
    w, h = image.size

    def kept_fraction(size: tuple[int, int]) -> float:
        sx, sy = size[0] / w, size[1] / h
        return min(sx, sy) / max(sx, sy)

    # Ties go to the larger size, as sorting (fraction, size) in reverse does.
    best = max(crop_size_list, key=lambda size: (kept_fraction(size), tuple(size)))
    return center_crop(image, best)


def whiten_transparency(image: Image.Image) -> Image.Image:
    """Return an RGB image: RGB unchanged, transparent pixels blended over white, other modes converted."""
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    alpha = rgba[:, :, 3:4] / 255.0
    rgb = (1.0 - alpha) * 255.0 + alpha * rgba[:, :, :3]
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 [3, H, W] in [-1, 1] (official: float64 x/255*2-1, then float32)."""
    image = whiten_transparency(image)
    array = np.asarray(image, dtype=np.float64) / 255.0 * 2.0 - 1.0
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1).contiguous()


def unit_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] (any shape; ComfyUI's and the verifiers' range) -> uint8 0..255, rounded."""
    return (pixels.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)


def pil_to_unit(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> float32 [N, H, W, 3] in [0, 1], channels last (ComfyUI's IMAGE layout)."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]))


def tensor_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float [..., 3, H, W] nominally in [-1, 1] -> uint8 [..., H, W, 3] (official rounding)."""
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"expected [..., 3, H, W], got shape {tuple(images.shape)}")
    pixels = ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.movedim(-3, -1).cpu()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """One float [3, H, W] image in [-1, 1] -> PIL RGB."""
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise ValueError(f"expected one image [3, H, W], got shape {tuple(image.shape)}")
    return Image.fromarray(tensor_to_uint8(image).numpy(), "RGB")
