"""A training order that a resumed fit can replay exactly.

A plain shuffled ``DataLoader`` draws its order and its augmentations from global random state,
so a fit stopped midway and resumed with ``--ckpt_path last`` sees different batches from an
uninterrupted fit with the same seed. Here the order of epoch ``e`` is a permutation seeded by
``(seed, e)``, and each draw carries its own augmentation seed; a resumed epoch skips the draws
that were already trained on (``tasks/callbacks.py`` sets ``skip``). The same holds under DDP:
the sampler is a ``DistributedSampler``, so Lightning does not wrap it, and each rank takes its
share of the same permutation.

Datasets that augment read ``(index, seed)`` keys with ``sample_key`` and draw every random
choice for that sample from ``seed``: ``np.random.default_rng(seed)``, or ``seed_transform`` for
an albumentations pipeline.
"""

from __future__ import annotations

import math
import os
import random
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from data.errors import SplitError

#: a training key: (dataset index, augmentation seed); evaluation loaders pass plain indices
SampleKey = Union[int, tuple[int, int]]


def sample_key(key: SampleKey) -> tuple[int, Optional[int]]:
    """Split a key into the dataset index and its augmentation seed (``None`` for plain indices)."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None


def seed_transform(transform, seed: Optional[int]) -> None:
    """Make an albumentations pipeline draw this sample's choices from ``seed``.

    One generator is shared by all of the pipeline's transforms, so they draw one after another
    (albumentations' own ``set_random_seed`` gives every child the same seed, which makes a
    flip and a rotation, say, always happen together). ``None`` (evaluation) leaves it alone.
    """
    if seed is not None:
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def global_seed() -> int:
    """The run's seed (``seed_everything`` in the config, which Lightning puts in the environment)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class ResumableSampler(DistributedSampler):
    """Shuffled ``(index, augmentation seed)`` keys, reproducible per epoch and resumable midway.

    Args:
        dataset: the training dataset.
        seed: base seed; epoch ``e`` uses ``(seed, e)``.
        drop_last: drop the tail that does not divide evenly between ranks (else pad by repeating).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, drop_last: bool = False):
        # one replica until the process group exists; ``__iter__`` reads the real world size
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=drop_last)
        self.skip = 0

    def _sync_world(self) -> None:
        if dist.is_available() and dist.is_initialized():
            self.num_replicas, self.rank = dist.get_world_size(), dist.get_rank()
        n = len(self.dataset)
        if self.drop_last and n % self.num_replicas:
            self.num_samples = n // self.num_replicas
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __len__(self) -> int:
        self._sync_world()
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self._sync_world()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)
        seeds = torch.randint(0, 2**31 - 1, (len(order),), generator=generator)
        if self.total_size > len(order):  # pad by wrapping around, as DistributedSampler does
            repeat = math.ceil(self.total_size / len(order))
            order, seeds = order.repeat(repeat), seeds.repeat(repeat)
        order, seeds = order[: self.total_size], seeds[: self.total_size]
        mine = slice(self.rank, self.total_size, self.num_replicas)
        keys = list(zip(order[mine].tolist(), seeds[mine].tolist()))
        skip, self.skip = self.skip, 0  # only the resumed epoch skips
        return iter(keys[skip:])


class ShardedEvalSampler(DistributedSampler):
    """Evaluation order: every sample exactly once over all ranks, in dataset order.

    Lightning's default sampler for DDP evaluation pads the last ranks with repeated samples,
    which counts those samples twice in the metrics; here rank ``r`` of ``w`` takes samples
    ``r, r + w, ...`` and nothing is repeated (ranks may run one batch more or less; the metrics
    are torchmetrics, reduced at the end of the epoch). One process sees the whole split in order.
    """

    def __init__(self, dataset: Dataset, split: str = "evaluation"):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)
        self.split = split

    def _sync_world(self) -> None:
        if dist.is_available() and dist.is_initialized():
            self.num_replicas, self.rank = dist.get_world_size(), dist.get_rank()
        if len(self.dataset) < self.num_replicas:  # a rank with nothing to evaluate stops Lightning
            raise SplitError(
                f"the {self.split} split has {len(self.dataset)} sample(s), fewer than the "
                f"{self.num_replicas} processes; use fewer devices or a larger split"
            )
        self.num_samples = len(range(self.rank, len(self.dataset), self.num_replicas))
        self.total_size = len(self.dataset)

    def __len__(self) -> int:
        self._sync_world()
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        self._sync_world()
        return iter(range(self.rank, len(self.dataset), self.num_replicas))
