"""The registration metrics of the 3DMatch / KITTI protocol (PointDSC and VBReg ``evaluation/``),
as torchmetrics so that they add up across batches and DDP processes.

* **Registration recall** ``rr``: percentage of pairs with rotation error < ``max_rotation_error``
  degrees and translation error < ``max_translation_error`` (3DMatch: 15 degrees, 0.30 m;
  KITTI: 5 degrees, 0.60 m).
* ``rre`` (degrees) and ``rte`` (centimetres, for clouds in metres): mean errors over the
  *successful* pairs only, as every paper of this line reports them (so RR and RE/TE move in
  opposite directions when hard pairs start to succeed).
* ``inlier_precision``, ``inlier_recall``, ``inlier_f1``: per pair, of the predicted inlier mask
  against the ground-truth labels, then averaged over pairs (percentages).
* ``rmse_recall``: the 3DMatch / Predator benchmark protocol, on pairs that come with an
  information matrix (``gt.info``; non-consecutive fragments only): the pair succeeds when
  ``e^T I e / I[0, 0] < 0.2^2``, ``e = (t, q_xyz)`` of the residual motion between estimate and
  ground truth in gt.log's own direction (fragment ``j`` into fragment ``i``, the inverse of ours).
  NaN when no pair of the split has one (KITTI, plain pair lists).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from tasks.registration_parts.rigid import rotation_error_degrees, translation_error


class _SumMetric(Metric):
    """A ratio of two sums, reduced across processes by summation."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("numerator", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def compute(self) -> torch.Tensor:
        if self.denominator == 0:
            return torch.tensor(float("nan"))
        return (self.numerator / self.denominator).float()


def registration_success(
    estimate: torch.Tensor, truth: torch.Tensor, max_rotation_error: float, max_translation_error: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: success (bool), rotation error (degrees) and translation error (data units)."""
    re = rotation_error_degrees(estimate, truth)
    te = translation_error(estimate, truth)
    return (re < max_rotation_error) & (te < max_translation_error), re, te


class RegistrationRecall(_SumMetric):
    """Percentage of pairs registered within both thresholds."""

    higher_is_better = True

    def __init__(self, max_rotation_error: float = 15.0, max_translation_error: float = 0.30, **kwargs):
        super().__init__(**kwargs)
        self.max_rotation_error, self.max_translation_error = max_rotation_error, max_translation_error

    def update(self, estimate: torch.Tensor, truth: torch.Tensor) -> None:
        success, _, _ = registration_success(estimate, truth, self.max_rotation_error, self.max_translation_error)
        self.numerator += 100.0 * success.sum()
        self.denominator += success.numel()


class SuccessfulRotationError(RegistrationRecall):
    """Mean rotation error (degrees) over the successful pairs."""

    higher_is_better = False

    def update(self, estimate: torch.Tensor, truth: torch.Tensor) -> None:
        success, re, _ = registration_success(estimate, truth, self.max_rotation_error, self.max_translation_error)
        self.numerator += re[success].double().sum()
        self.denominator += success.sum()


class SuccessfulTranslationError(RegistrationRecall):
    """Mean translation error over the successful pairs, in ``unit_scale`` x data units (cm for metres)."""

    higher_is_better = False

    def __init__(self, max_rotation_error: float = 15.0, max_translation_error: float = 0.30, unit_scale: float = 100.0, **kwargs):
        super().__init__(max_rotation_error, max_translation_error, **kwargs)
        self.unit_scale = unit_scale

    def update(self, estimate: torch.Tensor, truth: torch.Tensor) -> None:
        success, _, te = registration_success(estimate, truth, self.max_rotation_error, self.max_translation_error)
        self.numerator += self.unit_scale * te[success].double().sum()
        self.denominator += success.sum()


def inlier_scores(predicted: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair precision, recall and F1 of boolean (B, N) masks (0 where undefined, as sklearn)."""
    predicted, labels = predicted.bool(), labels.bool()
    true_positive = (predicted & labels).sum(-1).double()
    precision = true_positive / predicted.sum(-1).clamp_min(1)
    recall = true_positive / labels.sum(-1).clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    return precision, recall, f1


class InlierScore(_SumMetric):
    """Mean over pairs of the inlier ``precision``, ``recall`` or ``f1`` (percent)."""

    higher_is_better = True

    def __init__(self, which: str, **kwargs):
        super().__init__(**kwargs)
        if which not in ("precision", "recall", "f1"):
            raise ValueError(f"which must be precision, recall or f1, got {which!r}")
        self.which = which

    def update(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        value = dict(zip(("precision", "recall", "f1"), inlier_scores(predicted, labels)))[self.which]
        self.numerator += 100.0 * value.sum()
        self.denominator += value.numel()


def rotation_to_quaternion(rotation: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (w, x, y, z) of (..., 3, 3) rotation matrices (Shepperd's method, w >= 0)."""
    m = rotation.double()
    trace = m.diagonal(dim1=-2, dim2=-1).sum(-1)
    candidates = torch.stack(
        [
            torch.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + 2 * m[..., 0, 0] - trace, m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 + 2 * m[..., 1, 1] - trace, m[..., 1, 2] + m[..., 2, 1]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 + 2 * m[..., 2, 2] - trace], -1),
        ],
        dim=-2,
    )  # each row is 4 q_k q (for k = w, x, y, z): pick the numerically largest
    diagonal = torch.stack([1 + trace, 1 + 2 * m[..., 0, 0] - trace, 1 + 2 * m[..., 1, 1] - trace, 1 + 2 * m[..., 2, 2] - trace], -1)
    best = diagonal.argmax(-1)
    q = candidates.gather(-2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def information_rmse_squared(estimate: torch.Tensor, truth: torch.Tensor, information: torch.Tensor) -> torch.Tensor:
    """The 3DMatch benchmark's squared RMSE estimate ``e^T I e / I[0, 0]`` per pair.

    ``estimate`` and ``truth`` take source onto target; gt.log and its information matrices work
    with the inverses, so the residual is ``inv(truth^-1) @ estimate^-1 = truth @ estimate^-1``.
    """
    residual = truth.double() @ torch.linalg.inv(estimate.double())
    error = torch.cat([residual[..., :3, 3], rotation_to_quaternion(residual[..., :3, :3])[..., 1:]], dim=-1)
    info = information.double()
    return (error.unsqueeze(-2) @ info @ error.unsqueeze(-1)).squeeze(-1).squeeze(-1) / info[..., 0, 0]


class RMSERecall(_SumMetric):
    """Percentage of the pairs with an information matrix whose benchmark RMSE is below ``max_rmse``."""

    higher_is_better = True

    def __init__(self, max_rmse: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.max_rmse = max_rmse

    def update(self, estimate: torch.Tensor, truth: torch.Tensor, information: torch.Tensor) -> None:
        has_info = information.flatten(-2).abs().sum(-1) > 0
        if not has_info.any():
            return
        rmse2 = information_rmse_squared(estimate[has_info], truth[has_info], information[has_info])
        self.numerator += 100.0 * (rmse2 < self.max_rmse**2).sum()
        self.denominator += has_info.sum()
