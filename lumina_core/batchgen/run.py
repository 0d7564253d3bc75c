"""A batch run: options, one item's generation (thinking, best-of-N), the run over this rank's share, the summary.

The flow of ``run_batch``:

1. every rank parses the whole prompt file into items (bad lines are skipped and counted);
2. rank 0 takes the output folder's lock; every rank reads the manifests already there and drops the
   items that are done; a barrier makes sure no rank starts writing before all have read, so all
   ranks hold the same pending list and ``shard`` splits it without overlap (a rerun with another
   world size rebalances);
3. each rank loads one model on its own device and generates its items;
4. images are written atomically, then the item's manifest line; a barrier; rank 0 merges the
   per-rank manifests into ``manifest.jsonl``, writes the summary and releases the lock.

``run_single`` is ``generate --prompt``: the same generation and PNG writer for one item, no manifest.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from PIL import Image

from .. import dist
from ..dist import RankInfo
from ..errors import InputError
from ..fileio import atomic_write_text
from .items import BadLine, BatchItem, ItemDefaults, parse_prompt_file, shard
from .layouts import LAYOUTS, SINGLE, image_metadata, layout_paths, prepare_output_dir, write_item_outputs
from .manifest import (SUMMARY, acquire_lock, is_done, merge_manifests, rank_manifest_path, read_jsonl_records,
                       read_manifest, release_lock, write_jsonl_atomic)

# Ranks finish their shares at different times; the slowest may run hours after the fastest
# (torchrun tears the job down if a rank dies, so this wait does not outlive a crash).
FINISH_TIMEOUT = datetime.timedelta(hours=72)


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


@dataclass(frozen=True)
class BatchOptions:
    """Run-wide options: layout, sampling config (seed and count are per item), thinking, best-of-N."""

    layout: str = "plain"
    defaults: ItemDefaults = ItemDefaults()
    sampling: Any = None                  # lumina_core.sampling.SamplingConfig; seed/num_images replaced per item
    settings: Mapping[str, Any] = field(default_factory=dict)   # model, dtype, quant...: recorded, fingerprinted
    think: Any = None                     # lumina_core.think.ThinkConfig, or None for no thinking
    best_of: int = 1                      # candidates per kept image, ranked by ``verifiers``
    verifiers: Optional[Mapping[str, Any]] = None   # name -> lumina_core.verify.Verifier (weights load on first use)
    progress: bool = True
    memory_budget: Optional[float] = None  # GiB: each generation runs lumina_core.memory's plan within it

    def run_settings(self) -> dict:
        """Everything besides the item that decides its images (recorded in and fingerprinting each line)."""
        sampling = dataclasses.asdict(self.sampling) if dataclasses.is_dataclass(self.sampling) else {}
        sampling.pop("seed", None)
        sampling.pop("num_images", None)
        think = dataclasses.asdict(self.think) if dataclasses.is_dataclass(self.think) else None
        if think is not None:  # never the key (nor where it is kept)
            think = {k: think[k] for k in ("base_url", "model", "temperature", "seed", "local_model")}
        return {"sampling": sampling, "think": think, "best_of": self.best_of, **dict(self.settings)}

    def checked(self) -> "BatchOptions":
        """These options with a default SamplingConfig; InputError for a layout or best-of-N it cannot run."""
        if self.layout not in LAYOUTS and self.layout != SINGLE:
            raise InputError(f"unknown layout {self.layout!r}; allowed: {list(LAYOUTS)}")
        if self.best_of < 1:
            raise InputError(f"best_of must be >= 1, got {self.best_of}")
        if self.best_of > 1 and not self.verifiers:
            raise InputError("--best-of needs at least one --verifier to rank the candidates, e.g. --verifier vqascore")
        if self.sampling is None:
            from ..sampling import SamplingConfig

            return dataclasses.replace(self, sampling=SamplingConfig())
        return self


def load_reference(item: BatchItem) -> Optional[Image.Image]:
    """The item's reference image, decoded whole (transparency on white); InputError when it cannot be read."""
    if item.reference is None:
        return None
    from ..images import whiten_transparency

    try:
        with Image.open(item.reference) as image:
            image.load()
            return whiten_transparency(image)
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt past the header
        raise InputError(f"reference {item.reference} is not a readable image: {error}") from None


