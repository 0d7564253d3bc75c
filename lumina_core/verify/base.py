"""The verifier interface and the image convention shared by all verifiers (weights: ``hub.resolve_weights``).

Image convention for every `Verifier.score`: a float tensor [N, 3, H, W] with values in [0, 1]
(RGB), or a sequence of PIL images. Convert at the edges: `LuminaPipeline.decode` gives [-1, 1]
(use `(x + 1) / 2`), ComfyUI's IMAGE is [N, H, W, 3] (use `.permute(0, 3, 1, 2)`).
"""
from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image

from ..images import unit_to_uint8

ImagesLike = Union[torch.Tensor, Sequence[Image.Image]]

# What a processor-only repository contributes (no weights); the weight files: hub.VERIFIER_FILE_PATTERNS.
PROCESSOR_FILE_PATTERNS = ["*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


def to_pil_images(images: ImagesLike) -> list[Image.Image]:
    """Convert [N,3,H,W] float in [0,1] (or PIL images) into a list of RGB PIL images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a tensor [N, 3, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
        if images.shape[0] == 0:
            raise ValueError("images is empty: score needs at least one image")
        lo, hi = float(images.min()), float(images.max())
        if lo < -0.01 or hi > 1.01:
            raise ValueError(
                f"images must hold values in [0, 1], got [{lo:.3f}, {hi:.3f}] "
                "(pipeline.decode gives [-1, 1]: pass (x + 1) / 2)"
            )
        pixels = unit_to_uint8(images)
        array = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in array]
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    images = list(images)
    if not images:
        raise ValueError("images is empty: score needs at least one image")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] is {type(image).__name__}; expected a PIL image or a [N,3,H,W] tensor")
    return [image.convert("RGB") for image in images]


def load_pil_image_processor(folder: str, **options):
    """The folder's image processor with the PIL backend, in every transformers this pack allows.

    Same numerics with or without torchvision installed. transformers >= 5.10 picks a backend by name
    (its image_processing_backends module); before, the slow class (use_fast=False) is the PIL one.
    Imported from its module: transformers 5.10's top-level AutoImageProcessor is a placeholder that
    demands torchvision when it is missing.
    """
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    if importlib.util.find_spec("transformers.image_processing_backends") is not None:
        return AutoImageProcessor.from_pretrained(folder, backend="pil", **options)
    return AutoImageProcessor.from_pretrained(folder, use_fast=False, **options)


def dtype_option(dtype: torch.dtype) -> dict:
    """The `from_pretrained` keyword for the weights' dtype: `dtype` from transformers 4.56, `torch_dtype` before
    (kept after only as a deprecated alias that warns)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


class Verifier:
    """Scores N candidate images against a prompt; higher is better. Loads its model on first use."""

    name = "verifier"

    def __init__(self, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 batch_size: int = 8, auto_download: bool = False,
                 search_dirs: Sequence[str | os.PathLike] = ()) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.auto_download = auto_download
        self.search_dirs = tuple(search_dirs)  # where weights are looked for first (ComfyUI: models/.../verifiers)
        self._loaded = False

    def weights(self, spec: str, *, file: bool = False, allow_patterns: Sequence[str] | None = None) -> str:
        """Local path of a model folder (or, ``file=True``, a file) this verifier needs, by the hub's rules."""
        from ..hub import VERIFIER_FILE_PATTERNS, resolve_weights

        return str(resolve_weights(spec, search_dirs=self.search_dirs, auto_download=self.auto_download, file=file,
                                   allow_patterns=allow_patterns or VERIFIER_FILE_PATTERNS))

    @property
    def loaded(self) -> bool:
        """Whether the model weights are in memory."""
        return self._loaded

    def load(self) -> "Verifier":
        """Load the model now (score() does it on first use)."""
        if not self._loaded:
            self._load(self.dtype or default_dtype(self.device))
            self._loaded = True
        return self

    def to(self, device: str | torch.device) -> "Verifier":
        """Move the model (now, or when it is loaded) to device."""
        self.device = torch.device(device)
        if self._loaded:
            for module in self._modules():
                module.to(self.device)
        return self

    def unload(self) -> None:
        """Drop the weights; the next score() loads them again."""
        was_accelerated = self.device.type != "cpu"
        self._release()
        self._loaded = False
        gc.collect()
        if was_accelerated and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def score(self, images: ImagesLike, prompt: str) -> torch.Tensor:
        """Score each image for prompt: float32 tensor [N] on the CPU, higher is better."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        pil = to_pil_images(images)
        self.load()
        with torch.inference_mode():
            scores = torch.cat([self._score(pil[i:i + self.batch_size], prompt).float().cpu()
                                for i in range(0, len(pil), self.batch_size)])
        if scores.shape != (len(pil),):
            raise RuntimeError(f"{self.name} returned shape {tuple(scores.shape)} for {len(pil)} images")
        return scores

    # Subclasses implement these three.
    def _load(self, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def _score(self, images: list[Image.Image], prompt: str) -> torch.Tensor:
        raise NotImplementedError

    def _modules(self) -> list[torch.nn.Module]:
        return []

    def _release(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, loaded={self._loaded})"
