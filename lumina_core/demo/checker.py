"""Pixel checker for demo images: does an image show the colours, shapes and positions its caption names?

Every pixel is labelled with the nearest demo colour (or background / unsure when it is nearer a
background colour or far from every colour). For each named shape the checker takes the pixels
of its colour and their largest connected component:

- colour: the named colour(s) are present (at least ``MIN_PIXELS``) and dominate the coloured
  pixels (singles: 60 %, pairs: the two together 70 %);
- position: the component's centroid lies in the named region (singles) or more than
  ``PAIR_MARGIN`` pixels from the other shape's centroid in the named direction (pairs);
- shape: the component's fill of its bounding box (square ~1, circle ~pi/4, triangle ~1/2).

It also scores generated edge maps against true ones (F1 with a one-pixel tolerance).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import BACKGROUNDS, COLOURS, IMAGE_SIZE, POSITIONS, Caption

MIN_PIXELS = 30
MAX_COLOUR_DISTANCE = 90.0
SINGLE_DOMINANCE = 0.6
PAIR_DOMINANCE = 0.7
PAIR_MARGIN = 10.0
CENTER_TOLERANCE = 8.0
CORNER_LIMIT = 28.0          # corner regions: both coordinates on the named side of 28 / 36
SQUARE_MIN_FILL = 0.88
BAR_MIN_ASPECT = 1.8         # a drawn bar is ~2.8 wide per 1 high; the known shapes are ~1
BAR_MIN_FILL = 0.8
CIRCLE_MIN_FILL = 0.64

_COLOUR_NAMES = list(COLOURS)
_PALETTE = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float32)


def colour_labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel colour index into ``COLOURS`` (order of the dict), -1 for background or unsure: int [H, W]."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    pixels = image.astype(np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)
    nearest = distance.argmin(axis=-1)
    labels = np.where(nearest < len(_COLOUR_NAMES), nearest, -1)
    return np.where(distance.min(axis=-1) > MAX_COLOUR_DISTANCE, -1, labels)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (empty mask in, empty mask out)."""
    if not mask.any():
        return mask.copy()
    height, width = mask.shape
    labels = np.where(mask, np.arange(height * width).reshape(height, width), -1)
    # Propagate the largest index through each component until nothing changes.
    while True:
        padded = np.pad(labels, 1, constant_values=-1)
        neighbours = np.stack([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                               padded[1:-1, :-2], padded[1:-1, 2:]])
        updated = np.where(mask, neighbours.max(axis=0), -1)
        if np.array_equal(updated, labels):
            break
        labels = updated
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[counts.argmax()]


@dataclass(frozen=True)
class FoundShape:
    """The largest blob of one colour: pixel count, centroid (x, y), bounding-box fill and shape guess."""

    pixels: int
    cx: float
    cy: float
    fill: float
    shape: str
    aspect: float = 1.0   # bounding box width / height

    def is_shape(self, name: str) -> bool:
        """Whether the blob shows `name`: a bar (data.NEW_SHAPES) is a filled box at least BAR_MIN_ASPECT wide."""
        if name == "bar":
            return self.aspect >= BAR_MIN_ASPECT and self.fill >= BAR_MIN_FILL
        return self.shape == name


def classify_fill(fill: float) -> str:
    """Shape whose bounding-box fill ratio is nearest: square ~1, circle ~0.79, triangle ~0.5."""
    if fill >= SQUARE_MIN_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_MIN_FILL else "triangle"


def find_shape(labels: np.ndarray, colour: str) -> FoundShape | None:
    """Largest blob of ``colour`` in a label map, or None when the colour is absent."""
    mask = largest_component(labels == _COLOUR_NAMES.index(colour))
    count = int(mask.sum())
    if count == 0:
        return None
    ys, xs = np.nonzero(mask)
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    fill = count / (width * height)
    # Pixel centres are at +0.5 in the drawing's coordinates.
    return FoundShape(count, float(xs.mean() + 0.5), float(ys.mean() + 0.5), float(fill), classify_fill(fill),
                      float(width / height))


@dataclass(frozen=True)
class CheckResult:
    """Which parts of a caption an image satisfies."""

    colour: bool
    position: bool
    shape: bool

    @property
    def ok(self) -> bool:
        """Colour and position right (the main prompt-following score)."""
        return self.colour and self.position

    @property
    def ok_with_shape(self) -> bool:
        """Colour, position and shape right."""
        return self.colour and self.position and self.shape


def _in_region(found: FoundShape, position: str, size: int) -> bool:
    centre = size / 2
    if position == "in the center":
        return abs(found.cx - centre) <= CENTER_TOLERANCE and abs(found.cy - centre) <= CENTER_TOLERANCE
    target_x, target_y = POSITIONS[position]
    scale = size / IMAGE_SIZE
    low, high = CORNER_LIMIT * scale, size - CORNER_LIMIT * scale
    ok_x = found.cx < low if target_x * scale < centre else found.cx > high
    ok_y = found.cy < low if target_y * scale < centre else found.cy > high
    return ok_x and ok_y


def _in_relation(first: FoundShape, relation: str, second: FoundShape) -> bool:
    if relation == "above":
        return second.cy - first.cy > PAIR_MARGIN
    if relation == "below":
        return first.cy - second.cy > PAIR_MARGIN
    if relation == "to the left of":
        return second.cx - first.cx > PAIR_MARGIN
    return first.cx - second.cx > PAIR_MARGIN


def check_image(image: np.ndarray, caption: Caption) -> CheckResult:
    """Check an RGB uint8 image [H, W, 3] (square) against a demo caption."""
    labels = colour_labels(image)
    coloured = int((labels >= 0).sum())
    counts = {spec.colour: int((labels == _COLOUR_NAMES.index(spec.colour)).sum()) for spec in caption.shapes}
    present = all(n >= MIN_PIXELS for n in counts.values())
    dominance = SINGLE_DOMINANCE if not caption.is_pair else PAIR_DOMINANCE
    colour_ok = present and sum(counts.values()) >= dominance * coloured
    found = [find_shape(labels, spec.colour) for spec in caption.shapes]
    if not present or any(f is None or f.pixels < MIN_PIXELS for f in found):
        return CheckResult(colour=colour_ok, position=False, shape=False)
    if caption.is_pair:
        position_ok = _in_relation(found[0], caption.relation, found[1])
    else:
        position_ok = _in_region(found[0], caption.position, image.shape[1])
    shape_ok = all(f.is_shape(spec.shape) for f, spec in zip(found, caption.shapes))
    return CheckResult(colour=colour_ok, position=position_ok, shape=shape_ok)


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= padded[1 + dy: 1 + dy + mask.shape[0], 1 + dx: 1 + dx + mask.shape[1]]
    return out


def edge_f1(generated: np.ndarray, truth: np.ndarray) -> float:
    """F1 of edge pixels (bright pixels) of a generated edge map against the true one, one-pixel tolerance."""
    gen = np.asarray(generated).astype(np.float32)
    ref = np.asarray(truth).astype(np.float32)
    if gen.ndim == 3:
        gen = gen.mean(axis=2)
    if ref.ndim == 3:
        ref = ref.mean(axis=2)
    if gen.shape != ref.shape:
        raise ValueError(f"edge maps differ in size: {gen.shape} vs {ref.shape}")
    gen_edges, ref_edges = gen > 127, ref > 127
    if not gen_edges.any() or not ref_edges.any():
        return float(gen_edges.any() == ref_edges.any())
    precision = (gen_edges & _dilate(ref_edges)).sum() / gen_edges.sum()
    recall = (ref_edges & _dilate(gen_edges)).sum() / ref_edges.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))

