"""Dice of echo segmentation, the GraphEcho protocol: background excluded, on annotated frames.

* ``PooledDice``: true/false positives and false negatives summed over every annotated pixel of
  the split, then ``2 TP / (2 TP + FP + FN)`` per structure (the official "dataset-level" Dice).
* ``VideoDice``: the Dice of each video (its annotated frames pooled), averaged over videos.

Each ``update`` receives ONE video's annotated frames (F, H, W) of structure indices. Both take
``structure`` (1..K) for one structure's Dice, or ``None`` for the mean over structures (those
that occur). States are sums, so they reduce across processes under DDP.
"""

from __future__ import annotations

from typing import Optional

import torch
from torchmetrics import Metric


def confusion_counts(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, 3) true positives, false positives, false negatives of structures 1..K."""
    classes = torch.arange(1, num_classes, device=target.device).view(-1, *([1] * target.dim()))
    predicted, actual = prediction[None] == classes, target[None] == classes
    dims = tuple(range(1, target.dim() + 1))
    tp = (predicted & actual).sum(dims)
    fp = (predicted & ~actual).sum(dims)
    fn = (~predicted & actual).sum(dims)
    return torch.stack([tp, fp, fn], dim=1)


def _dice(counts: torch.Tensor) -> torch.Tensor:
    tp, fp, fn = counts.float().unbind(-1)
    denominator = 2 * tp + fp + fn
    return torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.nan)


def _select(values: torch.Tensor, structure: Optional[int]) -> torch.Tensor:
    return values[structure - 1] if structure is not None else values.nanmean()


class PooledDice(Metric):
    """Dice over all annotated pixels of the split; one structure or the mean over structures."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, structure: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.structure = num_classes, structure
        self.add_state("counts", torch.zeros(num_classes - 1, 3, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        self.counts += confusion_counts(prediction, target, self.num_classes)

    def compute(self) -> torch.Tensor:
        return _select(_dice(self.counts), self.structure)


class VideoDice(Metric):
    """Mean over videos of each video's Dice (structures absent from a video and its prediction
    are skipped for that video); one structure or the mean over structures."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, structure: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.structure = num_classes, structure
        self.add_state("dice_sum", torch.zeros(num_classes - 1), dist_reduce_fx="sum")
        self.add_state("videos", torch.zeros(num_classes - 1), dist_reduce_fx="sum")

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        dice = _dice(confusion_counts(prediction, target, self.num_classes))
        present = ~dice.isnan()
        self.dice_sum += torch.where(present, dice, 0.0)
        self.videos += present.float()

    def compute(self) -> torch.Tensor:
        per_structure = torch.where(self.videos > 0, self.dice_sum / self.videos.clamp_min(1), torch.nan)
        return _select(per_structure, self.structure)
