"""The verifier interface, the image convention and model-folder resolution shared by all verifiers.

Image convention for every `Verifier.score`: a float tensor [N, 3, H, W] with values in [0, 1]
(RGB), or a sequence of PIL images. Convert at the edges: `LuminaPipeline.decode` gives [-1, 1]
(use `(x + 1) / 2`), ComfyUI's IMAGE is [N, H, W, 3] (use `.permute(0, 3, 1, 2)`).
"""
from __future__ import annotations

import gc
import os
import re
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image

from ..images import unit_to_uint8

ImagesLike = Union[torch.Tensor, Sequence[Image.Image]]

# Files a verifier needs from a Hugging Face repository: configs, tokenizers, safetensors weights.
# Pickled weights (*.bin, *.pth) are never downloaded for transformers models.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]
PROCESSOR_FILE_PATTERNS = ["*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


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


def resolve_model_folder(name_or_path: str, *, auto_download: bool,
                         allow_patterns: Sequence[str] = MODEL_FILE_PATTERNS) -> str:
    """A local folder as is, else a Hugging Face repo id from the local cache (or downloaded if allowed)."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    if not _REPO_ID.match(name_or_path):
        raise FileNotFoundError(f"verifier model folder not found: {name_or_path!r} (give a folder or an 'owner/name' repo id)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, allow_patterns=list(allow_patterns), local_files_only=not auto_download)
    except Exception as error:
        if auto_download:
            raise FileNotFoundError(
                f"verifier model {name_or_path!r} could not be downloaded ({type(error).__name__}); pass a local folder"
            ) from error
        raise FileNotFoundError(
            f"verifier model {name_or_path!r} is not a local folder and not in the Hugging Face cache: allow "
            f"downloading (auto_download=True), or run `huggingface-cli download {name_or_path}`, or pass a folder"
        ) from error


def resolve_model_file(spec: str, *, auto_download: bool) -> str:
    """A local file as is, else 'owner/repo/path/in/repo' from the Hugging Face cache (or downloaded if allowed)."""
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return path
    parts = spec.split("/")
    if len(parts) < 3 or not _REPO_ID.match("/".join(parts[:2])):
        raise FileNotFoundError(f"verifier weight file not found: {spec!r} (give a file or 'owner/repo/filename')")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), local_files_only=not auto_download)
    except Exception as error:
        raise FileNotFoundError(
            f"verifier weight file {spec!r} is not local and not in the Hugging Face cache"
            f"{'' if auto_download else ' (allow downloading with auto_download=True)'} ({type(error).__name__})"
        ) from error


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


class Verifier:
    """Scores N candidate images against a prompt; higher is better. Loads its model on first use."""

    name = "verifier"

    def __init__(self, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 batch_size: int = 8, auto_download: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.auto_download = auto_download
        self._loaded = False

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
