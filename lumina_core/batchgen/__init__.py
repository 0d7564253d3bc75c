"""Prompt files at scale (and single prompts as one-item runs): ``python -m lumina_core generate``.

``items`` (parsing, seeds, sharding), ``layouts`` (paths and the one PNG writer), ``manifest``
(per-rank manifests, resume, the folder lock), ``run`` (one item's generation, the run, the summary),
``cli`` (the ``generate`` options from the option dataclasses). The output folder must be shared by
all nodes (a network file system) for multi-node runs; rerunning the same command resumes: finished
items (same request, same settings, files present) are skipped, failed ones are tried again.
"""
from __future__ import annotations

from ..dist import RankInfo
from .items import (SEED_STRIDE, BadLine, BatchItem, ItemDefaults, PromptFileError, parse_prompt_file, shard,
                    single_item)
from .layouts import (BENCHMARK_IMAGES, LAYOUTS, grid_image, image_metadata, layout_paths, pairs_index_records,
                      prepare_output_dir, save_png, write_item_outputs)
from .manifest import (MANIFEST, acquire_lock, is_done, merge_manifests, rank_manifest_path, read_jsonl_records,
                       read_manifest, release_lock, write_jsonl_atomic)
from .run import BatchOptions, BatchSummary, generate_item, run_batch, run_single

__all__ = [
    "BENCHMARK_IMAGES", "LAYOUTS", "MANIFEST", "SEED_STRIDE", "BadLine", "BatchItem", "BatchOptions", "BatchSummary",
    "ItemDefaults", "PromptFileError", "RankInfo", "acquire_lock", "generate_item", "grid_image", "image_metadata",
    "is_done", "layout_paths", "merge_manifests", "pairs_index_records", "parse_prompt_file", "prepare_output_dir",
    "rank_manifest_path", "read_jsonl_records", "read_manifest", "release_lock", "run_batch", "run_single",
    "save_png", "shard", "single_item", "write_item_outputs", "write_jsonl_atomic",
]
