"""Verifiers for best-of-N selection: VQAScore, LAION aesthetic v2, PickScore, CLIPScore, demo pixel check.

Every verifier has `score(images, prompt) -> float32 tensor [N]` (higher is better) for images given
as a float tensor [N, 3, H, W] in [0, 1] or a list of PIL images; models load on first use, move
with `.to(device)` and are freed with `.unload()`. `rank` combines several verifiers' scores,
`best_of_n` runs generation + scoring + selection with a LuminaPipeline.
"""
from __future__ import annotations

from .base import Verifier, resolve_model_file, resolve_model_folder, to_pil_images
from .best_of_n import BestOfN, best_of_n, score_candidates, with_num_images
from .clip import AestheticHead, AestheticVerifier, ClipSimilarityVerifier, load_aesthetic_head
from .pixels import DemoCheckVerifier
from .rank import Ranking, average_ranks, rank, zscores
from .registry import DEFAULT_MODELS, VERIFIER_NAMES, get_verifier, weight_memory
from .vqascore import QUESTION_TEMPLATE, VQASCORE_MODELS, VQAScoreVerifier

__all__ = [
    "AestheticHead", "AestheticVerifier", "BestOfN", "ClipSimilarityVerifier", "DEFAULT_MODELS", "DemoCheckVerifier",
    "QUESTION_TEMPLATE", "Ranking", "VERIFIER_NAMES", "VQASCORE_MODELS", "VQAScoreVerifier", "Verifier",
    "average_ranks", "best_of_n", "get_verifier", "load_aesthetic_head", "rank", "resolve_model_file",
    "resolve_model_folder", "score_candidates", "to_pil_images", "weight_memory", "with_num_images", "zscores",
]
