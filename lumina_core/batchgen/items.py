"""Items of a prompt file: parsing (text or JSONL), validation line by line, fixed seeds, sharding by rank.

Bad lines become ``BadLine`` s with their line number and reason; they are skipped and counted, so
one typo never stops thousands of prompts. An item's seed comes from the item (its ``seed`` field,
else run seed + index x ``SEED_STRIDE``), never from the rank, so the same item gives the same
images whichever rank draws it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from PIL import Image

from ..errors import InputError
from ..request import Request
from ..tasks import get_task
from .layouts import LAYOUTS

# Fields of a JSONL item that this module reads; every other field is kept as ``extra``.
KNOWN_FIELDS = ("prompt", "task", "size", "width", "height", "reference", "seed", "images", "id", "template",
                "subject")
# An item without a seed gets run seed + index x SEED_STRIDE. Image n of an item uses seed + n
# (SamplingConfig), best-of-N candidates included, so with fewer than SEED_STRIDE images per item no
# two images of a file share a seed whatever the per-item counts, and an item's seed depends on its
# place in the file only (never on the rank, nor on other lines being fixed or broken).
SEED_STRIDE = 1000
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class PromptFileError(InputError):
    """A prompt file that cannot be read at all (missing, empty, or not text)."""

@dataclass(frozen=True)
class ItemDefaults:
    """What an item gets when its line does not say: task, size, seed base, images per prompt, template."""

    task: str = "t2i"
    width: int = 768
    height: int = 768
    seed: int = 0              # an item without a seed gets seed + index * SEED_STRIDE
    num_images: int = 1
    template: str = "official"


@dataclass(frozen=True)
class BatchItem:
    """One prompt of the file: what to generate, where it came from, and its fixed seed."""

    line: int                  # 1-based line number in the prompt file
    index: int                 # 0-based position among the file's non-blank lines (GenEval's folder index)
    key: str                   # unique name of the item: its ``id`` field, else the zero-padded index
    prompt: str
    task: str
    width: int
    height: int
    seed: int
    num_images: int
    template: str = "official"
    subject: str = ""
    reference: Optional[str] = None   # absolute path of the reference image (upper panel)
    source: Mapping[str, Any] = field(default_factory=dict)   # the line as parsed (GenEval's metadata)
    extra: Mapping[str, Any] = field(default_factory=dict)    # fields this module does not read, kept as given

    def request(self, prompt: Optional[str] = None, reference: Optional[Image.Image] = None) -> Request:
        """The ``Request`` of this item (``prompt`` overrides the text, e.g. after thinking)."""
        return Request(task=self.task, prompt=self.prompt if prompt is None else prompt, width=self.width,
                       height=self.height, reference=reference, template=self.template,
                       subject_description=self.subject)

    def fingerprint(self, settings: Mapping[str, Any]) -> str:
        """Hash of everything that decides this item's images: request fields, seed, count, run settings."""
        what = {"prompt": self.prompt, "task": self.task, "width": self.width, "height": self.height,
                "seed": self.seed, "num_images": self.num_images, "template": self.template,
                "subject": self.subject, "reference": self.reference, "settings": dict(settings)}
        text = json.dumps(what, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class BadLine:
    """A line of the prompt file that was skipped, and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_size(record: Mapping[str, Any], defaults: ItemDefaults, task_default: bool) -> tuple[int, int]:
    """(width, height) from ``size`` ("WxH", N or [W, H]) or ``width``/``height``; defaults otherwise."""
    if "size" in record and ("width" in record or "height" in record):
        raise ValueError("give either 'size' or 'width'/'height', not both")
    if "size" in record:
        size = record["size"]
        if _is_int(size):
            return size, size
        if isinstance(size, str):
            match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", size)
            if not match:
                raise ValueError(f"size {size!r} is not of the form 'WIDTHxHEIGHT' (e.g. '768x768')")
            return int(match.group(1)), int(match.group(2))
        if isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) for v in size):
            return int(size[0]), int(size[1])
        raise ValueError(f"size {size!r} must be 'WIDTHxHEIGHT', an integer, or [width, height]")
    width, height = record.get("width"), record.get("height")
    for name, value in (("width", width), ("height", height)):
        if value is not None and not _is_int(value):
            raise ValueError(f"{name} must be an integer number of pixels, got {value!r}")
    if task_default:
        # The task's own default size when the item names a task other than the run's.
        spec = get_task(record["task"])
        base_w, base_h = spec.default_width, spec.default_height
    else:
        base_w, base_h = defaults.width, defaults.height
    return (width if width is not None else base_w), (height if height is not None else base_h)


def _parse_record(record: Any, line: int, index: int, defaults: ItemDefaults, base_dir: Path) -> BatchItem:
    """Validate one JSON object into a BatchItem; raises ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("missing or empty 'prompt' (a non-empty string)")
    task = record.get("task", defaults.task)
    if not isinstance(task, str):
        raise ValueError(f"task must be a string, got {task!r}")
    get_task(task)  # unknown task: ValueError listing the allowed ones
    width, height = _parse_size(record, defaults, task_default="task" in record and task != defaults.task)
    num_images = record.get("images", defaults.num_images)
    if not _is_int(num_images) or not 1 <= num_images <= SEED_STRIDE:
        raise ValueError(f"images must be an integer in 1..{SEED_STRIDE}, got {num_images!r}")
    seed = record.get("seed", defaults.seed + index * SEED_STRIDE)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    template = record.get("template", defaults.template)
    subject = record.get("subject", "")
    if not isinstance(subject, str):
        raise ValueError(f"subject must be a string, got {subject!r}")
    key = record.get("id", f"{index:05d}")
    if _is_int(key):
        key = str(key)
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"id {key!r} is not usable as a file name (letters, digits, '_' and '-', up to 128)")

    reference = record.get("reference")
    placeholder = None
    if reference is not None:
        if not isinstance(reference, str) or not reference.strip():
            raise ValueError(f"reference must be a path to an image file, got {reference!r}")
        path = Path(reference).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if path.is_dir():
            raise ValueError(f"reference {path} is a folder; give an image file")
        if not path.is_file():
            raise ValueError(f"reference image not found: {path}")
        try:
            with Image.open(path) as probe:  # reads the header only
                probe_size = probe.size
        except Exception as error:
            raise ValueError(f"reference {path} is not a readable image: {error}") from None
        reference = str(path.resolve())
        # Validation only needs *an* image; the real one is loaded when the item is generated.
        placeholder = Image.new("RGB", probe_size)
    item = BatchItem(line=line, index=index, key=key, prompt=prompt, task=task, width=width, height=height,
                     seed=seed, num_images=num_images, template=template, subject=subject, reference=reference,
                     source=dict(record), extra={k: v for k, v in record.items() if k not in KNOWN_FIELDS})
    item.request(reference=placeholder)  # size off the grid, missing reference, bad template: raises here
    return item


