"""Procedural dataset of the embedded demo model: simple coloured shapes with captions, no downloads.

Images are 64 x 64 (two 32-px grid units, an 8 x 8 MoVQGAN code grid): one or two shapes
(circle, square, triangle) in six colours on a white, light grey or cream background.
Captions name colour, shape and position:

- singles: ``"a red circle in the top left"`` (5 positions, 90 captions);
- pairs: ``"a red circle above a blue square"`` (above / below / to the left of / to the right of,
  two different colours, 1080 captions).

A fixed set of caption combinations is held out of training (``split_captions``) so evaluation
measures generalisation to unseen combinations of known words.

Dual-panel pairs (64 x 128, upper and lower panel of 64 x 64) are made for one controllable task
(``control_canny``: edge map above, image below) and one dense-prediction task (``dense_canny``:
image above, edge map below), with the prompt templates of ``lumina_core.tasks`` so the demo sees
exactly the prompts the real model sees. Edge maps are white edges on black, from a thresholded
colour gradient (no OpenCV).
"""
from __future__ import annotations

import json
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..tasks import get_task

IMAGE_SIZE = 64
# Shapes are drawn at this multiple of the final size and box-filtered down (anti-aliased edges).
SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 130, 20),
    "yellow": (232, 212, 30),
    "green": (35, 160, 60),
    "blue": (35, 75, 220),
    "purple": (140, 50, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light grey": (228, 228, 228),
    "cream": (250, 243, 222),
}
SHAPES = ("circle", "square", "triangle")
# Shapes the shipped demo never saw (not in SHAPES, so not in all_captions() nor in its training
# data): for teaching it something new with a LoRA (bench/lora_demo.py). A bar is a flat
# rectangle, about 2.8 times wider than high.
NEW_SHAPES = ("bar",)
BAR_WIDTH, BAR_HEIGHT = 1.4, 0.5   # half-extents as multiples of the drawn size's half
# Named positions of single shapes: centre of the shape in pixels (x, y) on the 64 x 64 image.
POSITIONS: dict[str, tuple[int, int]] = {
    "in the center": (32, 32),
    "in the top left": (18, 18),
    "in the top right": (46, 18),
    "in the bottom left": (18, 46),
    "in the bottom right": (46, 46),
}
RELATIONS = ("above", "below", "to the left of", "to the right of")

# Tasks the demo model is trained on (keys of lumina_core.tasks.TASKS).
DEMO_TASKS = ("t2i", "control_canny", "dense_canny")
DEFAULT_TASK_MIX = {"t2i": 0.7, "control_canny": 0.15, "dense_canny": 0.15}

HELD_OUT_SINGLES = 10
HELD_OUT_PAIRS = 40
SPLIT_SEED = 20260704


@dataclass(frozen=True)
class ShapeSpec:
    """One named shape: colour and kind."""

    colour: str
    shape: str

    def text(self) -> str:
        """``"a red circle"`` (``"an orange circle"``)."""
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Caption:
    """What an image shows: one shape at a named position, or two shapes in a relation."""

    first: ShapeSpec
    position: str | None = None       # singles: a key of POSITIONS
    relation: str | None = None       # pairs: one of RELATIONS
    second: ShapeSpec | None = None   # pairs: the reference shape

    def __post_init__(self) -> None:
        _check_shape(self.first)
        if self.second is None:
            if self.position not in POSITIONS or self.relation is not None:
                raise ValueError(f"a single-shape caption needs a position from {list(POSITIONS)} and no relation")
        else:
            _check_shape(self.second)
            if self.relation not in RELATIONS or self.position is not None:
                raise ValueError(f"a two-shape caption needs a relation from {list(RELATIONS)} and no position")
            if self.first.colour == self.second.colour:
                raise ValueError("the two shapes of a pair must have different colours "
                                 f"(got {self.first.colour} twice)")

    @property
    def is_pair(self) -> bool:
        """True for two-shape captions."""
        return self.second is not None

    @property
    def shapes(self) -> tuple[ShapeSpec, ...]:
        """The named shapes, first one first."""
        return (self.first,) if self.second is None else (self.first, self.second)

    def text(self) -> str:
        """The caption as the model reads it."""
        if self.second is None:
            return f"{self.first.text()} {self.position}"
        return f"{self.first.text()} {self.relation} {self.second.text()}"


