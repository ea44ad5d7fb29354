"""Voting-based inlier search (VBReg, Sec. 3.4; official code ``models/VBReg.py``).

Given one pair's correspondences and the network's prior pass, the transform is found by
hypothesise-and-verify over *consensus sets*, not random samples:

1. **Seeds**: correspondences whose confidence is a local maximum within ``nms_radius`` (source
   side), the top ``max(min_seeds, seed_ratio * N)`` of them by confidence.
2. **Voting**: every layer contributes two maps, its attention (from its queries and keys) and its
   compatibility ``gamma_l * beta`` (feature compatibility of its output features times spatial
   compatibility). Going through the maps from the last layer to the first, each seed's
   ``k - 1`` most compatible correspondences receive one vote per map; after ``n`` maps a
   correspondence's vote share ``P`` is scored by the Wilson lower bound
   ``(P + z^2/2n - z sqrt(P(1 - P)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``z = 1.96``, and its
   best score over ``n`` is kept. A seed's consensus set is itself plus its ``k - 1`` best.
3. **Hypotheses**: within each consensus set the leading eigenvector of the local compatibility
   ``gamma * beta`` (power iteration) weights a weighted Kabsch fit: one rigid transform per seed.
4. **Selection**: the hypothesis with the highest truncated-quadratic inlier score
   ``mean_i [d_i < tau] (1 - d_i^2 / tau^2)``, ``d_i = |T x_i - y_i|``.
5. **Refinement**: re-fit on the inliers with weights ``1 / (1 + (d_i / tau)^2)`` until their
   number stops changing (at most ``refine_iterations``).

Only the seeds' rows of the N x N maps are ever formed, and they are consumed one map at a time,
so memory is O(seeds x N) rather than the official O(layers x N^2).
"""

from __future__ import annotations

import math

import torch

from tasks.registration_parts.rigid import apply_transform, weighted_kabsch
from tasks.registration_parts.variational_nonlocal import feature_compatibility


def wilson_lower_bound(successes: torch.Tensor, trials: int, z: float = 1.96) -> torch.Tensor:
    """Lower bound of the Wilson score interval of a success rate ``successes / trials``."""
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * torch.sqrt((p * (1 - p) / trials + z * z / (4 * trials * trials)).clamp_min(0))
    return (centre - spread) / (1 + z * z / trials)


def nms_seeds(scores: torch.Tensor, source: torch.Tensor, radius: float, count: int) -> torch.Tensor:
    """Indices of the ``count`` best local maxima of ``scores`` (N,) within ``radius`` of ``source`` (N, 3).

    A correspondence is a local maximum when no correspondence whose source point lies closer
    than ``radius`` has a higher score. Non-maxima rank after all maxima (by score), so exactly
    ``count`` seeds come back whenever N >= count.
    """
    near = torch.cdist(source, source) < radius
    beaten = near & (scores.unsqueeze(0) > scores.unsqueeze(1))  # [i, j]: j is near i and scores higher
    is_local_max = ~beaten.any(dim=1)
    rank = scores - (~is_local_max).to(scores.dtype) * (scores.max() - scores.min() + 1)
    return torch.argsort(rank, descending=True, stable=True)[:count]


