"""The Synapse evaluation protocol: Dice and HD95 per case and per organ, averaged like TransUNet.

TransUNet (Chen et al., 2021) and the papers that compare with it (DAE-Former, TransDAE) predict
each 3D test volume slice by slice, then score every organ of every case with medpy's ``dc`` and
``hd95`` and report the mean over cases, then over organs. This module reproduces that:

* Dice: ``2 |P & G| / (|P| + |G|)`` on the whole 3D volume of one organ.
* HD95: medpy's definition. The surface of a mask is the set of its voxels that a one-voxel
  erosion (6-connected in 3D, 4-connected in 2D) removes, with the outside of the volume counted
  as background. The distances from each surface voxel of P to the nearest surface voxel of G,
  and from G's to P's, are pooled, and their 95th percentile (linear interpolation) is HD95.
  Distances come from ``scipy.ndimage.distance_transform_edt`` with the voxel spacing, so HD95 is
  in millimetres where the data carries a spacing (NIfTI) and in voxels where it does not
  (TransUNet's npz / h5 files, as in the published tables).
* Empty masks, the usual source of disagreement between papers (``convention``):

  ``"transunet"`` (default, what the published numbers use): a prediction with voxels where the
  ground truth has none scores Dice 1 and HD95 0; an empty prediction scores Dice 0 and HD95 0,
  whether the organ is present or not. ``"nan"``: a case with both masks empty is undefined
  (NaN) and left out of the averages; one empty mask gives Dice 0 and an undefined HD95.

The per-case values are gathered by a torchmetrics ``Metric`` with concatenated states, so under
DDP every process's cases are pooled before the averages are taken; a case that the distributed
sampler repeats to even out the processes is counted once (states carry the case's index).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

CONVENTIONS = ("transunet", "nan")


def dice_coefficient(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` that a one-voxel, face-connected erosion removes (outside = background)."""
    structure = generate_binary_structure(mask.ndim, 1)
    return mask & ~binary_erosion(mask, structure=structure, iterations=1)


def _crop_to_union(*masks: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of all masks, one voxel wider on each side (clipped to the volume).

    Every surface voxel of either mask lies inside it and the one-voxel margin keeps the erosion
    exact, so distances computed in the crop equal those of the whole volume.
    """
    union = np.logical_or.reduce(masks)
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(present[0]) - 1, 0), int(present[-1]) + 2))
    return tuple(box)


def surface_distances(source: np.ndarray, target: np.ndarray, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """Distance from every surface voxel of ``source`` to the nearest surface voxel of ``target``.

    Both masks must be non-empty. ``spacing`` is the voxel size per axis (``None`` = 1).
    """
    box = _crop_to_union(source, target)
    source, target = source[box], target[box]
    distance_to_target = distance_transform_edt(~_surface(target), sampling=spacing)
    return distance_to_target[_surface(source)]


def hd95(prediction: np.ndarray, reference: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """95th percentile of the pooled symmetric surface distances (medpy's ``hd95``)."""
    both_ways = np.concatenate(
        [surface_distances(prediction, reference, spacing), surface_distances(reference, prediction, spacing)]
    )
    return float(np.percentile(both_ways, 95))


def case_scores(
    prediction: np.ndarray,
    label: np.ndarray,
    num_classes: int,
    spacing: Optional[Sequence[float]] = None,
    convention: str = "transunet",
) -> tuple[np.ndarray, np.ndarray]:
    """Dice and HD95 of organs ``1 .. num_classes - 1`` in one case (label volumes of equal shape).

    Returns two float arrays of length ``num_classes - 1``; empty masks follow ``convention``
    (module docstring).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if prediction.shape != label.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from label shape {label.shape}")
    dice = np.zeros(num_classes - 1)
    distance = np.zeros(num_classes - 1)
    for organ in range(1, num_classes):
        predicted, present = prediction == organ, label == organ
        has_prediction, has_reference = bool(predicted.any()), bool(present.any())
        if has_prediction and has_reference:
            dice[organ - 1] = dice_coefficient(predicted, present)
            distance[organ - 1] = hd95(predicted, present, spacing)
        elif convention == "transunet":
            dice[organ - 1] = 1.0 if has_prediction else 0.0
            distance[organ - 1] = 0.0
        else:
            dice[organ - 1] = math.nan if not (has_prediction or has_reference) else 0.0
            distance[organ - 1] = math.nan
    return dice, distance


class CaseAverage(Metric):
    """Mean over cases, then over organs, of one per-case statistic (``"dice"`` or ``"hd95"``).

    ``update(index, dice, hd95)`` takes each case's index in its split and its per-organ values,
    shape (B, organs). With ``organ`` set, ``compute`` returns that organ's mean over cases
    (0-based, organ 1 of the label map is 0); otherwise the mean over organs of those means.
    NaN values (undefined cases, ``convention="nan"``) are left out of the means.
    """

    full_state_update = False

    def __init__(self, statistic: str = "dice", organ: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        if statistic not in ("dice", "hd95"):
            raise ValueError(f"statistic must be 'dice' or 'hd95', got {statistic!r}")
        self.statistic = statistic
        self.organ = organ
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, dice: torch.Tensor, hd95: torch.Tensor) -> None:
        values = dice if self.statistic == "dice" else hd95
        self.index.append(index.detach().reshape(-1).long())
        self.values.append(values.detach().float().reshape(len(index.reshape(-1)), -1))

    def compute(self) -> torch.Tensor:
        if isinstance(self.index, list) and not self.index:  # no case seen (after a sync it is a tensor)
            return torch.tensor(math.nan)
        index, values = dim_zero_cat(self.index), dim_zero_cat(self.values)
        order = torch.argsort(index, stable=True)
        index, values = index[order], values[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]  # a case repeated by the distributed sampler counts once
        per_organ = torch.nanmean(values[first], dim=0)
        return per_organ[self.organ] if self.organ is not None else torch.nanmean(per_organ)