def _check_shape(spec: ShapeSpec) -> None:
    if spec.colour not in COLOURS:
        raise ValueError(f"unknown colour {spec.colour!r}; allowed: {list(COLOURS)}")
    if spec.shape not in SHAPES + NEW_SHAPES:
        raise ValueError(f"unknown shape {spec.shape!r}; allowed: {list(SHAPES + NEW_SHAPES)}")


_SHAPE_RE = r"an? (\w+) (\w+)"
_SINGLE_RE = re.compile(rf"^{_SHAPE_RE} ({'|'.join(map(re.escape, POSITIONS))})$")
_PAIR_RE = re.compile(rf"^{_SHAPE_RE} ({'|'.join(map(re.escape, RELATIONS))}) {_SHAPE_RE}$")


def parse_caption(text: str) -> Caption:
    """Parse a demo caption (``"a red circle above a blue square"``); other text raises ValueError."""
    cleaned = " ".join(text.lower().strip().rstrip(".").split())
    match = _SINGLE_RE.match(cleaned)
    if match:
        return Caption(ShapeSpec(match[1], match[2]), position=match[3])
    match = _PAIR_RE.match(cleaned)
    if match:
        return Caption(ShapeSpec(match[1], match[2]), relation=match[3], second=ShapeSpec(match[4], match[5]))
    raise ValueError(f"not a demo caption: {text!r}; expected e.g. 'a red circle in the top left' or "
                     f"'a red circle above a blue square' with colours {list(COLOURS)}, shapes {list(SHAPES)}, "
                     f"positions {list(POSITIONS)}, relations {list(RELATIONS)}")


def all_captions() -> list[Caption]:
    """Every caption of the grammar: 90 singles, then 1080 pairs, in a fixed order."""
    specs = [ShapeSpec(c, s) for c in COLOURS for s in SHAPES]
    singles = [Caption(spec, position=p) for spec in specs for p in POSITIONS]
    pairs = [Caption(a, relation=r, second=b) for a in specs for r in RELATIONS for b in specs
             if a.colour != b.colour]
    return singles + pairs


def new_shape_captions(shape: str) -> list[Caption]:
    """Every caption naming a NEW_SHAPES shape: singles (colour x position), then pairs with a known shape."""
    if shape not in NEW_SHAPES:
        raise ValueError(f"{shape!r} is not one of the new shapes {list(NEW_SHAPES)}")
    news = [ShapeSpec(c, shape) for c in COLOURS]
    olds = [ShapeSpec(c, s) for c in COLOURS for s in SHAPES]
    singles = [Caption(spec, position=p) for spec in news for p in POSITIONS]
    pairs = [Caption(a, relation=r, second=b) for a in news for r in RELATIONS for b in olds if a.colour != b.colour]
    pairs += [Caption(b, relation=r, second=a) for a in news for r in RELATIONS for b in olds if a.colour != b.colour]
    return singles + pairs


def split_captions(seed: int = SPLIT_SEED, held_out_singles: int = HELD_OUT_SINGLES,
                   held_out_pairs: int = HELD_OUT_PAIRS) -> tuple[list[Caption], list[Caption]]:
    """(training captions, held-out captions): a fixed random set of combinations never trained on."""
    captions = all_captions()
    singles = [c for c in captions if not c.is_pair]
    pairs = [c for c in captions if c.is_pair]
    rng = random.Random(seed)
    held = set(rng.sample(singles, held_out_singles)) | set(rng.sample(pairs, held_out_pairs))
    return [c for c in captions if c not in held], [c for c in captions if c in held]


# --------------------------------------------------------------------------------------------
# Rendering

@dataclass(frozen=True)
class PlacedShape:
    """A shape as drawn: centre (x, y) and size (side / diameter) in pixels."""

    spec: ShapeSpec
    cx: float
    cy: float
    size: float


