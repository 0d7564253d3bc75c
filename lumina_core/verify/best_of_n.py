"""Best-of-N: generate N candidates in one batch, score them with verifiers, keep the best."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import InputError
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


def generated_part(images: torch.Tensor, request: Any = None) -> torch.Tensor:
    """What the model generated of each image ([N,3,H,W]): the lower panel when the request's upper panel is a
    given reference (subject, edit, control, dense tasks) and the images are full size, else the whole image."""
    if not getattr(request, "needs_reference", False):
        return images
    full_height = getattr(request, "height", None)
    if full_height is not None and images.shape[2] != full_height:
        return images  # already a panel (e.g. a node's lower_panel output)
    return images[:, :, images.shape[2] // 2:, :]


def judge(images: torch.Tensor, verifiers: Mapping[str, Verifier] | Sequence[Verifier], request: Any = None,
          prompt: str | None = None, weights: Mapping[str, float] | None = None, method: str = "rank"):
    """Rank candidate images ([N,3,H,W] in [0,1]) of a request: (scores by name, Ranking).

    Judged: the generated part only, against ``prompt`` when one is given, else the request's prompt
    (so the prompt is typed once; pass the user's original when the request holds a refined one:
    GenEval judges the original and CLIP encoders cut refined prompts at 77 tokens).
    """
    text = prompt if prompt and prompt.strip() else getattr(request, "prompt", None)
    if not text or not text.strip():
        raise InputError("best-of-N needs a prompt to judge against: give one, or connect the request")
    return score_candidates(generated_part(images, request), text, verifiers, weights, method)


def best_of_n(pipe, request, sampling, verifiers: Mapping[str, Verifier] | Sequence[Verifier],
              weights: Mapping[str, float] | None = None, method: str = "rank", score_prompt: str | None = None,
              progress: Callable | None = None, should_cancel: Callable[[], bool] | None = None) -> BestOfN:
    """Generate sampling.num_images candidates in one batch, judge them (see ``judge``), return the best and all."""
    n = getattr(sampling, "num_images", 1)
    if n < 1:
        raise ValueError(f"sampling.num_images must be >= 1 for best-of-N, got {n}")
    named = _as_named(verifiers)  # validate before the expensive generation
    if weights is not None:
        unknown = sorted(set(weights) - set(named))
        if unknown:
            raise ValueError(f"weights name unknown verifiers {unknown}; verifiers: {sorted(named)}")
    codes = pipe.generate(request, sampling, progress=progress, should_cancel=should_cancel)
    decoded = pipe.decode(codes)  # as DESIGN.md: decode takes what generate returned
    images = ((decoded.float() + 1) / 2).clamp(0, 1)
    if images.shape[0] != n:
        raise RuntimeError(f"the pipeline returned {images.shape[0]} images for num_images={n}")
    scores, ranking = judge(images, named, request, score_prompt, weights, method)
    logger.info("best-of-%d: candidate %d wins (%s)", n, ranking.best_index,
                ", ".join(f"{k}={float(v[ranking.best_index]):.4g}" for k, v in scores.items()))
    return BestOfN(best_index=ranking.best_index, images=images.cpu(), order=ranking.order, table=ranking.table,
                   scores=scores, codes=codes)
