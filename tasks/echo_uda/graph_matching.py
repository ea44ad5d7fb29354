"""Spatial-wise Cross-domain Graph Matching (SCGM), GraphEcho Sec. 3.2.

SCGM aligns the two domains at the level of *structures*, not whole images: pixels of each
cardiac structure become graph nodes, and source and target graphs are matched class by class.
The official code ports SIGMA's graph-matching head (Li et al., CVPR 2022); its hyper-parameters
are the defaults here. One training step:

1. **Graph nodes** (``sample_nodes``): feature vectors are taken from every pyramid level P2-P5
   where the (down-sampled) mask has a structure, source masks for the source and confident
   pseudo-masks for the target. At most ``nodes_per_level`` structure nodes per level, evenly
   strided, plus one background node per ``bg_ratio`` structure nodes. (The official code
   assigns locations by FCOS-style bounding boxes with detection strides and object-size
   ranges, a leftover of SIGMA; a mask-based assignment is what the paper describes.)
2. **Node discriminator**: the raw nodes pass a gradient-reversal layer (lambda 0.02) into an MLP
   that tells source from target (BCE, weight 0.1).
3. **Vision-to-graph**: Linear-LayerNorm-ReLU-Linear-LayerNorm.
4. **Semantic completion**: a class present in one domain only is completed on the other side
   by nodes drawn around that domain's per-class memory seed (std of the present nodes),
   then projected; so every class has nodes on both sides.
5. **Intra-domain graph**: single-head self-attention; the attention matrix is the edge set.
6. **Memory update** (no gradient): per class, the nodes are split in two by spectral
   clustering (when more than 20) and the half holding the old seed is averaged; the seed moves
   towards it with momentum ``cos(seed, mean)``.
7. **Cross-domain interaction**: single-head cross-attention, each domain attending to the other.
8. **Losses**: node classification (CE, weight 1.0); affinity matching: an MLP scores every
   source-target node pair, the matrix is instance-normalised and made (near) doubly stochastic
   by Sinkhorn with a slack row and column (20 iterations), and focal BCE pulls same-class pairs
   up and other pairs down (weight 0.1); quadratic structure matching
   ``|E_s M - M E_t|_1`` with the edges detached (weight 1.0).

``FeatureDiscriminator`` is the image-level adversarial alignment on each pyramid level (four
conv-GN-ReLU layers, gradient reversal 0.02, pixel-wise BCE, weight 0.1 per level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.echo_uda.segmentor import group_count

# -- gradient reversal --------------------------------------------------------------------------


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


class GradientReversal(nn.Module):
    """Identity forward; multiplies the gradient by ``-strength`` backward (Ganin & Lempitsky 2015)."""

    def __init__(self, strength: float = 1.0):
        super().__init__()
        self.strength = strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReverseGradient.apply(x, self.strength)


# -- matching primitives --------------------------------------------------------------------------


def sinkhorn(log_alpha: torch.Tensor, iterations: int = 20, slack: bool = True, keep_slack: bool = False) -> torch.Tensor:
    """Sinkhorn normalisation in log space of an (N, M) score matrix; returns log-assignments.

    Rows and columns are normalised in turn. With ``slack`` a zero-score row and column are
    appended and left unnormalised, so a node may stay unmatched (rows and columns of the real
    part then sum to at most one; with the slack entries included they sum to one). Without it
    a square matrix converges to a doubly stochastic one. ``keep_slack`` returns the padded
    (N + 1, M + 1) matrix.
    """
    if not slack:
        for _ in range(iterations):
            log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=1, keepdim=True)
            log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=0, keepdim=True)
        return log_alpha
    padded = F.pad(log_alpha, (0, 1, 0, 1))
    for _ in range(iterations):
        rows = padded[:-1] - torch.logsumexp(padded[:-1], dim=1, keepdim=True)
        padded = torch.cat([rows, padded[-1:]], dim=0)
        cols = padded[:, :-1] - torch.logsumexp(padded[:, :-1], dim=0, keepdim=True)
        padded = torch.cat([cols, padded[:, -1:]], dim=1)
    return padded if keep_slack else padded[:-1, :-1]


def focal_bce(probability: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """Element-wise focal binary cross-entropy on probabilities (Lin et al. 2017)."""
    p = probability.clamp(1e-6, 1 - 1e-6)
    positive = -alpha * (1 - p) ** gamma * target * torch.log(p)
    negative = -(1 - alpha) * p**gamma * (1 - target) * torch.log(1 - p)
    return positive + negative


class GraphAttention(nn.Module):
    """Single-head attention over a set of nodes with residual and LayerNorm (the official
    ``MultiHeadAttention`` with one head). Returns the updated queries and the attention matrix
    (the graph's edges)."""

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.scale = dim**-0.5

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = torch.softmax(self.query(query) @ self.key(context).T * self.scale, dim=-1)
        updated = self.dropout(self.out(self.dropout(attention) @ self.value(context)))
        return self.norm(query + updated), attention


class NodeAffinity(nn.Module):
    """Pairwise affinity ``MLP([W_s x_i ; W_t y_j])`` of every source/target node pair.

    The first linear layer of the MLP acts on the concatenation, so it is split into a source
    and a target half and the (N, M, hidden) pre-activation is a broadcast sum (same result as
    concatenating, without materialising the (N, M, 2 d) pairs)."""

    def __init__(self, dim: int):
        super().__init__()
        self.project_source = nn.Linear(dim, dim, bias=False)
        self.project_target = nn.Linear(dim, dim, bias=False)
        self.hidden_source = nn.Linear(dim, 2 * dim)
        self.hidden_target = nn.Linear(dim, 2 * dim, bias=False)
        self.score = nn.Linear(2 * dim, 1)
        for layer in (self.project_source, self.project_target, self.hidden_source, self.hidden_target, self.score):
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hidden_s = self.hidden_source(self.project_source(source))
        hidden_t = self.hidden_target(self.project_target(target))
        return self.score(F.relu(hidden_s[:, None] + hidden_t[None])).squeeze(-1)


def _mlp(dim: int, hidden: int, out: int, layers: int) -> nn.Sequential:
    """``layers`` x (Linear-LayerNorm-ReLU) then Linear; weights N(0, 0.01) as in the official head."""
    blocks, width = [], dim
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.LayerNorm(hidden, elementwise_affine=False), nn.ReLU()]
        width = hidden
    mlp = nn.Sequential(*blocks, nn.Linear(width, out))
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
    return mlp


