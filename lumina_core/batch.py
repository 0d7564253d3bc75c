"""Batch generation from a prompt file: items, sharding by rank, layouts, atomic outputs, resume, summary.

``python -m lumina_core generate --prompts FILE`` (and the same under ``torchrun``) lands here.
The flow of one run:

1. every rank parses the whole prompt file into ``BatchItem`` s (bad lines become ``BadLine`` s with
   their line number and reason, are skipped and counted);
2. every rank reads the manifests already in the output folder and drops the items that are done;
   a barrier makes sure no rank starts writing before all have read, so all ranks see the same
   pending list and ``shard`` splits it without overlap (a rerun with another world size rebalances);
3. each rank loads one model on its own device and generates its items; an item's seed comes from
   the item (its ``seed`` field, else ``--seed`` + index x ``SEED_STRIDE``), never from the rank, so the
   same item gives the same images whichever rank draws it;
4. images are written atomically, then the item's manifest line; a barrier; rank 0 merges the
   per-rank manifests into ``manifest.jsonl`` and writes the summary.

The output folder must be shared by all nodes (a network file system) for multi-node runs.

Examples::

    python -m lumina_core generate --model M --prompts prompts.txt --output out
    torchrun --nproc-per-node 8 -m lumina_core generate --model M --prompts evaluation_metadata.jsonl \
        --layout geneval --num-images 4 --sjd --output geneval_out
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m lumina_core generate --model M --prompts dpg_bench_prompts.jsonl --layout dpg --num-images 4 ...

Rerunning the same command resumes: finished items (same request, same settings, files present)
are skipped, failed ones are tried again.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from PIL import Image

from . import dist
from .dist import RankInfo
from .errors import InputError
from .fileio import atomic_path, atomic_write_text
from .request import Request
from .tasks import get_task

LAYOUTS = ("plain", "geneval", "dpg", "pairs")
# Images per prompt the benchmark scorers expect (GenEval: 4 samples; DPG-Bench: a 2x2 grid).
BENCHMARK_IMAGES = {"geneval": 4, "dpg": 4}
MANIFEST = "manifest.jsonl"
PAIRS_INDEX = "pairs.jsonl"
SUMMARY = "summary.json"
RANK_MANIFEST_RE = re.compile(r"^manifest\.rank(\d+)\.jsonl$")

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


# ---------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Atomic files (lumina_core.fileio: temp file in the same folder, fsync, os.replace)
# ---------------------------------------------------------------------------------------------

def save_image_atomic(image: Image.Image, path: Path) -> None:
    """Save a PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_jsonl_atomic(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write records as JSONL atomically (one compact JSON object a line)."""
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_jsonl_records(path: Path) -> list[dict]:
    """Records of a JSONL file; lines that are not JSON objects are skipped (a file edited by hand)."""
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("key"), str):
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

def grid_image(images: Sequence[Image.Image]) -> Image.Image:
    """Tile images row-major into a near-square grid (4 images -> 2x2, DPG-Bench's order)."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height))
    for n, image in enumerate(images):
        grid.paste(image, ((n % cols) * width, (n // cols) * height))
    return grid


def layout_paths(layout: str, item: BatchItem, count: int) -> list[str]:
    """Relative paths of the files an item produces in a layout (what resume checks for)."""
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


def write_item_outputs(layout: str, out_dir: Path, item: BatchItem, images: Sequence[Image.Image]) -> list[str]:
    """Write an item's images (and GenEval metadata) in the layout, each file atomically; return relative paths."""
    paths = layout_paths(layout, item, len(images))
    if layout == "plain":
        for image, rel in zip(images, paths):
            save_image_atomic(image, out_dir / rel)
    elif layout == "geneval":
        # GenEval's scorer json.load()s this file: exactly the prompt's metadata object.
        atomic_write_text(out_dir / paths[0], json.dumps(dict(item.source)) + "\n")
        for image, rel in zip(images, paths[1:]):
            save_image_atomic(image, out_dir / rel)
    elif layout == "dpg":
        save_image_atomic(grid_image(images), out_dir / paths[0])
    elif layout == "pairs":
        for n, image in enumerate(images):
            width, height = image.size
            save_image_atomic(image.crop((0, 0, width, height // 2)), out_dir / paths[2 * n])
            save_image_atomic(image.crop((0, height // 2, width, height)), out_dir / paths[2 * n + 1])
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


# ---------------------------------------------------------------------------------------------
# Manifest: per-rank files, merged at the end
# ---------------------------------------------------------------------------------------------
# Why per-rank files rewritten by atomic replace (rather than one shared file appended by all):
# appends from several processes (possibly on several nodes over NFS) can interleave or tear a line
# when a process is killed mid-write, and NFS does not honour O_APPEND across clients. A file only
# one process writes, replaced whole through a temp file + fsync + os.replace, is a valid JSONL file
# at every moment, and a kill loses at most the line not yet written (the item being worked on).
# Rewriting costs O(items of this rank) per item: a few hundred kB against seconds of sampling.

def rank_manifest_path(out_dir: Path, rank: int) -> Path:
    """The manifest file rank ``rank`` writes."""
    return out_dir / f"manifest.rank{rank}.jsonl"


def manifest_files(out_dir: Path) -> list[Path]:
    """The merged manifest and every per-rank manifest present in ``out_dir``."""
    files = [out_dir / MANIFEST] if (out_dir / MANIFEST).is_file() else []
    if out_dir.is_dir():
        files += sorted(p for p in out_dir.iterdir() if RANK_MANIFEST_RE.match(p.name))
    return files


def _prefer(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """True when ``new`` should replace ``old`` for the same key: a success beats a failure, then the newer."""
    old_ok, new_ok = old.get("status") == "ok", new.get("status") == "ok"
    if old_ok != new_ok:
        return new_ok
    return str(new.get("finished_at", "")) >= str(old.get("finished_at", ""))


def read_manifest(out_dir: Path) -> dict[str, dict]:
    """All records of ``out_dir``'s manifests, one per item key (success over failure, then the newest)."""
    merged: dict[str, dict] = {}
    for path in manifest_files(out_dir):
        for record in read_jsonl_records(path):
            key = record["key"]
            if key not in merged or _prefer(merged[key], record):
                merged[key] = record
    return merged


def merge_manifests(out_dir: Path, layout: str) -> list[dict]:
    """Merge every manifest into ``manifest.jsonl`` (sorted by item index), remove rank files; write pairs index."""
    rank_files = [p for p in manifest_files(out_dir) if p.name != MANIFEST]
    records = sorted(read_manifest(out_dir).values(), key=lambda r: (r.get("index", 0), r["key"]))
    write_jsonl_atomic(out_dir / MANIFEST, records)
    # Only after manifest.jsonl holds their lines; a crash in between leaves duplicates that merge away.
    for path in rank_files:
        path.unlink(missing_ok=True)
    if layout == "pairs":
        write_jsonl_atomic(out_dir / PAIRS_INDEX, pairs_index_records(records))
    return records


def is_done(record: Optional[Mapping[str, Any]], fingerprint: str, out_dir: Path) -> bool:
    """True when the record is a success for the same request and settings and all its files exist."""
    return (record is not None and record.get("status") == "ok" and record.get("fingerprint") == fingerprint
            and all((out_dir / rel).is_file() for rel in record.get("files", ())))


# Ranks finish their shares at different times; the slowest may run hours after the fastest
# (torchrun tears the job down if a rank dies, so this wait does not outlive a crash).
FINISH_TIMEOUT = datetime.timedelta(hours=72)


# ---------------------------------------------------------------------------------------------
# Progress and summary
# ---------------------------------------------------------------------------------------------

class RankProgress:
    """One progress bar per rank (items/s and ETA), stacked by rank on a shared terminal."""

    def __init__(self, total: int, info: RankInfo, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"rank {info.rank}/{info.world_size}", unit="item", position=info.rank,
                        disable=not enabled, dynamic_ncols=True, leave=True, file=sys.stderr)

    def item_done(self, images: int, failed: bool) -> None:
        """Advance by one item."""
        self.bar.update(1)
        if failed:
            self.bar.set_postfix_str("last item failed", refresh=False)

    def close(self) -> None:
        """Finish the bar."""
        self.bar.close()


@dataclass
class BatchSummary:
    """What a run did: items in the file, bad lines, items done before, generated, images, time, failures."""

    items: int = 0
    bad_lines: list[BadLine] = field(default_factory=list)
    skipped_done: int = 0
    generated: int = 0
    images: int = 0
    seconds: float = 0.0            # summed over ranks (GPU-seconds of generation)
    wall_seconds: float = 0.0       # of the whole run, slowest rank
    failures: list[dict] = field(default_factory=list)   # {"key", "line", "reason"}
    world_size: int = 1
    out_dir: str = ""

    @property
    def seconds_per_image(self) -> float:
        """Generation seconds per image (device time, summed over ranks)."""
        return self.seconds / self.images if self.images else 0.0

    @property
    def complete(self) -> bool:
        """True when every valid item of the file has its outputs."""
        return not self.failures

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"items": self.items, "bad_lines": [dataclasses.asdict(b) for b in self.bad_lines],
                "skipped_done": self.skipped_done, "generated": self.generated, "images": self.images,
                "seconds": round(self.seconds, 3), "wall_seconds": round(self.wall_seconds, 3),
                "seconds_per_image": round(self.seconds_per_image, 4), "failures": self.failures,
                "world_size": self.world_size, "out_dir": self.out_dir}

    def text(self) -> str:
        """Human-readable summary."""
        lines = [f"batch: {self.items} items in the file, {len(self.bad_lines)} bad lines skipped, "
                 f"{self.skipped_done} already done, {self.generated} generated ({self.images} images) "
                 f"on {self.world_size} rank(s) in {self.wall_seconds:.1f} s wall, "
                 f"{self.seconds_per_image:.2f} s/image, {len(self.failures)} failed -> {self.out_dir}"]
        lines += [f"  bad {bad}" for bad in self.bad_lines]
        lines += [f"  failed line {f['line']} ({f['key']}): {f['reason']}" for f in self.failures]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Generation of one item
# ---------------------------------------------------------------------------------------------

Scorer = Callable[[Sequence[Image.Image], str], Sequence[float]]


@dataclass(frozen=True)
class BatchOptions:
    """Run-wide options: layout, sampling config (seed and count are per item), thinking, best-of-N."""

    layout: str = "plain"
    defaults: ItemDefaults = ItemDefaults()
    sampling: Any = None                  # lumina_core.sampling.SamplingConfig; seed/num_images replaced per item
    settings: Mapping[str, Any] = field(default_factory=dict)   # model, dtype, quant...: recorded, fingerprinted
    think: Any = None                     # lumina_core.think.ThinkConfig, or None for no thinking
    best_of: int = 1                      # candidates per kept image, ranked by ``scorer``
    scorer: Optional[Scorer] = None
    progress: bool = True

    def run_settings(self) -> dict:
        """Everything besides the item that decides its images (recorded in and fingerprinting each line)."""
        sampling = dataclasses.asdict(self.sampling) if dataclasses.is_dataclass(self.sampling) else {}
        sampling.pop("seed", None)
        sampling.pop("num_images", None)
        think = dataclasses.asdict(self.think) if dataclasses.is_dataclass(self.think) else None
        if think is not None:
            think = {k: think[k] for k in ("base_url", "model", "temperature", "seed", "local_model")}
        return {"sampling": sampling, "think": think, "best_of": self.best_of, **dict(self.settings)}


def verifier_scorer(names: Sequence[str], device: str = "cpu", weights: Optional[Mapping[str, float]] = None,
                    method: str = "rank", **verifier_kwargs: Any) -> Scorer:
    """A best-of-N scorer from ``lumina_core.verify`` verifiers by name (combined score, higher is better)."""
    from .images import pil_to_unit
    from .verify import get_verifier, score_candidates

    verifiers = {name: get_verifier(name, device=device, **verifier_kwargs) for name in names}

    def score(images: Sequence[Image.Image], prompt: str) -> list[float]:
        pixels = pil_to_unit(images).permute(0, 3, 1, 2)
        _, ranking = score_candidates(pixels, prompt, verifiers, weights, method)
        return [float(v) for v in ranking.combined]

    return score


def _load_reference(item: BatchItem) -> Optional[Image.Image]:
    if item.reference is None:
        return None
    from .images import whiten_transparency

    with Image.open(item.reference) as image:
        image.load()
        return whiten_transparency(image)


def generate_item(pipeline: Any, item: BatchItem, options: BatchOptions) -> tuple[list[Image.Image], dict]:
    """Generate an item's images with the pipeline (thinking and best-of-N if asked); return images and facts."""
    from .images import tensor_to_pil

    facts: dict[str, Any] = {}
    prompt = item.prompt
    if options.think is not None:
        from .think import refine_prompt

        result = refine_prompt(item.prompt, options.think)
        prompt = result.prompt
        facts["think"] = {"prompt": result.prompt, "source": result.source, "warning": result.warning}
    request = item.request(prompt=prompt, reference=_load_reference(item))
    candidates = item.num_images * options.best_of
    sampling = dataclasses.replace(options.sampling, seed=item.seed, num_images=candidates)
    generated = pipeline.generate(request, sampling)
    pixels = pipeline.decode(generated.codes)
    images = [tensor_to_pil(pixels[n]) for n in range(pixels.shape[0])]
    seeds = [int(s) for s in generated.seeds] if generated.seeds is not None else []
    if options.best_of > 1:
        if options.scorer is None:
            raise ValueError("best_of > 1 needs a scorer (a verifier) to rank the candidates")
        # Judge what was asked (the original prompt: GenEval scores that one, and CLIP-style encoders cut
        # long refined prompts) and only what was generated (the lower panel when the upper is given).
        judged = [im.crop((0, im.height // 2, im.width, im.height)) for im in images] \
            if request.needs_reference else images
        scores = [float(s) for s in options.scorer(judged, item.prompt)]
        if len(scores) != len(images):
            raise ValueError(f"the scorer returned {len(scores)} scores for {len(images)} candidates")
        order = sorted(range(len(images)), key=lambda n: -scores[n])[: item.num_images]
        facts["candidate_scores"] = scores
        facts["candidate_seeds"] = seeds
        images = [images[n] for n in order]
        seeds = [seeds[n] for n in order] if seeds else []
        facts["scores"] = [scores[n] for n in order]
    facts["seeds"] = seeds
    stats = getattr(generated, "stats", None)
    if stats:
        facts["stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}
    return images, facts


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _base_record(item: BatchItem, fingerprint: str, info: RankInfo) -> dict:
    return {"key": item.key, "index": item.index, "line": item.line, "task": item.task, "prompt": item.prompt,
            "width": item.width, "height": item.height, "seed": item.seed, "num_images": item.num_images,
            "template": item.template, "reference": item.reference, "extra": dict(item.extra),
            "fingerprint": fingerprint, "rank": info.rank}


def run_batch(prompts: str | os.PathLike, out_dir: str | os.PathLike,
              load_pipeline: Callable[[str], Any], options: BatchOptions = BatchOptions(),
              info: Optional[RankInfo] = None) -> BatchSummary:
    """Generate every pending item of a prompt file into ``out_dir`` on this rank; rank 0 merges and summarises."""
    if options.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {options.layout!r}; allowed: {list(LAYOUTS)}")
    if options.best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {options.best_of}")
    if options.sampling is None:
        from .sampling import SamplingConfig

        options = dataclasses.replace(options, sampling=SamplingConfig())
    info = info or dist.init(timeout=FINISH_TIMEOUT)
    started = time.perf_counter()
    out = Path(out_dir)
    items, bad = parse_prompt_file(prompts, options.defaults, options.layout)
    settings = options.run_settings()

    out.mkdir(parents=True, exist_ok=True)
    existing = read_manifest(out)
    pending = [item for item in items if not is_done(existing.get(item.key), item.fingerprint(settings), out)]
    # Nobody writes before everybody has read: all ranks then hold the same pending list.
    dist.barrier(info)
    mine = shard(pending, info.rank, info.world_size)

    own_path = rank_manifest_path(out, info.rank)
    # Lines of a crashed earlier run with this rank number stay in the file this rank now rewrites.
    own_records = read_jsonl_records(own_path)
    generated = images_done = 0
    seconds = 0.0
    failures: list[dict] = []
    if mine:
        pipeline = load_pipeline(str(info.device))
        progress = RankProgress(len(mine), info, options.progress)
        try:
            for item in mine:
                fingerprint = item.fingerprint(settings)
                record = _base_record(item, fingerprint, info)
                t0 = time.perf_counter()
                try:
                    images, facts = generate_item(pipeline, item, options)
                    files = write_item_outputs(options.layout, out, item, images)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as error:  # one bad item must not stop thousands of others
                    reason = f"{type(error).__name__}: {error}"[:1000]
                    record.update(status="failed", reason=reason, finished_at=_now())
                    failures.append({"key": item.key, "line": item.line, "reason": reason})
                else:
                    elapsed = time.perf_counter() - t0
                    seconds += elapsed
                    generated += 1
                    images_done += len(images)
                    record.update(status="ok", files=files, settings=settings, seconds=round(elapsed, 4),
                                  seconds_per_image=round(elapsed / len(images), 4), finished_at=_now(), **facts)
                own_records.append(record)
                write_jsonl_atomic(own_path, own_records)
                progress.item_done(len(images) if record["status"] == "ok" else 0, record["status"] != "ok")
        finally:
            progress.close()

    mine_summary = {"generated": generated, "images": images_done, "seconds": seconds, "failures": failures,
                    "wall": time.perf_counter() - started}
    dist.barrier(info)
    gathered = dist.gather(info, mine_summary)
    summary = BatchSummary(items=len(items), bad_lines=bad, skipped_done=len(items) - len(pending),
                           world_size=info.world_size, out_dir=str(out))
    for part in gathered:
        summary.generated += part["generated"]
        summary.images += part["images"]
        summary.seconds += part["seconds"]
        summary.failures += part["failures"]
        summary.wall_seconds = max(summary.wall_seconds, part["wall"])
    summary.failures.sort(key=lambda f: f["line"])
    if info.rank == 0:
        merge_manifests(out, options.layout)
        atomic_write_text(out / SUMMARY, json.dumps(summary.to_dict(), indent=2))
    # Every rank returns once the merged manifest exists, and no rank tears the group down under rank 0.
    dist.barrier(info)
    return summary


# ---------------------------------------------------------------------------------------------
# Command line (``python -m lumina_core generate --prompts FILE ...``)
# ---------------------------------------------------------------------------------------------

def add_batch_arguments(parser: Any) -> None:
    """Add the batch options to the ``generate`` parser (the sampling options are shared with one prompt)."""
    parser.add_argument("--prompts", default=None,
                        help="prompt file: text (a prompt a line) or JSONL (prompt, task, size, reference, seed, "
                             "images, id, template, subject; other fields kept). Runs under torchrun too")
    parser.add_argument("--layout", default="plain", choices=LAYOUTS,
                        help="plain: <key>_<n>.png; geneval: <index>/metadata.jsonl + samples/<n>.png; "
                             "dpg: <id>.png 2x2 grid; pairs: upper/ and lower/ panels + pairs.jsonl")
    parser.add_argument("--best-of", type=int, default=1, help="candidates per kept image, ranked by --verifier")
    parser.add_argument("--verifier", action="append", default=None,
                        help="verifier for --best-of (repeatable): vqascore, aesthetic, pickscore, clipscore, "
                             "demo_check")
    parser.add_argument("--think", action="store_true", help="refine each prompt with an LLM first")
    parser.add_argument("--think-model", default="gpt-4o", help="LLM for --think")
    parser.add_argument("--think-base-url", default="", help="OpenAI-compatible endpoint for --think")
    parser.add_argument("--no-progress", action="store_true", help="no per-rank progress bars")


def batch_command(args: Any) -> BatchSummary:
    """Run ``generate --prompts``: parse, shard over torchrun ranks, generate, merge; print the summary on rank 0."""
    import torch

    from .sampling import SamplingConfig

    if getattr(args, "reference", None):
        raise ValueError("--reference is per item in batch mode: give a 'reference' field in the JSONL prompt file")
    if args.best_of > 1 and not args.verifier:
        raise ValueError("--best-of needs at least one --verifier to rank the candidates, e.g. --verifier vqascore")
    spec = get_task(args.task)
    defaults = ItemDefaults(task=args.task, width=args.width or spec.default_width,
                            height=args.height or spec.default_height, seed=args.seed, num_images=args.num_images,
                            template=args.template)
    expected = BENCHMARK_IMAGES.get(args.layout)
    if expected and args.num_images != expected:
        print(f"note: the {args.layout} scorer expects {expected} images per prompt; this run makes "
              f"{args.num_images} (--num-images)", file=sys.stderr)
    sampling = SamplingConfig(cfg=args.cfg, guidance=args.guidance, top_k=args.top_k, temperature=args.temperature,
                              sjd=args.sjd, sjd_window=args.sjd_window, sjd_coupled=args.coupled,
                              seed=args.seed, num_images=args.num_images)
    think = None
    if args.think:
        from .think import ThinkConfig

        think = ThinkConfig(base_url=args.think_base_url, model=args.think_model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype] if args.dtype else None
    settings = {"model": str(args.model), "dtype": args.dtype, "quant": args.quant,
                "verifiers": list(args.verifier or []) if args.best_of > 1 else []}
    info = dist.init(args.device, timeout=FINISH_TIMEOUT)
    scorer_box: dict[str, Scorer] = {}

    def load_pipeline(device: str) -> Any:
        from .pipeline import LuminaPipeline

        if args.best_of > 1:
            scorer_box["scorer"] = verifier_scorer(args.verifier, device=device, auto_download=args.download)
        return LuminaPipeline.from_pretrained(args.model, dtype=dtype, device=device, quant=args.quant,
                                              compile=args.compile, cuda_graphs=not getattr(args, "no_cuda_graphs", False),
                                              auto_download=args.download,
                                              movqgan_path=args.movqgan)

    def scorer(images: Sequence[Image.Image], prompt: str) -> Sequence[float]:
        return scorer_box["scorer"](images, prompt)

    options = BatchOptions(layout=args.layout, defaults=defaults, sampling=sampling, settings=settings, think=think,
                           best_of=args.best_of, scorer=scorer if args.best_of > 1 else None,
                           progress=not args.no_progress)
    summary = None
    try:
        summary = run_batch(args.prompts, args.output, load_pipeline, options, info)
    finally:
        dist.shutdown(clean=summary is not None)
    if info.rank == 0:
        print(summary.text())
    return summary