def leading_eigenvector(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """Power iteration from the all-ones vector on a batch of non-negative (..., A, A) matrices."""
    vector = torch.ones(matrix.shape[:-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        vector = (matrix @ vector.unsqueeze(-1)).squeeze(-1)
        vector = vector / (vector.norm(dim=-1, keepdim=True) + 1e-6)
    return vector


def truncated_inlier_score(residuals: torch.Tensor, tau: float) -> torch.Tensor:
    """``mean_i [d_i < tau] (1 - d_i^2 / tau^2)`` over the last axis."""
    return ((residuals < tau) * (1 - residuals.square() / tau**2)).mean(dim=-1)


def refine(transform: torch.Tensor, source: torch.Tensor, target: torch.Tensor, tau: float, iterations: int) -> torch.Tensor:
    """PointDSC's post-refinement: weighted re-fits on the inliers until their count is stable."""
    previous = -1
    for _ in range(iterations):
        residuals = (apply_transform(transform, source) - target).norm(dim=-1)
        inliers = residuals < tau
        count = int(inliers.sum())
        if count == previous or count < 3:
            break
        previous = count
        weights = 1.0 / (1.0 + (residuals[inliers] / tau).square())
        transform = weighted_kabsch(source[inliers], target[inliers], weights)
    return transform


class VotingInlierSearch:
    """The search of the module docstring, for one pair at a time (float32, outside autocast).

    Args:
        inlier_threshold: ``tau``, in data units (0.10 m for 3DMatch, 1.2 m for KITTI).
        sigma_d: spatial-compatibility scale (as the network's).
        nms_radius: seed non-maximum suppression radius (0.10).
        seed_ratio / min_seeds: number of seeds ``min(N, max(min_seeds, seed_ratio * N))``.
        consensus_size: ``k``, correspondences per consensus set (40).
        power_iterations: for the consensus weights (10).
        refine_iterations: post-refinement rounds (20).
        wilson_z: confidence of the Wilson bound (1.96, i.e. 95 %).
    """

    def __init__(
        self,
        inlier_threshold: float = 0.10,
        sigma_d: float = 0.10,
        nms_radius: float = 0.10,
        seed_ratio: float = 0.1,
        min_seeds: int = 1000,
        consensus_size: int = 40,
        power_iterations: int = 10,
        refine_iterations: int = 20,
        wilson_z: float = 1.96,
    ):
        self.inlier_threshold, self.sigma_d, self.nms_radius = inlier_threshold, sigma_d, nms_radius
        self.seed_ratio, self.min_seeds, self.consensus_size = seed_ratio, min_seeds, consensus_size
        self.power_iterations, self.refine_iterations, self.wilson_z = power_iterations, refine_iterations, wilson_z

    def voting_maps(self, seeds, beta_rows, layer_features, queries, keys, sigma):
        """The seeds' rows of every layer's two maps, from the last layer to the first."""
        for features, q, k in zip(reversed(layer_features), reversed(queries), reversed(keys)):
            unit = torch.nn.functional.normalize(features, dim=-1)
            gamma = (1.0 - (1.0 - unit[seeds] @ unit.T) / sigma**2).clamp(0.0, 1.0)
            yield gamma * beta_rows
            yield torch.softmax(beta_rows * (q[seeds] @ k.T) / math.sqrt(q.shape[-1]), dim=-1)

    @torch.no_grad()
    def __call__(
        self,
        source: torch.Tensor,
        target: torch.Tensor,
        logits: torch.Tensor,
        layer_features: list[torch.Tensor] | torch.Tensor,
        queries: list[torch.Tensor] | torch.Tensor,
        keys: list[torch.Tensor] | torch.Tensor,
        sigma: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pair: correspondence points (N, 3) x 2, logits (N,), per-layer (N, C) tensors.

        Returns the transform (4, 4) taking source onto target and the inlier mask (N,) under it.
        """
        with torch.autocast(device_type=source.device.type, enabled=False):
            source, target, logits = source.float(), target.float(), logits.float()
            layer_features = [f.float() for f in layer_features]
            queries, keys = [q.float() for q in queries], [k.float() for k in keys]
            n = len(source)
            tau = self.inlier_threshold
            if n < 3:
                return torch.eye(4, device=source.device), torch.zeros(n, dtype=torch.bool, device=source.device)
            num_seeds = min(n, max(self.min_seeds, int(self.seed_ratio * n)))
            seeds = nms_seeds(logits, source, self.nms_radius, num_seeds)
            length_change = torch.cdist(source[seeds], source) - torch.cdist(target[seeds], target)
            beta_rows = (1.0 - length_change.square() / self.sigma_d**2).clamp_min(0.0)
            size = min(self.consensus_size, n)
            seed_column = seeds.unsqueeze(1)

            # For a fixed vote count the bound falls as maps accumulate, so a correspondence's best
            # bound is reached right after one of its votes: update only the entries just voted for.
            votes = torch.zeros(len(seeds), n, device=source.device)
            best = torch.zeros(len(seeds), n, device=source.device)  # never voted for: bound 0
            for count, rows in enumerate(self.voting_maps(seeds, beta_rows, layer_features, queries, keys, sigma), 1):
                rows = rows.scatter(1, seed_column, -1.0)  # a seed does not vote for itself
                top = rows.topk(size - 1, dim=1).indices
                votes.scatter_add_(1, top, torch.ones_like(top, dtype=votes.dtype))
                bound = wilson_lower_bound(votes.gather(1, top), count, self.wilson_z)
                best.scatter_reduce_(1, top, bound, reduce="amax")
            best = best.scatter(1, seed_column, -1.0)
            consensus = torch.cat([seed_column, best.topk(size - 1, dim=1).indices], dim=1)  # (S, k)

            # consensus weights: leading eigenvector of the local compatibility gamma * beta
            gamma = feature_compatibility(layer_features[-1][consensus], sigma)  # (S, k, k)
            src_c, tgt_c = source[consensus], target[consensus]
            local_beta = (1.0 - (torch.cdist(src_c, src_c) - torch.cdist(tgt_c, tgt_c)).square() / self.sigma_d**2).clamp_min(0)
            eye = torch.eye(size, dtype=torch.bool, device=source.device)
            weights = leading_eigenvector((gamma * local_beta).masked_fill(eye, 0.0), self.power_iterations)
            hypotheses = weighted_kabsch(src_c, tgt_c, weights)  # (S, 4, 4)

            residuals = (apply_transform(hypotheses, source.expand(len(seeds), n, 3)) - target).norm(dim=-1)
            transform = hypotheses[truncated_inlier_score(residuals, tau).argmax()]
            transform = refine(transform, source, target, tau, self.refine_iterations)
            inliers = (apply_transform(transform, source) - target).norm(dim=-1) < tau
            return transform, inliers
