"""Combine the scores of several verifiers into one order of the candidates."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

METHODS = ("rank", "zscore")


@dataclass(frozen=True)
class Ranking:
    """Candidates best first, the combined value of each, and one table row per candidate (index order)."""

    order: list[int]
    combined: torch.Tensor  # [N], higher is better
    table: list[dict]

    @property
    def best_index(self) -> int:
        """Index of the chosen candidate."""
        return self.order[0]


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based ascending ranks (0 = lowest value, N-1 = highest), ties share their average rank."""
    values = values.double()
    n = values.numel()
    less = (values[None, :] < values[:, None]).sum(dim=1).double()
    equal = (values[None, :] == values[:, None]).sum(dim=1).double()
    return less + (equal - 1) / 2 if n else values


def zscores(values: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std across candidates (population std); all zeros when the values do not vary."""
    values = values.double()
    std = values.std(unbiased=False) if values.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    if not torch.isfinite(std) or std <= 1e-12 * max(1.0, float(values.abs().max())):
        return torch.zeros_like(values)
    return (values - values.mean()) / std


def rank(scores_by_verifier: Mapping[str, torch.Tensor | Sequence[float]],
         weights: Mapping[str, float] | None = None, method: str = "rank") -> Ranking:
    """Order N candidates by a weighted combination of per-verifier scores (higher score = better).

    method "rank" (default): weighted mean of each verifier's average rank (scale-free, robust);
    "zscore": weighted mean of per-verifier z-scores (keeps margins). Ties are broken by the
    verifiers' raw scores in the order given (put the alignment verifier first), then by lower index.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not scores_by_verifier:
        raise ValueError("rank needs the scores of at least one verifier")
    names = list(scores_by_verifier)
    scores = {}
    for name in names:
        values = torch.as_tensor(scores_by_verifier[name], dtype=torch.float64).detach().cpu().flatten()
        if not torch.isfinite(values).all():
            raise ValueError(f"scores of verifier {name!r} contain NaN or infinity: {values.tolist()}")
        scores[name] = values
    sizes = {name: v.numel() for name, v in scores.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"every verifier must score the same, non-zero number of candidates, got {sizes}")
    n = next(iter(sizes.values()))

    weights = dict(weights) if weights is not None else {}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"weights name verifiers without scores: {unknown}; scored: {names}")
    w = {name: float(weights.get(name, 1.0)) for name in names}
    if any(math.isnan(v) or v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w}")

    transform = average_ranks if method == "rank" else zscores
    parts = {name: transform(values) for name, values in scores.items()}
    combined = sum(w[name] * parts[name] for name in names) / sum(w.values())

    def key(i: int) -> tuple:
        return (-float(combined[i]), *(-float(scores[name][i]) for name in names), i)

    order = sorted(range(n), key=key)
    position = {index: place for place, index in enumerate(order)}
    part_label = "rank" if method == "rank" else "z"
    table = []
    for i in range(n):
        row: dict = {"index": i, "place": position[i] + 1, "combined": round(float(combined[i]), 6)}
        for name in names:
            row[name] = float(scores[name][i])
            row[f"{name}_{part_label}"] = round(float(parts[name][i]), 6)
        table.append(row)
    return Ranking(order=order, combined=combined.float(), table=table)
