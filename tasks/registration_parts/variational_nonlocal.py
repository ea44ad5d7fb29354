"""The variational non-local network of VBReg (Jiang et al., "Robust Outlier Rejection for 3D
Registration with Variational Bayes", CVPR 2023, Sec. 3.2-3.3; official code ``models/VBPointDSC.py``).

A correspondence ``(x_i, y_i)`` enters as the 6-vector of its two points (centred per pair). A
stack of non-local layers passes messages between all correspondences, with attention
``softmax_j(beta_ij * q_i . k_j / sqrt(d))`` in which the *spatial compatibility*
``beta_ij = max(0, 1 - (|x_i - x_j| - |y_i - y_j|)^2 / sigma_d^2)`` (length consistency: two
inliers keep their distance under a rigid motion) suppresses messages from incompatible
correspondences (Sec. 3.2, "geometric compatibility guided attention").

What makes it *variational* (Sec. 3.3): the query, key and value embeddings are not fixed
projections of the features but samples of latent variables. For each of Q, K and V a recurrent
latent chain (a GRU over the layers, as in a recurrent state-space model) predicts at layer ``l``

* a **prior** ``p(z_l | h_l)`` from the correspondences alone, and
* in training, a **posterior** ``q(z_l | h_l, y)`` that also sees the inlier/outlier labels ``y``,

and the embedding is computed from ``z_l`` drawn by reparameterisation. The evidence lower bound
``E_q[log p(y | z)] - KL(q || p)`` becomes the training loss: inlier classification on both
passes plus the KL term that pulls the prior towards the label-informed posterior, so that at
test time the prior alone produces embeddings that separate inliers from outliers.

Choices where the official code is odd (each stated, not copied):

* the official V chain embeds labels with the K chain's layer (``fc_label_K``, a copy-paste slip
  that leaves ``fc_label_V`` untrained); each chain here has its own;
* the official code also samples at test time, so results vary between runs; here evaluation
  uses the prior means by default (``sample_at_test=False``), which is deterministic and
  exportable to ONNX.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class ChannelsLastBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channel axis of a (B, N, C) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def pairwise_distances(points: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (..., N, N) between rows of (..., N, 3), from the Gram matrix (exports to ONNX)."""
    squared = points.square().sum(-1)
    gram = points @ points.transpose(-1, -2)
    return (squared.unsqueeze(-1) + squared.unsqueeze(-2) - 2 * gram).clamp_min(0.0).sqrt()