def single_item(record: Mapping[str, Any], defaults: ItemDefaults = ItemDefaults(),
                base_dir: Optional[Path] = None) -> BatchItem:
    """The one item of ``generate --prompt``, checked by the prompt file's rules; InputError with the reason."""
    try:
        return _parse_record(dict(record), 0, 0, defaults, base_dir or Path.cwd())
    except InputError:
        raise
    except ValueError as error:
        raise InputError(str(error)) from None


def _looks_like_jsonl(path: Path, lines: Sequence[str]) -> bool:
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return True
    if path.suffix.lower() == ".txt":
        return False
    first = next((text for text in lines if text.strip()), "")
    return first.lstrip().startswith("{")


def parse_prompt_file(path: str | os.PathLike, defaults: ItemDefaults = ItemDefaults(),
                      layout: str = "plain") -> tuple[list[BatchItem], list[BadLine]]:
    """Read a text (a prompt a line) or JSONL prompt file into items and the bad lines that were skipped."""
    path = Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; allowed: {list(LAYOUTS)}")
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text: {error}") from None
    jsonl = _looks_like_jsonl(path, lines)
    base_dir = path.resolve().parent
    items: list[BatchItem] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    index = 0
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue  # blank lines take no index, so GenEval's indices stay those of its lines
        try:
            if jsonl:
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ValueError(f"malformed JSON: {error.msg} at column {error.colno}") from None
            else:
                record = {"prompt": text.strip()}
            item = _parse_record(record, number, index, defaults, base_dir)
            if layout == "pairs" and not get_task(item.task).dual_panel:
                raise ValueError(f"the pairs layout needs a dual-panel task; {item.task!r} makes one image")
            if item.key in seen:
                raise ValueError(f"duplicate id {item.key!r} (first on line {seen[item.key]})")
            seen[item.key] = number
            items.append(item)
        except ValueError as error:
            bad.append(BadLine(number, str(error)))
        index += 1
    if not items and not bad:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return items, bad


def shard(items: Sequence[BatchItem], rank: int, world_size: int) -> list[BatchItem]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank`` (disjoint, complete)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return list(items[rank::world_size])

