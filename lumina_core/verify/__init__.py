"""Verifiers for best-of-N selection: VQAScore, LAION aesthetic v2, PickScore, CLIPScore, demo pixel check.

Every verifier has `score(images, prompt) -> float32 tensor [N]` (higher is better) for images given
as a float tensor [N, 3, H, W] in [0, 1] or a list of PIL images; models load on first use, move
with `.to(device)` and are freed with `.unload()`. `rank` combines several verifiers' scores,
`judge` ranks the generated part of candidates against the prompt (the node's path), `best_of_n`
runs generation + `judge` with a LuminaPipeline (the CLI's and the batch runner's path).
"""
from __future__ import annotations

from .base import Verifier, to_pil_images
from .best_of_n import BestOfN, best_of_n, generated_part, judge, score_candidates
from .clip import AestheticHead, AestheticVerifier, ClipSimilarityVerifier, load_aesthetic_head
from .pixels import DemoCheckVerifier
from .rank import Ranking, average_ranks, rank, zscores
from .registry import (DEFAULT_MODELS, VERIFIER_NAMES, VERIFIER_SETS, VERIFIERS, get_verifier, parse_weights,
                       verifier_names, weight_memory)
from .vqascore import QUESTION_TEMPLATE, VQASCORE_MODELS, VQAScoreVerifier

__all__ = [
    "AestheticHead", "AestheticVerifier", "BestOfN", "ClipSimilarityVerifier", "DEFAULT_MODELS", "DemoCheckVerifier",
    "QUESTION_TEMPLATE", "Ranking", "VERIFIERS", "VERIFIER_NAMES", "VERIFIER_SETS", "VQASCORE_MODELS",
    "VQAScoreVerifier", "Verifier", "average_ranks", "best_of_n", "generated_part", "get_verifier", "judge",
    "load_aesthetic_head", "parse_weights", "rank", "score_candidates", "to_pil_images", "verifier_names",
    "weight_memory", "zscores",
]
