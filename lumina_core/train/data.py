"""Training data: item descriptions, pre-tokenisation into shards with an index, and the sample stream.

A dataset description is a JSON list or a JSONL file of items::

    {"task": "t2i", "prompt": "a red fox", "image": "fox.jpg"}
    {"task": "pair_depth", "prompt": "a room", "image": "room.jpg", "second_image": "room_depth.png"}

``image`` is the whole picture of a single-panel task and the UPPER panel of a dual-panel task;
``second_image`` is the lower panel. Relative paths are relative to the description file. The
official key ``image_path`` is accepted for ``image``; ``task`` defaults to ``t2i``. Optional
``width``/``height`` fix the crop size (full image, both panels) instead of the official
variable-size rule.

Pre-tokenisation builds each item with the inference code path (``Request`` -> prompt text ->
``prompt_ids``; MoVQGAN codes -> ``image_ids``), so training and sampling share one token grammar.
Shards are safetensors files (``tokens`` int32 flat, ``offsets`` int64, ``prompt_lengths`` int64);
``index.json`` lists them and records how many items of the description were consumed, so a killed
``prepare`` resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import InputError
from ..fileio import atomic_path, atomic_write_text
from .files import save_safetensors, writing

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
BAD_ITEMS_FILE = "bad_items.jsonl"
TOKENIZER_DIR = "tokenizer"
INDEX_VERSION = 1
# The official pre-tokeniser writes this size-free T2I prompt for 10 % of its items (reference section d);
# inference never uses it, so it is opt-in here (`sizeless_prompt_prob`).
SIZELESS_T2I_TEMPLATE = "Generate an image according to the following prompt:\n{prompt}"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json")


class BadItem(InputError):
    """One dataset item that cannot be used; ``kind`` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.file = file


@dataclass(frozen=True)
class DataItem:
    """One training example as described by the user (paths already resolved)."""

    task: str
    prompt: str
    image: str
    second_image: str | None = None
    width: int | None = None
    height: int | None = None
    item_id: str = ""


# --------------------------------------------------------------------------------------------
# Reading the description

