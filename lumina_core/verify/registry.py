"""The verifier catalogue: names, default checkpoints, sets and weights by name, and the weight memory of the real models."""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InputError
from .base import Verifier
from .clip import AestheticVerifier, ClipSimilarityVerifier
from .pixels import DemoCheckVerifier
from .vqascore import VQASCORE_MODELS, VQAScoreVerifier

# Name -> (default checkpoint, what it judges). Checkpoints are fixed here, never taken from a workflow.
VERIFIERS = {
    "vqascore": (VQASCORE_MODELS["qwen2.5-vl-7b"], "prompt alignment (VQAScore, P('Yes'))"),
    "aesthetic": ("openai/clip-vit-large-patch14", "LAION aesthetic predictor v2"),
    "pickscore": ("yuvalkirstain/PickScore_v1", "human preference (PickScore)"),
    "clipscore": ("openai/clip-vit-large-patch14", "prompt alignment (CLIP, 100 x cosine)"),
    "demo_check": (None, "pixel checker for the procedural demo model (no weights)"),
}
DEFAULT_MODELS = {name: model for name, (model, _) in VERIFIERS.items() if model}
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
VERIFIER_NAMES = tuple(VERIFIERS)
# Ready-made combinations (the node's dropdown; `--verifier a+b` on the CLI): alignment first, as
# rank() breaks ties on the first verifier's raw score.
VERIFIER_SETS = ("pickscore+aesthetic", "clipscore", "pickscore", "aesthetic", "vqascore", "clipscore+aesthetic",
                 "vqascore+pickscore+aesthetic", "demo_check")
_WEIGHT_RE = re.compile(r"^\s*([a-z_]+)\s*[=:]\s*([0-9]*\.?[0-9]+)\s*$")


def verifier_names(spec: str | Sequence[str]) -> list[str]:
    """Verifier names from 'a+b' (or a list of such), checked against the catalogue, without repeats."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for name in (n.strip() for part in parts for n in part.split("+")):
        if name not in VERIFIERS:
            raise InputError(f"unknown verifier {name!r}; known: {', '.join(VERIFIER_NAMES)}")
        if name not in names:
            names.append(name)
    if not names:
        raise InputError(f"no verifier named; known: {', '.join(VERIFIER_NAMES)}")
    return names


def parse_weights(text: str, names: Sequence[str]) -> dict[str, float]:
    """'vqascore=2, aesthetic=0.5' -> {name: weight}; unnamed verifiers weigh 1; unknown names are an error."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").replace(";", ",").split(","))):
        match = _WEIGHT_RE.match(part)
        if not match:
            raise InputError(f"cannot read weight {part!r}: write name=number, e.g. 'vqascore=2, aesthetic=0.5'")
        name, value = match.group(1), float(match.group(2))
        if name not in names:
            raise InputError(f"weight for {name!r}, which is not among the chosen verifiers {list(names)}")
        weights[name] = value
    if weights and sum(weights.get(n, 1.0) for n in names) <= 0:
        raise InputError("the weights must not all be 0")
    return weights


def get_verifier(name: str, search_dirs: Sequence[str | os.PathLike] = (), auto_download: bool = False,
                 device: str | torch.device = "cpu", *, model: str | None = None, **kwargs: Any) -> Verifier:
    """Build a verifier by name (weights load on first score, found by ``hub.resolve_weights``).

    ``search_dirs`` are looked in first (ComfyUI's models/lumina_mgpt2/verifiers) and receive downloads
    when ``auto_download``; ``model`` overrides the default checkpoint (repo id or folder). kwargs go to
    the verifier: dtype, batch_size, and per verifier processor (pickscore, clipscore), head
    (aesthetic), max_pixels / question / answer (vqascore).
    """
    kwargs.update(search_dirs=search_dirs, auto_download=auto_download, device=device)
    if name == "demo_check":
        if model:
            raise ValueError("demo_check reads pixels and takes no model")
        return DemoCheckVerifier(**kwargs)
    if name not in VERIFIERS:
        raise InputError(f"unknown verifier {name!r}; known: {', '.join(VERIFIER_NAMES)}")
    checkpoint = model or DEFAULT_MODELS[name]
    if name == "vqascore":
        return VQAScoreVerifier(checkpoint, **kwargs)
    if name == "aesthetic":
        return AestheticVerifier(checkpoint, **kwargs)
    if name == "pickscore":
        kwargs.setdefault("processor", None if model else PICKSCORE_PROCESSOR)
        return ClipSimilarityVerifier(checkpoint, scale="logit_scale", name="pickscore", **kwargs)
    return ClipSimilarityVerifier(checkpoint, scale=100.0, name="clipscore", **kwargs)


# Architecture of the real default checkpoints (the fields of their config.json that set the size),
# so their memory can be stated without downloading them.
_CLIP_L14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     vocab_size=49408, max_position_embeddings=77),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                       image_size=224, patch_size=14),
    projection_dim=768,
)
_CLIP_H14 = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                     vocab_size=49408, max_position_embeddings=77),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                       image_size=224, patch_size=14),
    projection_dim=1024,
)
_QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31])
REFERENCE_ARCHITECTURES: dict[str, tuple[str, dict]] = {
    # Qwen text fields flat, as their config.json has them (the form every transformers version reads).
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064,
        vision_config=dict(_QWEN25_VL_VISION, out_hidden_size=3584), tie_word_embeddings=False)),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936,
        vision_config=dict(_QWEN25_VL_VISION, out_hidden_size=2048), tie_word_embeddings=True)),
    "openai/clip-vit-large-patch14": ("clip", _CLIP_L14),
    "yuvalkirstain/PickScore_v1": ("clip", _CLIP_H14),
}


def _count_parameters(model_type: str, config_kwargs: dict, vision_only: bool) -> int:
    from transformers import (AutoConfig, AutoModelForImageTextToText, CLIPModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    config = AutoConfig.for_model(model_type, **config_kwargs)
    with torch.device("meta"):
        if model_type == "clip" and vision_only:
            vision = CLIPVisionConfig(**config.vision_config.to_dict())
            vision.projection_dim = config.projection_dim
            model = CLIPVisionModelWithProjection(vision)
        elif model_type == "clip":
            model = CLIPModel(config)
        else:
            model = AutoModelForImageTextToText.from_config(config)
    # Tied weights are one tensor: count unique storages.
    seen, total = set(), 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def weight_memory(name: str, model: str | None = None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Parameters and weight bytes of a verifier's real checkpoint, from its architecture (no download)."""
    if name == "demo_check":
        return {"verifier": name, "model": None, "parameters": 0, "bytes": 0}
    checkpoint = model or DEFAULT_MODELS[name]
    if checkpoint not in REFERENCE_ARCHITECTURES:
        raise ValueError(f"no reference architecture for {checkpoint!r}; known: {sorted(REFERENCE_ARCHITECTURES)}")
    model_type, config_kwargs = REFERENCE_ARCHITECTURES[checkpoint]
    parameters = _count_parameters(model_type, config_kwargs, vision_only=(name == "aesthetic"))
    element = torch.empty((), dtype=dtype).element_size()
    total = parameters * element
    if name == "aesthetic":  # + the float32 MLP head (768-1024-128-64-16-1)
        head = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1
        parameters += head
        total += head * 4
    return {"verifier": name, "model": checkpoint, "parameters": parameters, "bytes": total}
