"""The input contract of point backbones: variable-size clouds concatenated, never padded.

A batch of ``B`` clouds is one ``(N, 3)`` coordinate tensor and one ``(N, C)`` feature tensor
holding every cloud one after another, plus ``offset`` ``(B,)``: the cumulative point counts, so
cloud ``b`` is rows ``offset[b - 1]:offset[b]`` (Pointcept's convention; ``../DESIGN.md``,
"Contracts").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PointBatch:
    """``coord`` (N, 3) float, ``feat`` (N, C) float, ``offset`` (B,) int64 cumulative counts."""

    coord: torch.Tensor
    feat: torch.Tensor
    offset: torch.Tensor

    def __post_init__(self) -> None:
        if self.coord.ndim != 2 or self.coord.shape[1] != 3:
            raise ValueError(f"coord must be (N, 3), got {tuple(self.coord.shape)}")
        if self.feat.ndim != 2 or self.feat.shape[0] != self.coord.shape[0]:
            raise ValueError(f"feat must be (N, C) with N = {self.coord.shape[0]}, got {tuple(self.feat.shape)}")
        if self.offset.ndim != 1 or len(self.offset) == 0:
            raise ValueError(f"offset must be a non-empty (B,) vector, got shape {tuple(self.offset.shape)}")

    @property
    def batch(self) -> torch.Tensor:
        """Index of the cloud each point belongs to, (N,)."""
        return offset_to_batch(self.offset)


def offset_to_batch(offset: torch.Tensor) -> torch.Tensor:
    """(B,) cumulative counts -> (N,) cloud index of every point."""
    offset = offset.long()
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    return torch.repeat_interleave(torch.arange(len(offset), device=offset.device), counts)


def batch_to_offset(batch: torch.Tensor, num_clouds: int | None = None) -> torch.Tensor:
    """(N,) sorted cloud indices -> (B,) cumulative counts."""
    counts = torch.bincount(batch, minlength=num_clouds or 0)
    return torch.cumsum(counts, 0)


def split_by_offset(tensor: torch.Tensor, offset: torch.Tensor) -> list[torch.Tensor]:
    """The rows of each cloud, as a list of views."""
    counts = torch.diff(offset.long().cpu(), prepend=torch.zeros(1, dtype=torch.long))
    return list(torch.split(tensor, counts.tolist()))