def read_description(path: str | os.PathLike) -> list[dict[str, Any] | BadItem]:
    """Read a JSON list or JSONL file; undecodable JSONL lines come back as ``BadItem`` entries."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset description not found: {path}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} starts like a JSON list but is not valid JSON: {e}") from None
        return list(data)
    entries: list[dict[str, Any] | BadItem] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as e:
            entries.append(BadItem("bad_json", f"line {line_no} of {path.name} is not valid JSON: {e}", str(path)))
    return entries


def parse_item(raw: Any, base_dir: Path, position: int) -> DataItem:
    """Validate one raw description entry into a ``DataItem`` (raises ``BadItem``)."""
    from ..tasks import get_task

    if isinstance(raw, BadItem):
        raise raw
    if not isinstance(raw, dict):
        raise BadItem("bad_entry", f"item {position} is a {type(raw).__name__}, expected a JSON object")
    task = raw.get("task", "t2i")
    try:
        spec = get_task(task)
    except ValueError as e:
        raise BadItem("unknown_task", str(e)) from None
    prompt = raw.get("prompt", raw.get("caption"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadItem("missing_prompt", f"item {position} has no non-empty 'prompt'")
    image = raw.get("image", raw.get("image_path"))
    if not isinstance(image, str) or not image:
        raise BadItem("missing_image", f"item {position} has no 'image' path")
    second = raw.get("second_image")
    if spec.dual_panel and not isinstance(second, str):
        raise BadItem("missing_second_image",
                      f"item {position}: task {task!r} is dual-panel and needs 'second_image' (the lower panel)")
    if not spec.dual_panel and second is not None:
        raise BadItem("unexpected_second_image", f"item {position}: task {task!r} is single-panel; drop 'second_image'")
    size = [raw.get("width"), raw.get("height")]
    if (size[0] is None) != (size[1] is None):
        raise BadItem("size_off_grid", f"item {position}: give both 'width' and 'height' or neither")
    for value in size:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise BadItem("size_off_grid", f"item {position}: width/height must be integers, got {value!r}")

    def resolve(p: str) -> str:
        return str(p if os.path.isabs(p) else base_dir / p)

    return DataItem(task=task, prompt=prompt, image=resolve(image),
                    second_image=resolve(second) if isinstance(second, str) else None,
                    width=size[0], height=size[1], item_id=str(raw.get("id", position)))


# --------------------------------------------------------------------------------------------
# Turning one item into tokens

@dataclass
class Tokenizing:
    """What pre-tokenisation needs: text tokenizer, its layout, MoVQGAN and the crop rule."""

    tokenizer: Any
    layout: Any
    movqgan: Any
    target_size: int = 512
    max_seq_len: int | None = None
    sizeless_prompt_prob: float = 0.0
    seed: int = 0

    def crop_sizes(self, dual_panel: bool) -> list[tuple[int, int]]:
        """Official training crop list (w, h) that the tokenizer's size tokens can express; a dual-panel
        item uses panels of half the area each (stacked: twice the height)."""
        from ..images import generate_crop_size_list
        from ..tokens import GRID_PIXELS

        patches = (self.target_size // GRID_PIXELS) ** 2
        sizes = generate_crop_size_list(patches // 2 if dual_panel else patches, GRID_PIXELS)
        # A small tokenizer (the demo's: 8 grids a side) cannot write the widest official crops: an
        # item given one would fail after encoding, so such crops are never chosen.
        height_factor = 2 if dual_panel else 1
        return [(w, h) for w, h in sizes
                if max(w, h * height_factor) // GRID_PIXELS <= self.layout.max_grids]


def _open_image(path: str) -> "Any":
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise BadItem("missing_file", f"image file not found: {path}", path)
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadItem("unreadable_image", f"cannot read image {path}: {e}", path) from None
    from ..images import whiten_transparency

    return whiten_transparency(image)


def tokenize_item(item: DataItem, tk: Tokenizing) -> tuple[list[int], int]:
    """Token ids of one item: BOS, prompt, separator, image grammar, separator (prompt length = the prefix)."""
    from ..images import center_crop, pil_to_tensor, var_center_crop
    from ..request import Request, RequestError
    from ..tasks import get_task
    from ..tokens import GRID_PIXELS, image_ids, prompt_ids

    spec = get_task(item.task)
    upper = _open_image(item.image)
    lower = _open_image(item.second_image) if spec.dual_panel else None
    for image, path in ((upper, item.image), (lower, item.second_image)):
        if image is not None and min(image.size) < GRID_PIXELS:
            raise BadItem("size_off_grid", f"image {path} is {image.size[0]}x{image.size[1]}, smaller than one "
                                           f"{GRID_PIXELS}-px grid", path)
    if item.width is not None:
        width, height = item.width, item.height
        panel = (width, height // 2) if spec.dual_panel else (width, height)
    else:
        crop = var_center_crop(upper, tk.crop_sizes(spec.dual_panel))
        panel = crop.size
        width, height = panel[0], panel[1] * (2 if spec.dual_panel else 1)
    if max(width, height) // GRID_PIXELS > tk.layout.max_grids:  # checked before the (slow) encoding
        raise BadItem("size_off_grid", f"item {item.item_id}: {width}x{height} needs more than the "
                                       f"{tk.layout.max_grids} grids a side the tokenizer has size tokens for",
                      item.image)
    try:
        # The request validates the size (grid, dual-panel split) and writes the prompt exactly as inference does.
        request = Request(task=item.task, prompt=item.prompt, width=width, height=height,
                          reference=upper if spec.reference_upper else None)
    except RequestError as e:
        raise BadItem("size_off_grid", f"item {item.item_id}: {e}", item.image) from None
    panels = [center_crop(upper, panel) if upper.size != panel else upper]
    if lower is not None:
        panels.append(center_crop(lower, panel) if lower.size != panel else lower)
    # Dual panel: the two panels' code grids stacked vertically make one W x H picture (upper first).
    # Each panel is encoded on its own, as inference encodes a reference panel: the MoVQGAN's
    # mid-block attention is global, so encoding the stacked picture would give the upper panel
    # codes that depend on the lower one, and training would see codes inference never produces.
    pixels = torch.stack([pil_to_tensor(p) for p in panels])
    codes = tk.movqgan.encode(pixels).cpu().flatten(0, 1)
    text = request.prompt_text()
    if item.task == "t2i" and tk.sizeless_prompt_prob > 0 and \
            random.Random(f"{tk.seed}:{item.item_id}").random() < tk.sizeless_prompt_prob:
        text = SIZELESS_T2I_TEMPLATE.format(prompt=item.prompt)
    prefix = prompt_ids(tk.tokenizer, tk.layout, text)
    try:
        body = image_ids(tk.layout, codes)
    except ValueError as e:  # e.g. more 32-px grids than the tokenizer has size tokens for
        raise BadItem("size_off_grid", f"item {item.item_id}: {e}", item.image) from None
    ids = prefix + body + [tk.layout.separator]
    if tk.max_seq_len is not None and len(ids) > tk.max_seq_len:
        raise BadItem("too_long", f"item {item.item_id}: {len(ids)} tokens exceed max_seq_len {tk.max_seq_len}",
                      item.image)
    return ids, len(prefix)


# --------------------------------------------------------------------------------------------
# Shards and the index

def _write_shard(path: Path, records: Sequence[tuple[list[int], int]]) -> int:
    lengths = [len(ids) for ids, _ in records]
    offsets = torch.zeros(len(records) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    tokens = torch.tensor([t for ids, _ in records for t in ids], dtype=torch.int32)
    prompt_lengths = torch.tensor([p for _, p in records], dtype=torch.int64)
    with atomic_path(path) as tmp:
        save_safetensors({"tokens": tokens, "offsets": offsets, "prompt_lengths": prompt_lengths}, tmp)
    return int(offsets[-1])


def load_index(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``index.json`` of a prepared data folder."""
    path = Path(out_dir) / INDEX_FILE
    if not path.is_file():
        what = "does not exist" if not Path(out_dir).is_dir() else f"has no {INDEX_FILE}"
        raise InputError(f"{out_dir} {what}: it is not a folder written by `prepare`; run `python -m "
                         f"lumina_core.train prepare DESCRIPTION --out {out_dir} ...` first")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not readable JSON ({e}); run `prepare` again into a new folder") from None
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        version = index.get("version") if isinstance(index, dict) else None
        raise InputError(f"{path} has index version {version}, this code reads {INDEX_VERSION}")
    return index


