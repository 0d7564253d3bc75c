"""The verifier catalogue: names, default checkpoints, and the weight memory of the real models."""
from __future__ import annotations

from typing import Any

import torch

from .base import Verifier
from .clip import AestheticVerifier, ClipSimilarityVerifier
from .pixels import DemoCheckVerifier
from .vqascore import VQASCORE_MODELS, VQAScoreVerifier

DEFAULT_MODELS = {
    "vqascore": VQASCORE_MODELS["qwen2.5-vl-7b"],
    "aesthetic": "openai/clip-vit-large-patch14",
    "pickscore": "yuvalkirstain/PickScore_v1",
    "clipscore": "openai/clip-vit-large-patch14",
}
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
VERIFIER_NAMES = ("vqascore", "aesthetic", "pickscore", "clipscore", "demo_check")


def get_verifier(name: str, model: str | None = None, **kwargs: Any) -> Verifier:
    """Build a verifier by name (lazily loaded); model overrides the default checkpoint (repo id or folder).

    kwargs go to the verifier: device, dtype, batch_size, auto_download, and per verifier
    processor (pickscore, clipscore), head (aesthetic), max_pixels / question / answer (vqascore).
    """
    if name == "vqascore":
        return VQAScoreVerifier(model or DEFAULT_MODELS["vqascore"], **kwargs)
    if name == "aesthetic":
        return AestheticVerifier(model or DEFAULT_MODELS["aesthetic"], **kwargs)
    if name == "pickscore":
        kwargs.setdefault("processor", None if model else PICKSCORE_PROCESSOR)
        return ClipSimilarityVerifier(model or DEFAULT_MODELS["pickscore"], scale="logit_scale", name="pickscore",
                                      **kwargs)
    if name == "clipscore":
        return ClipSimilarityVerifier(model or DEFAULT_MODELS["clipscore"], scale=100.0, name="clipscore", **kwargs)
    if name == "demo_check":
        if model:
            raise ValueError("demo_check reads pixels and takes no model")
        return DemoCheckVerifier(**kwargs)
    raise ValueError(f"unknown verifier {name!r}; known: {', '.join(VERIFIER_NAMES)}")


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
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", dict(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064),
        vision_config=dict(_QWEN25_VL_VISION, out_hidden_size=3584), tie_word_embeddings=False)),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", dict(
        text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
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
