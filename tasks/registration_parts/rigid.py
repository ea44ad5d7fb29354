"""Rigid motions: weighted Kabsch, applying 4x4 transforms, and the 3DMatch error measures.

All functions take batched tensors and compute in float32 or float64 regardless of autocast:
a rotation estimated in bfloat16 would be off by about a degree.
"""

from __future__ import annotations

import torch


def apply_transform(transform: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``points`` (..., N, 3) moved by ``transform`` (..., 4, 4): ``R p + t``."""
    return points @ transform[..., :3, :3].transpose(-1, -2) + transform[..., None, :3, 3]


def weighted_kabsch(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The rigid transform (..., 4, 4) minimising ``sum_i w_i |R x_i + t - y_i|^2`` (Kabsch / Umeyama).

    ``source`` and ``target`` are (..., N, 3), ``weights`` (..., N) non-negative. Weights are
    normalised to sum to one, so the result does not depend on their scale; all-zero weights
    fall back to uniform. The reflection case is corrected with the sign of ``det(V U^T)``.
    """
    with torch.autocast(device_type=source.device.type, enabled=False):
        dtype = torch.float64 if source.dtype == torch.float64 else torch.float32
        source, target = source.to(dtype), target.to(dtype)
        if weights is None:
            weights = torch.ones(source.shape[:-1], dtype=dtype, device=source.device)
        weights = weights.to(dtype).clamp_min(0)
        total = weights.sum(dim=-1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp_min(torch.finfo(dtype).tiny), 1.0 / weights.shape[-1])
        w = weights.unsqueeze(-1)
        source_centre = (w * source).sum(dim=-2, keepdim=True)
        target_centre = (w * target).sum(dim=-2, keepdim=True)
        covariance = ((source - source_centre) * w).transpose(-1, -2) @ (target - target_centre)
        u, _, vh = torch.linalg.svd(covariance)
        v = vh.transpose(-1, -2)
        sign = torch.det(v @ u.transpose(-1, -2))
        correction = torch.diag_embed(torch.stack([torch.ones_like(sign), torch.ones_like(sign), sign], dim=-1))
        rotation = v @ correction @ u.transpose(-1, -2)
        translation = target_centre.squeeze(-2) - (rotation @ source_centre.transpose(-1, -2)).squeeze(-1)
        transform = torch.zeros(*rotation.shape[:-2], 4, 4, dtype=dtype, device=source.device)
        transform[..., :3, :3] = rotation
        transform[..., :3, 3] = translation
        transform[..., 3, 3] = 1.0
        return transform


def rotation_error_degrees(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """RE = arccos((trace(R^T R_gt) - 1) / 2) in degrees, per transform (..., 4, 4) -> (...)."""
    relative = estimate[..., :3, :3].transpose(-1, -2).double() @ truth[..., :3, :3].double()
    cosine = ((relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cosine)).float()


def translation_error(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """TE = |t - t_gt| in the data's units, per transform (..., 4, 4) -> (...)."""
    return (estimate[..., :3, 3].double() - truth[..., :3, 3].double()).norm(dim=-1).float()