@dataclass
class PrepareSummary:
    """Counts of a prepare run."""

    items: int
    written: int
    bad: int
    bad_by_kind: dict[str, int]
    tokens: int
    shards: int

    def __str__(self) -> str:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.bad_by_kind.items())) or "none"
        return (f"{self.items} items: {self.written} written, {self.bad} skipped ({kinds}); "
                f"{self.tokens} tokens in {self.shards} shards")


def prepare(description: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
            movqgan_path: str | os.PathLike, target_size: int = 512, shard_size: int = 1000,
            max_seq_len: int | None = None, device: str = "cpu", progress: bool = True,
            sizeless_prompt_prob: float = 0.0, seed: int = 0) -> PrepareSummary:
    """Pre-tokenise a dataset description into shards + ``index.json`` in ``out_dir`` (resumes a partial run)."""
    from tqdm import tqdm

    from ..movqgan import load_movqgan
    from ..tokens import TokenLayout, load_text_tokenizer

    from ..tokens import GRID_PIXELS

    description = Path(description).resolve()
    out = Path(out_dir)
    # Everything that can be checked before minutes of encoding is checked first.
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise InputError(f"--tokenizer {tokenizer_dir}: no tokenizer.json there; give the model folder "
                         "(it holds tokenizer.json and tokenizer_config.json)")
    if not Path(movqgan_path).is_file():
        raise InputError(f"--movqgan {movqgan_path}: no such file; give the MoVQGAN checkpoint (movqgan_270M.ckpt)")
    if target_size < GRID_PIXELS or target_size % GRID_PIXELS:
        raise InputError(f"--target-size {target_size}: must be a positive multiple of {GRID_PIXELS}")
    entries = read_description(description)
    if not entries:
        raise InputError(f"{description} lists no items")
    index_path = out / INDEX_FILE
    if index_path.is_file():
        index = load_index(out)
        if index["description"] != str(description):
            raise InputError(f"{out} already holds data prepared from {index['description']}; "
                             f"use another output folder for {description}")
        if index["target_size"] != target_size:
            raise InputError(f"{out} was prepared with --target-size {index['target_size']}, this run asks for "
                             f"{target_size}: use the same size to resume, or another --out")
        logger.info("resuming prepare at item %d of %d", index["items_done"], len(entries))
    else:
        index = {"version": INDEX_VERSION, "description": str(description), "target_size": target_size,
                 "sizeless_prompt_prob": sizeless_prompt_prob, "seed": seed,
                 "items_done": 0, "shards": [], "bad_by_kind": {}, "num_records": 0, "num_tokens": 0}
    # A copy of the tokenizer travels with the data, so `fit`/`export` know the exact vocabulary used.
    tok_copy = out / TOKENIZER_DIR
    tokenizer = load_text_tokenizer(tokenizer_dir)
    layout = TokenLayout.from_tokenizer(tokenizer)
    _check_crops_fit(entries, Tokenizing(tokenizer, layout, None, target_size=index["target_size"]), tokenizer_dir)
    movq = load_movqgan(movqgan_path, device=device)
    if movq.config.n_embed != layout.num_image_codes:
        raise InputError(f"MoVQGAN {movqgan_path} has {movq.config.n_embed} codes but the tokenizer in "
                         f"{tokenizer_dir} has {layout.num_image_codes} image tokens; give the pair made together")
    with writing(tok_copy):
        tok_copy.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file() and not (tok_copy / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, tok_copy / name)
    tk = Tokenizing(tokenizer, layout, movq, target_size=index["target_size"], max_seq_len=max_seq_len,
                    sizeless_prompt_prob=index.get("sizeless_prompt_prob", 0.0), seed=index.get("seed", 0))
    bad_log = out / BAD_ITEMS_FILE
    start = index["items_done"]
    pending: list[tuple[list[int], int]] = []
    pending_bad: list[dict[str, Any]] = []

    def flush(items_done: int) -> None:
        # Shard first, then the bad-item lines, then the index: the index only ever names complete shards.
        if pending:
            name = f"shard-{len(index['shards']):05d}.safetensors"
            with writing(out / name):
                n_tokens = _write_shard(out / name, pending)
            index["shards"].append({"file": name, "records": len(pending), "tokens": n_tokens})
            index["num_records"] += len(pending)
            index["num_tokens"] += n_tokens
        if pending_bad:
            with open(bad_log, "a", encoding="utf-8") as f:
                for entry in pending_bad:
                    f.write(json.dumps(entry) + "\n")
                    index["bad_by_kind"][entry["kind"]] = index["bad_by_kind"].get(entry["kind"], 0) + 1
        index["items_done"] = items_done
        with writing(index_path):
            atomic_write_text(index_path, json.dumps(index, indent=1))
        pending.clear()
        pending_bad.clear()

    if bad_log.is_file() and start == 0:
        bad_log.unlink()
    bar = tqdm(total=len(entries), initial=start, disable=not progress, desc="prepare", unit="item")
    for position in range(start, len(entries)):
        try:
            item = parse_item(entries[position], description.parent, position)
            pending.append(tokenize_item(item, tk))
        except BadItem as e:
            logger.warning("skipping item %d: %s", position, e)
            pending_bad.append({"item": position, "kind": e.kind, "file": e.file, "reason": str(e)})
        except Exception as e:  # noqa: BLE001 - a long run must not die on one strange file
            logger.warning("skipping item %d: unexpected %s: %s", position, type(e).__name__, e)
            pending_bad.append({"item": position, "kind": "error", "file": None,
                                "reason": f"{type(e).__name__}: {e}"})
        bar.update(1)
        if len(pending) >= shard_size:
            flush(position + 1)
    flush(len(entries))
    bar.close()
    bad = sum(index["bad_by_kind"].values())
    summary = PrepareSummary(items=len(entries), written=index["num_records"], bad=bad,
                             bad_by_kind=dict(index["bad_by_kind"]), tokens=index["num_tokens"],
                             shards=len(index["shards"]))
    if summary.written == 0:
        # Nothing to train on: a failure, and the index goes so that a fixed rerun starts over.
        index_path.unlink()
        raise InputError(f"prepare wrote none of the {summary.items} items ({summary.bad} skipped: "
                         f"{', '.join(f'{k} {v}' for k, v in sorted(summary.bad_by_kind.items()))}); "
                         f"{_fix_for(out / BAD_ITEMS_FILE)}")
    logger.info("prepare done: %s", summary)
    return summary