def _draw_shape(draw: ImageDraw.ImageDraw, placed: PlacedShape, scale: int) -> None:
    colour = COLOURS[placed.spec.colour]
    x, y, half = placed.cx * scale, placed.cy * scale, placed.size * scale / 2
    if placed.spec.shape == "circle":
        draw.ellipse([x - half, y - half, x + half, y + half], fill=colour)
    elif placed.spec.shape == "square":
        draw.rectangle([x - half, y - half, x + half, y + half], fill=colour)
    elif placed.spec.shape == "bar":
        draw.rectangle([x - BAR_WIDTH * half, y - BAR_HEIGHT * half, x + BAR_WIDTH * half, y + BAR_HEIGHT * half],
                       fill=colour)
    else:  # upward isosceles triangle filling its bounding square
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=colour)


def layout(caption: Caption, rng: np.random.Generator) -> list[PlacedShape]:
    """Random placement (position jitter, size) that the caption describes."""
    if not caption.is_pair:
        cx, cy = POSITIONS[caption.position]
        size = rng.uniform(18, 26)
        return [PlacedShape(caption.first, cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3), size)]
    size_a, size_b = rng.uniform(15, 21), rng.uniform(15, 21)
    near, far = rng.uniform(14, 21), rng.uniform(43, 50)   # along the relation axis
    across_a, across_b = rng.uniform(14, 50), rng.uniform(14, 50)
    first_leads = caption.relation in ("above", "to the left of")  # first shape nearer the origin
    a_main, b_main = (near, far) if first_leads else (far, near)
    if caption.relation in ("above", "below"):
        return [PlacedShape(caption.first, across_a, a_main, size_a), PlacedShape(caption.second, across_b, b_main, size_b)]
    return [PlacedShape(caption.first, a_main, across_a, size_a), PlacedShape(caption.second, b_main, across_b, size_b)]


def render(caption: Caption, rng: np.random.Generator, background: str | None = None) -> np.ndarray:
    """Draw a random image the caption describes: uint8 [64, 64, 3]."""
    if background is None:
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    big = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    for placed in layout(caption, rng):
        _draw_shape(draw, placed, SUPERSAMPLE)
    return np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))


