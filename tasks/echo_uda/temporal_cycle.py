"""Temporal Cycle Consistency (TCC), GraphEcho Sec. 3.3.

An echo clip shows the same heart beating again and again, so the frames of one heartbeat should
find their counterparts, at the same cardiac phase, in the next one. GraphEcho enforces this
with the cycle-back loss of Dwibedi et al. ("Temporal Cycle-Consistency Learning", CVPR 2019) on
per-frame embeddings, so that target videos, which have no labels, are still represented (and
segmented) consistently through the cardiac cycle.

For a clip split into two consecutive heartbeats ``U = (u_1..u_n)`` and ``V = (v_1..v_m)``:

* soft nearest neighbour of ``u_i`` in ``V``: ``v~ = sum_j alpha_j v_j`` with
  ``alpha = softmax_j(-|u_i - v_j|^2 / tau)``;
* cycle back to ``U``: ``beta = softmax_k(-|v~ - u_k|^2 / tau)``;
* the loss is the cross-entropy of ``beta`` with the start index ``i`` (cycle-back
  classification), in both directions, averaged over frames and clips.

It is low when every frame of one beat has a distinct counterpart in the other (phase is
encoded), and high when frames are unrelated; collapsing all embeddings to one point does not
help (``beta`` becomes uniform). The official code has this loss (``seg_cycle``, on globally
pooled deepest features) but switched off and broken as released (it indexes a dict the
network does not return and reads a hard-coded file); here it is on by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrameEmbedder(nn.Module):
    """Per-frame embedding: global average pool of the deepest pyramid level, a two-layer MLP,
    L2 normalisation (so that ``tau`` has a fixed meaning: squared distances lie in [0, 4])."""

    def __init__(self, dim: int, embedding_dim: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, embedding_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(features.mean(dim=(2, 3))), dim=-1)


def cycle_back_logits(u: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits of ``beta`` (n, n): row i is where ``u_i`` lands after the cycle ``U -> V -> U``."""
    alpha = torch.softmax(-torch.cdist(u, v).pow(2) / temperature, dim=1)
    soft_neighbours = alpha @ v
    return -torch.cdist(soft_neighbours, u).pow(2) / temperature


def cycle_back_loss(embeddings: torch.Tensor, temperature: float = 0.1, split: int | None = None) -> torch.Tensor:
    """Cycle-back classification loss of clips (B, T, E), between their two heartbeats.

    Args:
        embeddings: per-frame embeddings of B clips of T frames.
        temperature: ``tau`` of both soft-max steps.
        split: first frame of the second heartbeat (default ``T // 2``: a clip of two beats).
    """
    t = embeddings.shape[1]
    split = t // 2 if split is None else split
    if not 1 <= split < t:
        raise ValueError(f"split {split} must leave frames on both sides of a {t}-frame clip")
    losses = []
    for clip in embeddings.float():
        for first, second in ((clip[:split], clip[split:]), (clip[split:], clip[:split])):
            logits = cycle_back_logits(first, second, temperature)
            losses.append(F.cross_entropy(logits, torch.arange(len(first), device=clip.device)))
    return torch.stack(losses).mean()