def generate_item(pipeline: Any, item: BatchItem, options: BatchOptions,
                  progress: Optional[Callable] = None) -> tuple[list[Image.Image], dict]:
    """Generate an item's images with the pipeline (thinking and best-of-N if asked); return images and facts."""
    from ..images import tensor_to_pil, unit_to_uint8

    facts: dict[str, Any] = {}
    prompt = item.prompt
    if options.think is not None:
        from ..think import refine_prompt

        result = refine_prompt(item.prompt, options.think)
        prompt = result.prompt
        facts["think"] = {"prompt": result.prompt, "source": result.source, "warning": result.warning}
    request = item.request(prompt=prompt, reference=load_reference(item))
    sampling = dataclasses.replace(options.sampling, seed=item.seed, num_images=item.num_images * options.best_of)
    if options.best_of > 1:
        from ..verify import best_of_n

        # Judged against what was asked (the original prompt: GenEval scores that one).
        chosen = best_of_n(pipeline, request, sampling, options.verifiers, score_prompt=item.prompt,
                           progress=progress)
        generated = chosen.codes
        keep = chosen.order[: item.num_images]
        pixels = unit_to_uint8(chosen.images[keep]).permute(0, 2, 3, 1).numpy()
        images = [Image.fromarray(array, "RGB") for array in pixels]
        candidate_seeds = [int(s) for s in generated.seeds]
        facts["candidate_seeds"] = candidate_seeds
        facts["candidate_scores"] = {name: [float(v) for v in values] for name, values in chosen.scores.items()}
        facts["scores"] = {name: [float(values[n]) for n in keep] for name, values in chosen.scores.items()}
        seeds = [candidate_seeds[n] for n in keep]
    else:
        plan = None
        if options.memory_budget is not None:
            plan = pipeline.plan_memory(request, sampling, int(options.memory_budget * 2**30))
        generated = pipeline.generate(request, sampling, progress=progress, plan=plan)
        decoded = pipeline.decode(generated)
        images = [tensor_to_pil(decoded[n]) for n in range(decoded.shape[0])]
        seeds = [int(s) for s in generated.seeds] if generated.seeds is not None else []
    facts["seeds"] = seeds
    stats = getattr(generated, "stats", None)
    if stats:
        facts["stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}
    return images, facts


def _metadata(item: BatchItem, settings: Mapping[str, Any], facts: Mapping[str, Any], count: int) -> list[dict]:
    seeds = facts.get("seeds") or [None] * count
    return [image_metadata(item, settings, seed, facts) for seed in seeds]


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
    options = options.checked()
    info = info or dist.init(timeout=FINISH_TIMEOUT)
    started = time.perf_counter()
    out = Path(out_dir)
    items, bad = parse_prompt_file(prompts, options.defaults, options.layout)
    settings = options.run_settings()

    refusal = None
    if info.is_main:
        try:
            prepare_output_dir(out)
            acquire_lock(out, " ".join(sys.argv))
        except InputError as error:
            refusal = str(error)
    refusal = dist.gather(info, refusal)[0]  # every rank learns rank 0's outcome and stops alike
    if refusal:
        raise InputError(refusal)
    try:
        return _run_locked(items, bad, out, load_pipeline, options, settings, info, started)
    finally:
        if info.is_main:
            release_lock(out)


def _run_locked(items: list[BatchItem], bad: list[BadLine], out: Path, load_pipeline: Callable[[str], Any],
                options: BatchOptions, settings: dict, info: RankInfo, started: float) -> BatchSummary:
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
                    files = write_item_outputs(options.layout, out, item, images,
                                               _metadata(item, settings, facts, len(images)))
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


def run_single(item: BatchItem, out_dir: str | os.PathLike, load_pipeline: Callable[[str], Any],
               options: BatchOptions, device: str = "cpu", overwrite: bool = False) -> list[Path]:
    """``generate --prompt``: one item, files named by task and seed; refuses to replace files unless ``overwrite``."""
    options = options.checked()
    out = Path(out_dir)
    prepare_output_dir(out)
    # Every name a candidate could take (best-of-N keeps some of item.num_images x best_of seeds).
    candidates = layout_paths(SINGLE, item, item.num_images * options.best_of)
    taken = [name for name in candidates if (out / name).exists()]
    if taken and not overwrite:
        raise InputError(f"{out / taken[0]} already exists (pass --overwrite to replace it, or another --seed "
                         "or --output)")
    load_reference(item)  # a reference that cannot be decoded is refused before minutes of loading
    pipeline = load_pipeline(device)
    from tqdm import tqdm

    bar = tqdm(total=None, unit="tok", desc="sampling", disable=not options.progress, file=sys.stderr)

    def progress(done: int, total: int, partial: Any) -> None:
        bar.total = total
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    try:
        images, facts = generate_item(pipeline, item, options, progress)
    finally:
        bar.close()
    if (facts.get("think") or {}).get("warning"):
        print(f"warning: --think: {facts['think']['warning']}", file=sys.stderr)
    settings = options.run_settings()
    files = write_item_outputs(SINGLE, out, item, images, _metadata(item, settings, facts, len(images)),
                               seeds=facts["seeds"])
    stats = facts.get("stats", {})
    print(f"{len(files)} image(s) in {time.perf_counter() - t0:.1f} s, {stats.get('forward_passes', '?')} forward "
          "passes: " + ", ".join(str(out / f) for f in files))
    return [out / f for f in files]
