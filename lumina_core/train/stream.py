"""The sample stream of `fit`: pre-tokenised records read from the shards, labels, padding, data order.

Data order: a seeded permutation per epoch, so the position in the stream is one integer and a
resumed run (or one on another number of processes) sees the same samples in the same order.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError
from .data import BAD_ITEMS_FILE, TOKENIZER_DIR, load_index

IGNORE_INDEX = -100


class TokenDataset:
    """All pre-tokenised records of a prepared folder: ``dataset[i] -> (ids LongTensor, prompt_length)``.

    Offsets and prompt lengths are read at once (small); token ids are read per record from the
    memory-mapped shards, so every rank of a large run does not hold the whole corpus in RAM.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self.index = load_index(self.folder)
        self._handles = []
        shard_of, offsets, prompt_lengths = [], [], []
        for number, shard in enumerate(self.index["shards"]):
            handle = safe_open(str(self.folder / shard["file"]), framework="pt", device="cpu")
            self._handles.append(handle)
            shard_offsets = handle.get_tensor("offsets")
            offsets.append(torch.stack((shard_offsets[:-1], shard_offsets[1:]), dim=1))
            prompt_lengths.append(handle.get_tensor("prompt_lengths"))
            shard_of.append(torch.full((len(shard_offsets) - 1,), number, dtype=torch.int64))
        if not offsets:
            raise InputError(f"{self.folder} holds no usable records (see {BAD_ITEMS_FILE}); run `prepare` again")
        self.spans = torch.cat(offsets)           # [N, 2] start/end inside the record's shard
        self.shard_of = torch.cat(shard_of)
        self.prompt_lengths = torch.cat(prompt_lengths)

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        start, end = (int(x) for x in self.spans[i])
        ids = self._handles[int(self.shard_of[i])].get_slice("tokens")[start:end]
        return ids.long(), int(self.prompt_lengths[i])

    def lengths(self) -> torch.Tensor:
        """Token count of every record."""
        return self.spans[:, 1] - self.spans[:, 0]

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer copy saved beside the shards."""
        return self.folder / TOKENIZER_DIR


def make_sample(ids: torch.Tensor, prompt_length: int, unconditional: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) as the official fine-tuning: prompt labels -100; unconditional = image only."""
    if unconditional:
        # Only the labelled tokens minus the trailing separator: "<start> H W rows <end>", positions from 0.
        tokens = ids[prompt_length:-1]
        return tokens.clone(), tokens.clone()
    labels = ids.clone()
    labels[:prompt_length] = IGNORE_INDEX
    return ids.clone(), labels


def collate(samples: Sequence[tuple[torch.Tensor, torch.Tensor]], max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with id 0 / label -100 and truncate to ``max_seq_len`` (official padding)."""
    length = min(max_seq_len, max(len(ids) for ids, _ in samples))
    input_ids = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(samples):
        n = min(length, len(ids))
        input_ids[row, :n] = ids[:n]
        labels[row, :n] = lab[:n]
    return input_ids, labels


LENGTH_GROUP_BATCHES = 32   # --group-by-length sorts windows of this many batches by length


@dataclass
class SampleOrder:
    """Deterministic sample stream: a seeded permutation per epoch; the position is one integer.

    With ``lengths`` and ``group_size`` (the global batch), each epoch's permutation is grouped by
    length: windows of ``LENGTH_GROUP_BATCHES`` batches are sorted by token count and cut into
    batches, and the batches are shuffled. Batches then hold samples of similar length, so mixed
    data (short text-to-image beside long dual-panel items) wastes little compute on padding.
    """

    num_samples: int
    seed: int
    uncond_prob: float = 0.1
    lengths: torch.Tensor | None = None
    group_size: int = 0
    _permutation: tuple[int, torch.Tensor] | None = field(default=None, repr=False)

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.num_samples, generator=generator)
        if self.lengths is None or self.group_size <= 1:
            return permutation
        window = self.group_size * LENGTH_GROUP_BATCHES
        batches: list[torch.Tensor] = []
        for start in range(0, self.num_samples, window):
            chunk = permutation[start:start + window]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches.extend(chunk.split(self.group_size))
        order = torch.randperm(len(batches), generator=generator)
        return torch.cat([batches[i] for i in order])

    def sample_at(self, position: int) -> tuple[int, bool]:
        """(dataset index, unconditional?) of the ``position``-th sample of the whole stream."""
        epoch, offset = divmod(position, self.num_samples)
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, self._epoch_permutation(epoch))
        index = int(self._permutation[1][offset])
        # Decided per stream position, not per rank or RNG state: identical for any world size and after resume.
        unconditional = random.Random(f"{self.seed}:{position}").random() < self.uncond_prob
        return index, unconditional

    def epoch_of(self, position: int) -> float:
        """Fractional epoch reached at ``position``."""
        return position / self.num_samples


def global_batch_positions(step: int, global_batch: int) -> range:
    """Stream positions consumed by optimizer step ``step`` (0-based)."""
    return range(step * global_batch, (step + 1) * global_batch)


def rank_micro_batches(positions: range, world_size: int, rank: int, micro_batch: int) -> list[list[int]]:
    """Split one step's positions: micro-batch m of rank r holds positions [(m*W + r)*mb, ...+mb)."""
    per_micro = world_size * micro_batch
    accum = len(positions) // per_micro
    return [[positions[(m * world_size + rank) * micro_batch + j] for j in range(micro_batch)] for m in range(accum)]


__all__ = ["TokenDataset", "SampleOrder", "make_sample", "collate", "global_batch_positions",
           "rank_micro_batches", "IGNORE_INDEX"]
