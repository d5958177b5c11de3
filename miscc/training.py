"""Pieces both training stages share: exact-resume data order, checkpoint lookup, errors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Sampler

from miscc.utils import CheckpointError, latest_checkpoint


class NonFiniteLoss(RuntimeError):
    """A loss became NaN/inf; the run stops and the last good checkpoint stays in place."""


def resolve_checkpoint(path: str, pattern: str, what: str, key: str) -> Path:
    """A checkpoint file, or the newest file matching `pattern` when `path` is a directory."""
    if not path:
        raise CheckpointError(f"{key} is empty: set it to the {what} ({pattern})")
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p, pattern)
        if not found:
            raise CheckpointError(f"{key}={path}: no {what} ({pattern}) in that directory")
        return found[0]
    if not p.is_file():
        raise CheckpointError(f"{key}: {what} not found: {path}")
    return p


class EpochSampler(Sampler):
    """This rank's share of a per-epoch permutation, yielding (epoch, index) pairs.

    Skipping the batches already trained in the current epoch is a slice, and each item's
    random crop is seeded by (seed, epoch, index) in `SeededItems`: a resumed run sees exactly
    the batches an uninterrupted run would, whatever the worker count.
    """

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.per_rank = (n // world) // batch * batch
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches * self.batch

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[self.rank:: self.world][: self.per_rank]
        return iter([(self.epoch, int(i)) for i in order[self.skip:]])


class SeededItems(Dataset):
    """Wraps a dataset so that item (epoch, i) draws its augmentation from its own seed."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.base[index]


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module