def edge_map(image: np.ndarray, threshold: float = 40.0, thicken: int = 1) -> np.ndarray:
    """White-on-black edge map of an RGB uint8 image: largest per-channel central gradient above ``threshold``.

    Lines are widened by ``thicken`` pixels on each side (about 4 px in all): at 8x downsampling a
    1-2 px line is a faint detail that a 512-code tokenizer trained for minutes learns to drop.
    """
    pixels = image.astype(np.float32)
    gy, gx = np.gradient(pixels, axis=(0, 1))
    magnitude = np.sqrt(gx ** 2 + gy ** 2).max(axis=2)
    edges = magnitude > threshold
    for _ in range(thicken):
        padded = np.pad(edges, 1)
        edges = edges | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return np.repeat(np.where(edges, 255, 0).astype(np.uint8)[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------------------------
# Training / evaluation samples

@dataclass(frozen=True)
class Sample:
    """One example: the full image (dual-panel tasks: both panels), its task, caption and prompt text."""

    task: str
    caption: Caption
    image: np.ndarray   # uint8 [H, W, 3]; H = 128 for dual-panel tasks

    @property
    def width(self) -> int:
        """Full image width in pixels."""
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        """Full image height in pixels (both panels for dual-panel tasks)."""
        return int(self.image.shape[0])

    def prompt_text(self) -> str:
        """The task's official template filled with the full size and the caption."""
        return task_prompt(self.task, self.caption.text(), self.width, self.height)

    @property
    def upper(self) -> np.ndarray:
        """The upper panel (dual-panel tasks) or the whole image."""
        return self.image[: self.height // 2] if self.task != "t2i" else self.image

    @property
    def lower(self) -> np.ndarray:
        """The lower panel (dual-panel tasks) or the whole image."""
        return self.image[self.height // 2:] if self.task != "t2i" else self.image


def task_prompt(task: str, caption_text: str, width: int, height: int) -> str:
    """Prompt text for a demo task, from the official template of ``lumina_core.tasks``."""
    if task not in DEMO_TASKS:
        raise ValueError(f"the demo model knows tasks {list(DEMO_TASKS)}, not {task!r}")
    return get_task(task).template("official").format(w=width, h=height, prompt=caption_text, subject="")


def make_sample(task: str, caption: Caption, rng: np.random.Generator) -> Sample:
    """Render one example of ``task`` for ``caption``."""
    image = render(caption, rng)
    if task == "t2i":
        return Sample(task, caption, image)
    edges = edge_map(image)
    if task == "control_canny":    # edge map given above, the image below
        return Sample(task, caption, np.concatenate([edges, image], axis=0))
    if task == "dense_canny":      # image given above, its edge map below
        return Sample(task, caption, np.concatenate([image, edges], axis=0))
    raise ValueError(f"the demo model knows tasks {list(DEMO_TASKS)}, not {task!r}")


def iter_samples(captions: Sequence[Caption], seed: int, task_mix: dict[str, float] | None = None,
                 single_fraction: float = 0.4) -> Iterator[Sample]:
    """Endless random samples over ``captions``: tasks drawn by ``task_mix``, singles at ``single_fraction``."""
    mix = DEFAULT_TASK_MIX if task_mix is None else task_mix
    unknown = set(mix) - set(DEMO_TASKS)
    if unknown:
        raise ValueError(f"unknown demo tasks {sorted(unknown)}; allowed: {list(DEMO_TASKS)}")
    tasks, weights = list(mix), np.array([mix[t] for t in mix], dtype=np.float64)
    weights /= weights.sum()
    singles = [c for c in captions if not c.is_pair]
    pairs = [c for c in captions if c.is_pair]
    if not singles or not pairs:
        single_fraction = 1.0 if singles else 0.0
    rng = np.random.default_rng(seed)
    while True:
        pool = singles if rng.random() < single_fraction else pairs
        caption = pool[int(rng.integers(len(pool)))]
        task = tasks[int(rng.choice(len(tasks), p=weights))]
        yield make_sample(task, caption, rng)


def write_dataset(folder: str | os.PathLike, count: int, seed: int = 0, captions: Sequence[Caption] | None = None,
                  task_mix: dict[str, float] | None = None, single_fraction: float = 0.4) -> Path:
    """Write ``count`` samples as PNG panels plus ``records.json`` in the ``train prepare`` format; return its path.

    Each record: ``task``, ``prompt`` (the bare caption; ``prepare`` fills the task template),
    ``image`` (whole image, or the upper panel), ``second_image`` (lower panel of dual-panel tasks),
    ``width``/``height`` (full image) and ``caption`` (same as prompt, kept for evaluation).
    Paths are relative to the folder.
    """
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    if captions is None:
        captions = split_captions()[0]
    records = []
    for i, sample in zip(range(count), iter_samples(captions, seed, task_mix, single_fraction)):
        record = {"task": sample.task, "prompt": sample.caption.text(), "caption": sample.caption.text(),
                  "width": sample.width, "height": sample.height}
        if sample.task == "t2i":
            record["image"] = f"images/{i:07d}.png"
            Image.fromarray(sample.image, "RGB").save(folder / record["image"])
        else:
            record["image"], record["second_image"] = f"images/{i:07d}_upper.png", f"images/{i:07d}_lower.png"
            Image.fromarray(np.ascontiguousarray(sample.upper), "RGB").save(folder / record["image"])
            Image.fromarray(np.ascontiguousarray(sample.lower), "RGB").save(folder / record["second_image"])
        records.append(record)
    target = folder / "records.json"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".records.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(records, f)
    os.replace(tmp, target)
    return target


def vocabulary() -> list[str]:
    """Every word the demo captions use (for the tiny tokenizer)."""
    words = ["a", "an", *COLOURS, *SHAPES]
    for phrase in [*POSITIONS, *RELATIONS]:
        words.extend(phrase.split())
    return sorted(set(words))
