"""Output layouts: where an item's images go and how they are written (the one PNG writer, with settings).

A layout decides the relative paths of an item's files (what resume checks for) and writes them,
each atomically. Every PNG carries the settings that made it in its ``lumina_mgpt2`` text chunk
(never a key: ``image_metadata`` takes only recorded run settings, which hold none).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import InputError
from ..fileio import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from .items import BatchItem

LAYOUTS = ("plain", "geneval", "dpg", "pairs")
# `generate --prompt`: one item, files named by task and seed in the output folder.
SINGLE = "single"
# Images per prompt the benchmark scorers expect (GenEval: 4 samples; DPG-Bench: a 2x2 grid).
BENCHMARK_IMAGES = {"geneval": 4, "dpg": 4}
PNG_TEXT_KEY = "lumina_mgpt2"


def save_png(image: Image.Image, path: Path, metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Save a PNG atomically, with ``metadata`` as JSON in its ``lumina_mgpt2`` text chunk."""
    info = PngInfo()
    if metadata is not None:
        info.add_text(PNG_TEXT_KEY, json.dumps(metadata, sort_keys=True, default=str))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def prepare_output_dir(folder: Path) -> Path:
    """Create the output folder and check that files can be written there (InputError otherwise), before any work."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--output {folder} is a file, not a folder; name a folder for the images")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InputError(f"--output {folder}: cannot write there ({reason}); name a folder you can write to") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"--output {folder}: no permission to write there; name a folder you can write to")
    return folder


def image_metadata(item: "BatchItem", settings: Mapping[str, Any], seed: Any, facts: Mapping[str, Any]) -> dict:
    """What a PNG records: the request, the run settings (sampling fields at the top), its seed, sampler stats."""
    run = dict(settings)
    sampling = run.pop("sampling", None) or {}
    meta = {"task": item.task, "template": item.template, "prompt": item.prompt, "width": item.width,
            "height": item.height, "subject": item.subject or None,
            "reference": Path(item.reference).name if item.reference else None, **sampling, **run, "seed": seed}
    if facts.get("think"):
        meta["refined_prompt"] = facts["think"]["prompt"]
    if facts.get("stats"):
        meta["sampler_stats"] = dict(facts["stats"])
    return meta


def grid_image(images: Sequence[Image.Image]) -> Image.Image:
    """Tile images row-major into a near-square grid (4 images -> 2x2, DPG-Bench's order)."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height))
    for n, image in enumerate(images):
        grid.paste(image, ((n % cols) * width, (n // cols) * height))
    return grid


def layout_paths(layout: str, item: "BatchItem", count: int, seeds: Optional[Sequence[int]] = None) -> list[str]:
    """Relative paths of the files an item produces in a layout (what resume checks for).

    The single layout names files by seed (``seeds``; by default the item's ``seed``, ``seed + 1``...).
    """
    if layout == SINGLE:
        seeds = list(seeds) if seeds is not None else [item.seed + n for n in range(count)]
        return [f"lumina_{item.task}_{seed:06d}.png" for seed in seeds[:count]]
    if layout == "plain":
        return [f"{item.key}_{n}.png" for n in range(count)]
    if layout == "geneval":
        folder = f"{item.index:05d}"
        return [f"{folder}/metadata.jsonl"] + [f"{folder}/samples/{n:04d}.png" for n in range(count)]
    if layout == "dpg":
        return [f"{item.key}.png"]
    if layout == "pairs":
        return [f"{part}/{item.key}_{n}.png" for n in range(count) for part in ("upper", "lower")]
    raise ValueError(f"unknown layout {layout!r}; allowed: {list(LAYOUTS)}")


def write_item_outputs(layout: str, out_dir: Path, item: "BatchItem", images: Sequence[Image.Image],
                       metadata: Optional[Sequence[Mapping[str, Any]]] = None,
                       seeds: Optional[Sequence[int]] = None) -> list[str]:
    """Write an item's images (and GenEval metadata) in the layout, each file atomically; return relative paths.

    ``metadata[n]`` goes into the PNG(s) of image n (a DPG grid records the first with every seed).
    """
    paths = layout_paths(layout, item, len(images), seeds)
    meta = list(metadata) if metadata is not None else [None] * len(images)
    if layout in (SINGLE, "plain"):
        for image, rel, info in zip(images, paths, meta):
            save_png(image, out_dir / rel, info)
    elif layout == "geneval":
        # GenEval's scorer json.load()s this file: exactly the prompt's metadata object.
        atomic_write_text(out_dir / paths[0], json.dumps(dict(item.source)) + "\n")
        for image, rel, info in zip(images, paths[1:], meta):
            save_png(image, out_dir / rel, info)
    elif layout == "dpg":
        grid_info = None if meta[0] is None else {**meta[0], "seed": [m["seed"] for m in meta]}
        save_png(grid_image(images), out_dir / paths[0], grid_info)
    elif layout == "pairs":
        for n, (image, info) in enumerate(zip(images, meta)):
            width, height = image.size
            save_png(image.crop((0, 0, width, height // 2)), out_dir / paths[2 * n], info)
            save_png(image.crop((0, height // 2, width, height)), out_dir / paths[2 * n + 1], info)
    else:
        raise ValueError(f"unknown layout {layout!r}; allowed: {list(LAYOUTS)}")
    return paths


def pairs_index_records(records: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Pairs-index lines from manifest records of the pairs layout, in the item format of ``train prepare``.

    ``image`` is the upper panel, ``second_image`` the lower, both relative to the index file;
    ``width``/``height`` are the full dual-panel size; the prompt is the one the pair was generated with.
    """
    pairs = []
    for record in records:
        if record.get("status") != "ok":
            continue
        files = record["files"]
        prompt = (record.get("think") or {}).get("prompt", record["prompt"])
        for n in range(len(files) // 2):
            pairs.append({"id": f"{record['key']}_{n}", "task": record["task"], "prompt": prompt,
                          "image": files[2 * n], "second_image": files[2 * n + 1],
                          "width": record["width"], "height": record["height"], "seed": record["seeds"][n]})
    return pairs