def _check_crops_fit(entries: list[Any], tk: Tokenizing, tokenizer_dir: str | os.PathLike) -> None:
    """Refuse a --target-size whose crops the tokenizer cannot write, when some item relies on those crops."""
    from ..tasks import get_task
    from ..tokens import GRID_PIXELS

    kinds = set()
    for entry in entries:
        if isinstance(entry, dict) and entry.get("width") is None:
            try:
                kinds.add(get_task(entry.get("task", "t2i")).dual_panel)
            except ValueError:
                continue  # reported as a bad item
    for dual_panel in sorted(kinds):
        if not tk.crop_sizes(dual_panel):
            largest = tk.layout.max_grids * GRID_PIXELS
            raise InputError(f"--target-size {tk.target_size} makes crops of {tk.target_size // GRID_PIXELS} grids "
                             f"a side; the tokenizer in {tokenizer_dir} has size tokens up to {tk.layout.max_grids} "
                             f"({largest} px): use --target-size {largest // (2 if dual_panel else 1)} or less, "
                             "or give items width/height")


# What to do about the most common reason nothing was written, by BadItem kind.
_FIXES = {
    "size_off_grid": "images need at least 32 px a side and sizes the tokenizer can write: use smaller "
                     "images' sizes, a smaller --target-size, or fix width/height",
    "missing_file": "image paths are relative to the description file: check them",
    "unreadable_image": "the image files are not images PIL can read: convert them (PNG, JPEG)",
    "too_long": "raise --max-seq-len or use a smaller --target-size",
}


def _fix_for(bad_log: Path) -> str:
    """The first recorded reason and what to do about the most common kind (from bad_items.jsonl)."""
    entries = [json.loads(line) for line in bad_log.read_text(encoding="utf-8").splitlines()] \
        if bad_log.is_file() else []
    if not entries:
        return f"see {bad_log}"
    kinds = [e["kind"] for e in entries]
    common = max(set(kinds), key=kinds.count)
    fix = _FIXES.get(common, "fix the items listed there")
    return f"first: {entries[0]['reason']}; {fix} (all reasons in {bad_log})"


__all__ = ["DataItem", "BadItem", "PrepareSummary", "prepare", "read_description", "parse_item", "tokenize_item",
           "load_index"]
