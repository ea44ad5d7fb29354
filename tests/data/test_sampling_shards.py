"""Evaluation sharding across DDP ranks: every sample once, and a clear error for a split too small."""

import pytest

from data.errors import SplitError
from data.sampling import ShardedEvalSampler


def shards(n: int, world: int) -> list[list[int]]:
    out = []
    for rank in range(world):
        sampler = ShardedEvalSampler(list(range(n)), "val")
        sampler.num_replicas, sampler.rank = world, rank  # as a process group would set them
        out.append(list(sampler))
    return out


def test_every_sample_is_evaluated_exactly_once_across_ranks():
    parts = shards(7, 3)
    assert sorted(sum(parts, [])) == list(range(7))
    assert [len(p) for p in parts] == [3, 2, 2]


def test_a_split_smaller_than_the_number_of_processes_is_refused_by_name():
    with pytest.raises(SplitError, match="the val split has 1 sample.*fewer than the 2 processes"):
        shards(1, 2)
