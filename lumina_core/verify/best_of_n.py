"""Best-of-N: generate N candidates in one batch, score them with verifiers, keep the best."""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .base import Verifier
from .rank import rank

logger = logging.getLogger(__name__)


@dataclass
class BestOfN:
    """The chosen candidate, every candidate image ([N,3,H,W] in [0,1]), the order and the score table."""

    best_index: int
    images: torch.Tensor
    order: list[int]
    table: list[dict]
    scores: dict[str, torch.Tensor]
    codes: Any = None  # what pipe.generate returned (GeneratedCodes), to keep or decode again

    @property
    def best_image(self) -> torch.Tensor:
        """The chosen image, [1,3,H,W] in [0,1]."""
        return self.images[self.best_index:self.best_index + 1]

    def table_json(self) -> str:
        """The per-candidate score table as JSON text (for display and saving)."""
        return json.dumps(self.table, indent=1)


def _as_named(verifiers: Mapping[str, Verifier] | Sequence[Verifier]) -> dict[str, Verifier]:
    if isinstance(verifiers, Mapping):
        named = dict(verifiers)
    else:
        named = {}
        for verifier in verifiers:
            if verifier.name in named:
                raise ValueError(f"two verifiers are named {verifier.name!r}: pass a mapping with distinct names")
            named[verifier.name] = verifier
    if not named:
        raise ValueError("best_of_n needs at least one verifier")
    return named


def score_candidates(images: torch.Tensor, prompt: str, verifiers: Mapping[str, Verifier] | Sequence[Verifier],
                     weights: Mapping[str, float] | None = None, method: str = "rank"):
    """Score images ([N,3,H,W] in [0,1]) with every verifier and rank them: (scores by name, Ranking)."""
    named = _as_named(verifiers)
    scores = {name: verifier.score(images, prompt) for name, verifier in named.items()}
    return scores, rank(scores, weights, method)


def best_of_n(pipe, request, sampling, verifiers: Mapping[str, Verifier] | Sequence[Verifier],
              weights: Mapping[str, float] | None = None, method: str = "rank", score_prompt: str | None = None,
              progress: Callable | None = None, should_cancel: Callable[[], bool] | None = None) -> BestOfN:
    """Generate sampling.num_images candidates in one batch, score them against score_prompt, return the best and all.

    score_prompt defaults to request.prompt; when the request holds a ThinkPrompt-refined prompt, pass the
    user's original prompt here (GenEval judges the original; CLIP encoders cut refined prompts at 77 tokens).
    When the request's upper panel is a given reference, only the generated lower panel is scored.
    """
    n = getattr(sampling, "num_images", 1)
    if n < 1:
        raise ValueError(f"sampling.num_images must be >= 1 for best-of-N, got {n}")
    named = _as_named(verifiers)  # validate before the expensive generation
    if weights is not None:
        unknown = sorted(set(weights) - set(named))
        if unknown:
            raise ValueError(f"weights name unknown verifiers {unknown}; verifiers: {sorted(named)}")
    prompt = score_prompt if score_prompt is not None else request.prompt
    codes = pipe.generate(request, sampling, progress=progress, should_cancel=should_cancel)
    decoded = pipe.decode(codes)  # as DESIGN.md: decode takes what generate returned
    images = ((decoded.float() + 1) / 2).clamp(0, 1)
    if images.shape[0] != n:
        raise RuntimeError(f"the pipeline returned {images.shape[0]} images for num_images={n}")
    # Tasks whose upper panel is the given reference (subject, edit, control, dense): judge only the
    # generated lower panel.
    judged = images[:, :, images.shape[2] // 2:, :] if getattr(request, "needs_reference", False) else images
    scores, ranking = score_candidates(judged, prompt, named, weights, method)
    logger.info("best-of-%d: candidate %d wins (%s)", n, ranking.best_index,
                ", ".join(f"{k}={float(v[ranking.best_index]):.4g}" for k, v in scores.items()))
    return BestOfN(best_index=ranking.best_index, images=images.cpu(), order=ranking.order, table=ranking.table,
                   scores=scores, codes=codes)


def with_num_images(sampling, n: int):
    """A copy of a SamplingConfig dataclass asking for n images."""
    return dataclasses.replace(sampling, num_images=n)