def spatial_compatibility(source: torch.Tensor, target: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """``beta_ij = max(0, 1 - (|x_i - x_j| - |y_i - y_j|)^2 / sigma_d^2)`` for (B, N, 3) points -> (B, N, N).

    Points are centred first, which leaves the distances unchanged and keeps the Gram matrix small.
    """
    source = source - source.mean(dim=-2, keepdim=True)
    target = target - target.mean(dim=-2, keepdim=True)
    length_change = pairwise_distances(source) - pairwise_distances(target)
    return (1.0 - length_change.square() / sigma_d**2).clamp_min(0.0)


def feature_compatibility(features: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``gamma_ij = clip(1 - (1 - f_i . f_j) / sigma^2, 0, 1)`` with unit-length features, zero diagonal.

    ``features`` is (..., N, C); the result (..., N, N). Used by the spectral-matching loss and by
    the inlier search.
    """
    unit = F.normalize(features, dim=-1)
    gamma = (1.0 - (1.0 - unit @ unit.transpose(-1, -2)) / sigma**2).clamp(0.0, 1.0)
    eye = torch.eye(gamma.shape[-1], dtype=torch.bool, device=gamma.device)
    return gamma.masked_fill(eye, 0.0)


class Gaussian(tuple):
    """A diagonal Gaussian as the pair (mean, standard deviation)."""

    @property
    def mean(self) -> torch.Tensor:
        return self[0]

    @property
    def std(self) -> torch.Tensor:
        return self[1]


def gaussian_kl(q: Gaussian, p: Gaussian) -> torch.Tensor:
    """``KL(q || p)`` per element for diagonal Gaussians (closed form, in float32 under autocast)."""
    q_mean, q_std, p_mean, p_std = q.mean.float(), q.std.float(), p.mean.float(), p.std.float()
    return torch.log(p_std / q_std) + (q_std.square() + (q_mean - p_mean).square()) / (2 * p_std.square()) - 0.5


def balanced_kl(posterior: Gaussian, prior: Gaussian, balance: float = 0.8) -> torch.Tensor:
    """KL balancing (DreamerV2, as VBReg trains it): ``a KL(sg(q) || p) + (1 - a) KL(q || sg(p))``.

    The first term trains the prior towards the posterior, the second regularises the posterior
    towards the prior; ``a = 0.8`` moves the prior faster. Summed over latent dimensions,
    averaged over correspondences and the batch. Zero when the two distributions are equal.
    """
    stop = lambda g: Gaussian((g.mean.detach(), g.std.detach()))  # noqa: E731
    towards_posterior = gaussian_kl(stop(posterior), prior).sum(-1).mean()
    towards_prior = gaussian_kl(posterior, stop(prior)).sum(-1).mean()
    return balance * towards_posterior + (1 - balance) * towards_prior


class LatentChain(nn.Module):
    """One recurrent variational chain (for Q, K or V), shared by all non-local layers.

    Step ``l``: belief ``h_l = GRU(ReLU(W [z_{l-1}; f_{l-1}]), h_{l-1})``; prior
    ``p(z_l | h_l)`` and, given labels, posterior ``q(z_l | h_l, e(y))`` are diagonal Gaussians
    with ``std = softplus(.) + min_std``; the embedding is ``ReLU(W_e [h_l; z_l])``.
    """

    def __init__(self, channels: int, belief_size: int, hidden_size: int, state_size: int, label_size: int, min_std: float):
        super().__init__()
        self.state_size, self.belief_size, self.min_std = state_size, belief_size, min_std
        self.embed_state_feature = nn.Linear(state_size + channels, belief_size)
        self.rnn = nn.GRUCell(belief_size, belief_size)
        self.prior_hidden = nn.Linear(belief_size, hidden_size)
        self.prior_out = nn.Linear(hidden_size, 2 * state_size)
        self.label_embedding = nn.Linear(2, label_size)
        self.posterior_hidden = nn.Linear(belief_size + label_size, hidden_size)
        self.posterior_out = nn.Linear(hidden_size, 2 * state_size)
        self.embedding = nn.Linear(belief_size + state_size, channels)

    def _gaussian(self, out: torch.Tensor) -> Gaussian:
        mean, raw_std = out.chunk(2, dim=-1)
        return Gaussian((mean, F.softplus(raw_std) + self.min_std))

    def forward(
        self,
        features: torch.Tensor,
        state: torch.Tensor,
        belief: torch.Tensor,
        labels: Optional[torch.Tensor],
        sample: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Gaussian, Optional[Gaussian]]:
        """One layer's step on (B, N, .) tensors; returns (embedding, state, belief, prior, posterior)."""
        b, n, _ = features.shape
        inputs = F.relu(self.embed_state_feature(torch.cat([state, features], dim=-1)))
        belief = self.rnn(inputs.reshape(b * n, -1), belief.reshape(b * n, -1)).reshape(b, n, -1)
        prior = self._gaussian(self.prior_out(F.relu(self.prior_hidden(belief))))
        posterior = None
        chosen = prior
        if labels is not None:
            label = self.label_embedding(F.one_hot(labels.long(), 2).to(belief.dtype))
            posterior = self._gaussian(self.posterior_out(F.relu(self.posterior_hidden(torch.cat([belief, label], dim=-1)))))
            chosen = posterior
        state = chosen.mean + chosen.std * torch.randn_like(chosen.std) if sample else chosen.mean
        embedding = F.relu(self.embedding(torch.cat([belief, state], dim=-1)))
        return embedding, state, belief, prior, posterior


class NonLocalBlock(nn.Module):
    """Compatibility-guided attention over all correspondences, then a residual message MLP."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.message_mlp = nn.Sequential(
            nn.Linear(channels, channels // 2),
            ChannelsLastBatchNorm(channels // 2),
            nn.ReLU(),
            nn.Linear(channels // 2, channels // 2),
            ChannelsLastBatchNorm(channels // 2),
            nn.ReLU(),
            nn.Linear(channels // 2, channels),
        )

    def forward(
        self, features: torch.Tensor, embeddings: tuple[torch.Tensor, torch.Tensor, torch.Tensor], beta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the updated features and this layer's queries and keys (for the inlier search)."""
        b, n, c = features.shape
        h = self.num_heads
        q, k, v = self.query(embeddings[0]), self.key(embeddings[1]), self.value(embeddings[2])
        heads = lambda x: x.view(b, n, h, c // h).transpose(1, 2)  # noqa: E731
        scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(c // h)
        attention = torch.softmax(beta.unsqueeze(1) * scores, dim=-1)
        message = (attention @ heads(v)).transpose(1, 2).reshape(b, n, c)
        return features + self.message_mlp(message), q, k


class VariationalNonLocalNet(nn.Module):
    """Correspondences (B, N, 6) -> inlier logits, features, and every layer's features, queries and keys.

    Args:
        num_layers: non-local layers (12 in the paper).
        channels: feature width (128).
        num_heads: attention heads (1).
        belief_size / hidden_size / state_size / label_size: the latent chains' GRU state, MLP
            width, latent ``z`` and label-embedding sizes (256 / 256 / 128 / 64).
        min_std: added to every predicted standard deviation (0.1).
        sigma_d: spatial-compatibility scale in data units (0.10 m for 3DMatch, 1.2 m for KITTI).
        sample_at_test: draw latents from the prior in evaluation too (the official code does);
            by default evaluation uses the prior means (deterministic, exportable).
    """

    def __init__(
        self,
        num_layers: int = 12,
        channels: int = 128,
        num_heads: int = 1,
        belief_size: int = 256,
        hidden_size: int = 256,
        state_size: int = 128,
        label_size: int = 64,
        min_std: float = 0.1,
        sigma_d: float = 0.10,
        sample_at_test: bool = False,
    ):
        super().__init__()
        self.num_layers, self.sigma_d, self.sample_at_test = num_layers, sigma_d, sample_at_test
        self.init_mlp = nn.Sequential(
            nn.Linear(6, channels), ChannelsLastBatchNorm(channels), nn.ReLU(), nn.Linear(channels, channels)
        )
        chain = lambda: LatentChain(channels, belief_size, hidden_size, state_size, label_size, min_std)  # noqa: E731
        self.chains = nn.ModuleDict({"query": chain(), "key": chain(), "value": chain()})
        self.layers = nn.ModuleList(NonLocalBlock(channels, num_heads) for _ in range(num_layers))
        self.classifier = nn.Sequential(nn.Linear(channels, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        #: scale of the feature compatibility, learned (initialised to 1 as in the paper)
        self.sigma = nn.Parameter(torch.ones(()))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, corr_pos: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict:
        """One pass. With ``labels`` (B, N) it is the posterior pass, without them the prior pass.

        Returns ``logits`` (B, N), ``features`` (B, N, C), per-layer lists ``layer_features``,
        ``queries``, ``keys`` (each (B, N, C)), and per chain the lists ``priors`` and
        ``posteriors`` of Gaussians (``None`` entries in the prior pass).
        """
        source, target = corr_pos[..., :3], corr_pos[..., 3:]
        beta = spatial_compatibility(source.float(), target.float(), self.sigma_d).to(corr_pos.dtype)
        features = self.init_mlp(corr_pos - corr_pos.mean(dim=1, keepdim=True))
        b, n, _ = features.shape
        sample = self.training or self.sample_at_test
        states = {name: features.new_zeros(b, n, c.state_size) for name, c in self.chains.items()}
        beliefs = {name: features.new_zeros(b, n, c.belief_size) for name, c in self.chains.items()}
        out: dict = {"layer_features": [], "queries": [], "keys": [], "priors": [], "posteriors": [], "beta": beta}
        for layer in self.layers:
            embeddings = []
            for name, chain in self.chains.items():
                embedding, states[name], beliefs[name], prior, posterior = chain(features, states[name], beliefs[name], labels, sample)
                embeddings.append(embedding)
                out["priors"].append(prior)
                out["posteriors"].append(posterior)
            features, q, k = layer(features, tuple(embeddings), beta)
            out["layer_features"].append(features)
            out["queries"].append(q)
            out["keys"].append(k)
        out["features"] = features
        out["logits"] = self.classifier(features).squeeze(-1)
        return out


class CorrespondenceScorer(nn.Module):
    """The exported graph: correspondences (B, N, 6) in, the prior pass's tensors out.

    Outputs ``logits`` (B, N) and, stacked over layers, ``features``, ``queries`` and ``keys``
    (B, L, N, C): everything the voting-based inlier search needs. The search itself (top-k
    voting, power iteration, SVD) runs outside the graph; ONNX has no SVD.
    """

    def __init__(self, network: VariationalNonLocalNet):
        super().__init__()
        self.network = network

    def forward(self, corr_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.network(corr_pos)
        return (
            out["logits"],
            torch.stack(out["layer_features"], dim=1),
            torch.stack(out["queries"], dim=1),
            torch.stack(out["keys"], dim=1),
        )