# -- node sampling --------------------------------------------------------------------------------


def sample_nodes(
    pyramid: list[torch.Tensor], labels: torch.Tensor, nodes_per_level: int = 100, bg_ratio: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Graph nodes from pyramid features where ``labels`` names a class.

    Args:
        pyramid: P2-P5, each (N, D, h, w).
        labels: (N, H, W) class index per pixel; negative = ignore (unlabelled, unconfident).
        nodes_per_level: most structure nodes per level (evenly strided over the raster order).
        bg_ratio: one background node per ``bg_ratio`` structure nodes (at least one).

    Returns:
        nodes (K, D) and their labels (K,), background first as in the official sampler.
    """
    all_nodes, all_labels = [], []
    for features in pyramid:
        grid = F.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest")
        flat_labels = grid.reshape(-1).long()
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        positive = torch.nonzero(flat_labels > 0).squeeze(1)
        negative = torch.nonzero(flat_labels == 0).squeeze(1)
        if len(positive) == 0:
            continue
        step = max(1, len(positive) // nodes_per_level)
        positive = positive[::step][:nodes_per_level]
        n_negative = min(len(negative), max(1, len(positive) // bg_ratio))
        if n_negative:
            picks = torch.linspace(0, len(negative) - 1, n_negative, device=negative.device).round().long()
            negative = negative[picks]
            all_nodes.append(flat[negative])
            all_labels.append(flat_labels[negative])
        all_nodes.append(flat[positive])
        all_labels.append(flat_labels[positive])
    if not all_nodes:
        dim = pyramid[0].shape[1]
        return pyramid[0].new_zeros((0, dim)), labels.new_zeros((0,), dtype=torch.long)
    return torch.cat(all_nodes), torch.cat(all_labels)


def spectral_bipartition(points: torch.Tensor, neighbours: int, iterations: int = 10) -> torch.Tensor:
    """Split ``points`` (n, d) in two by spectral clustering on a k-nearest-neighbour graph.

    The graph connects each point to its ``neighbours`` nearest (itself included) and is
    symmetrised; the points are embedded by the two leading eigenvectors of its normalised
    Laplacian (scaled by ``D^-1/2``) and split by 2-means. This is the 2-cluster case of
    scikit-learn's ``SpectralClustering(affinity="nearest_neighbors", assign_labels="kmeans")``
    that the official code calls on CPU, in torch. Returns a boolean (n,) mask of the cluster
    holding point 0.
    """
    n = points.shape[0]
    k = max(1, min(neighbours, n))
    nearest = torch.cdist(points, points).topk(k, dim=1, largest=False).indices
    adjacency = torch.zeros(n, n, device=points.device).scatter_(1, nearest, 1.0)
    adjacency = 0.5 * (adjacency + adjacency.T)
    scale = adjacency.sum(1).clamp_min(1e-12).rsqrt()
    laplacian = torch.eye(n, device=points.device) - scale[:, None] * adjacency * scale[None]
    _, vectors = torch.linalg.eigh(laplacian)
    embedding = vectors[:, :2] * scale[:, None]
    # 2-means, started from point 0 and the point farthest from it
    centres = torch.stack([embedding[0], embedding[(embedding - embedding[0]).norm(dim=1).argmax()]])
    for _ in range(iterations):
        side = torch.cdist(embedding, centres).argmin(1) == 0
        if side.all() or not side.any():
            break
        centres = torch.stack([embedding[side].mean(0), embedding[~side].mean(0)])
    return side == side[0]


# -- SCGM ---------------------------------------------------------------------------------------


class SpatialCrossDomainGraphMatching(nn.Module):
    """SCGM (the module docstring's steps 1-8). ``forward`` returns a dict of weighted losses.

    Args:
        dim: node dimension (the FPN's channels).
        num_classes: classes including background.
        nodes_per_level, bg_ratio: node sampling (100 and 8 in the official code).
        node_weight, matching_weight, quadratic_weight, node_discriminator_weight: loss weights
            (1.0, 0.1, 1.0, 0.1 in the official code).
        reversal_strength: gradient-reversal factor of the node discriminator (0.02).
        sinkhorn_iterations: 20 in the official code.
        cluster_min_nodes: spectral clustering of a class's nodes only above this count (20).
        min_source_nodes: skip the step with fewer source nodes (6).
        dropout: attention dropout (0.1).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        nodes_per_level: int = 100,
        bg_ratio: int = 8,
        node_weight: float = 1.0,
        matching_weight: float = 0.1,
        quadratic_weight: float = 1.0,
        node_discriminator_weight: float = 0.1,
        reversal_strength: float = 0.02,
        sinkhorn_iterations: int = 20,
        cluster_min_nodes: int = 20,
        min_source_nodes: int = 6,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.nodes_per_level, self.bg_ratio = nodes_per_level, bg_ratio
        self.node_weight, self.matching_weight = node_weight, matching_weight
        self.quadratic_weight, self.node_discriminator_weight = quadratic_weight, node_discriminator_weight
        self.sinkhorn_iterations = sinkhorn_iterations
        self.cluster_min_nodes, self.min_source_nodes = cluster_min_nodes, min_source_nodes

        self.node_discriminator = nn.Sequential(GradientReversal(reversal_strength), _mlp(dim, dim, 1, layers=3))
        self.vision_to_graph = nn.Sequential(
            nn.Linear(dim, dim), nn.LayerNorm(dim, elementwise_affine=False), nn.ReLU(),
            nn.Linear(dim, dim), nn.LayerNorm(dim, elementwise_affine=False),
        )  # fmt: skip
        for layer in self.vision_to_graph:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
        self.seed_projection = nn.Linear(dim, dim)
        nn.init.normal_(self.seed_projection.weight, std=0.01)
        nn.init.zeros_(self.seed_projection.bias)
        self.register_buffer("source_seeds", torch.randn(num_classes, dim))
        self.register_buffer("target_seeds", torch.randn(num_classes, dim))
        self.intra_domain_graph = GraphAttention(dim, dropout)
        self.cross_domain_graph = GraphAttention(dim, dropout)
        self.node_classifier = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, num_classes))
        for layer in self.node_classifier:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
        self.affinity = NodeAffinity(dim)

    def forward(
        self,
        source_pyramid: list[torch.Tensor],
        source_labels: torch.Tensor,
        target_pyramid: list[torch.Tensor],
        target_labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Losses of one step; ``*_labels`` are (N, H, W) with negative = ignore."""
        source, source_y = sample_nodes(source_pyramid, source_labels, self.nodes_per_level, self.bg_ratio)
        target, target_y = sample_nodes(target_pyramid, target_labels, self.nodes_per_level, self.bg_ratio)
        if len(source) < self.min_source_nodes:
            return {}
        losses = {}
        if len(target):
            logits = self.node_discriminator(torch.cat([source, target]))
            domain = torch.cat([source.new_ones(len(source)), source.new_zeros(len(target))])
            losses["node_adversarial"] = self.node_discriminator_weight * F.binary_cross_entropy_with_logits(
                logits.squeeze(1), domain
            )
            source, target = self.vision_to_graph(source), self.vision_to_graph(target)
            (source, source_y), (target, target_y) = self.complete_classes(source, source_y, target, target_y)
        else:  # no confident target node yet: the official code matches two halves of the source
            source = self.vision_to_graph(source)
            (source, source_y), (target, target_y) = split_halves(source, source_y)

        source, source_edges = self.intra_domain_graph(source, source)
        target, target_edges = self.intra_domain_graph(target, target)
        self.update_seeds(source.detach(), source_y, target.detach(), target_y)
        source, target = (
            self.cross_domain_graph(source, target)[0],
            self.cross_domain_graph(target, source)[0],
        )

        logits = self.node_classifier(torch.cat([source, target]))
        losses["node"] = self.node_weight * F.cross_entropy(logits, torch.cat([source_y, target_y]))

        assignment = self.match(source, target)
        same_class = (source_y[:, None] == target_y[None]).float()
        losses["matching"] = self.matching_weight * matching_loss(assignment, same_class)
        residual = source_edges.detach() @ assignment - assignment @ target_edges.detach()
        losses["quadratic"] = self.quadratic_weight * residual.abs().mean()
        return losses

    def match(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft assignment (N_s, N_t): affinity, instance norm over the matrix, Sinkhorn with slack."""
        scores = self.affinity(source, target)
        scores = F.instance_norm(scores[None, None]).squeeze(0).squeeze(0)
        return sinkhorn(scores, self.sinkhorn_iterations, slack=True).exp()

    def complete_classes(self, source, source_y, target, target_y):
        """Order nodes class by class and fill a class missing on one side from that side's
        memory seed: ``N(seed, std of the other side's nodes)`` (small noise under five nodes),
        then ``seed_projection``."""
        parts_s, labels_s, parts_t, labels_t = [], [], [], []
        for c in torch.cat([source_y, target_y]).unique().tolist():
            s, t = source[source_y == c], target[target_y == c]
            if len(s) == 0:
                s = self.seed_projection(self._hallucinate(self.source_seeds[c], t))
            elif len(t) == 0:
                t = self.seed_projection(self._hallucinate(self.target_seeds[c], s))
            parts_s.append(s)
            parts_t.append(t)
            labels_s.append(source_y.new_full((len(s),), c))
            labels_t.append(target_y.new_full((len(t),), c))
        return (torch.cat(parts_s), torch.cat(labels_s)), (torch.cat(parts_t), torch.cat(labels_t))

    @staticmethod
    def _hallucinate(seed: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        mean = seed.to(present.dtype).expand_as(present)
        if len(present) < 5:
            return mean + 0.01 * torch.randn_like(present)
        std = present.detach().std(0, keepdim=True).expand_as(present)
        return torch.normal(mean, std)

    @torch.no_grad()
    def update_seeds(self, source, source_y, target, target_y) -> None:
        for seeds, nodes, labels in ((self.source_seeds, source, source_y), (self.target_seeds, target, target_y)):
            for c in labels.unique().tolist():
                members = nodes[labels == c].float()
                if len(members) > self.cluster_min_nodes:
                    with torch.autocast(device_type=members.device.type, enabled=False):
                        keep = spectral_bipartition(torch.cat([seeds[c][None], members]), len(members) // 2)[1:]
                    if keep.any():
                        members = members[keep]
                mean = members.mean(0)
                momentum = F.cosine_similarity(mean, seeds[c], dim=0)
                seeds[c] = seeds[c] * momentum + mean * (1 - momentum)


def split_halves(nodes: torch.Tensor, labels: torch.Tensor):
    """Every class's nodes alternately into two sets (the official fallback without target nodes)."""
    first, second, first_y, second_y = [], [], [], []
    for c in labels.unique().tolist():
        members = nodes[labels == c]
        first.append(members[::2])
        second.append(members[1::2])
        first_y.append(labels.new_full((len(first[-1]),), c))
        second_y.append(labels.new_full((len(second[-1]),), c))
    return (torch.cat(first), torch.cat(first_y)), (torch.cat(second), torch.cat(second_y))


def matching_loss(assignment: torch.Tensor, same_class: torch.Tensor) -> torch.Tensor:
    """Focal BCE on the assignment (the official "o2o" loss): per source node, its strongest
    same-class match is a true positive; every different-class entry a false positive. As in the
    official code each focal term is averaged, then the true positives are divided by their
    count and the false positives by their (detached) summed probability."""
    best = (assignment * same_class).argmax(dim=1)
    positives = assignment[torch.arange(len(assignment), device=assignment.device), best]
    loss = focal_bce(positives, torch.ones_like(positives)).mean() / len(positives)
    negatives = assignment[same_class == 0]
    if len(negatives):
        loss = loss + focal_bce(negatives, torch.zeros_like(negatives)).mean() / negatives.sum().detach().clamp_min(1e-6)
    return loss


class FeatureDiscriminator(nn.Module):
    """Pixel-wise domain classifier on one pyramid level, behind gradient reversal.

    Four 3x3 conv-GroupNorm-ReLU layers and a 3x3 conv to one logit per location; BCE with
    source = 1, target = 0 (the official ``Discriminator``, lambda 0.02)."""

    def __init__(self, dim: int, reversal_strength: float = 0.02, layers: int = 4):
        super().__init__()
        blocks = []
        for _ in range(layers):
            blocks += [nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(group_count(dim), dim), nn.ReLU()]
        self.reverse = GradientReversal(reversal_strength)
        self.tower = nn.Sequential(*blocks, nn.Conv2d(dim, 1, 3, padding=1))
        for layer in self.tower:
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits_s = self.tower(self.reverse(source))
        logits_t = self.tower(self.reverse(target))
        return F.binary_cross_entropy_with_logits(logits_s, torch.ones_like(logits_s)) + F.binary_cross_entropy_with_logits(
            logits_t, torch.zeros_like(logits_t)
        )
