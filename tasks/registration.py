"""Robust point-cloud registration with variational-Bayes outlier rejection (VBReg).

Paper: H. Jiang, Z. Dang, Z. Wei, J. Xie, J. Yang, M. Salzmann, "Robust Outlier Rejection for 3D
Registration with Variational Bayes", CVPR 2023 (official code: github.com/Jiang-HB/VBReg, a
fork of PointDSC). This file follows the paper's method section; the pieces live beside it in
``tasks/registration_parts/``.

0. **Putative correspondences** (Sec. 4, FPFH setting; ``data.correspondences``): voxel
   down-sampling, FPFH features, mutual nearest neighbours in feature space; K per pair.
1. **Variational non-local network** (Sec. 3.2-3.3; ``variational_nonlocal``): non-local layers
   whose attention is weighted by the spatial compatibility of the correspondences, with Q, K, V
   embeddings sampled from latent variables; a prior conditioned on the correspondences and, in
   training, a posterior also conditioned on the inlier labels.
2. **Training objective** (Sec. 3.3, the variational lower bound; official ``libs/trainer.py``):
   both passes run every step and share weights::

       L = m [BCE(c_post, y) + SM(gamma_post, y)] + (1 - m) [BCE(c_prior, y) + SM(gamma_prior, y)]
           + m * w_kl * KL_balanced(q || p)

   with ``m = mix_ratio`` (0.5), ``w_kl = kl_weight`` (1), inlier labels ``y_i = [|T_gt x_i - y_i|
   < tau]``, BCE the inlier classification loss on the logits ``c``, SM the spectral-matching
   loss ``mean_ij (gamma_ij - y_i y_j)^2`` on the feature compatibility ``gamma`` (PointDSC), and
   the KL term averaged over layers and the Q, K, V chains with DreamerV2's balancing (0.8).
3. **Voting-based inlier search** (Sec. 3.4; ``inlier_search``): seeds by confidence with NMS,
   consensus sets voted by every layer's attention and compatibility maps (Wilson lower bound),
   one weighted-Kabsch hypothesis per seed, the best by truncated inlier score, then refinement.
4. **Metrics** (``metrics``): registration recall (15 degrees / 30 cm on 3DMatch, 5 degrees /
   60 cm on KITTI), RRE and RTE over successful pairs, inlier precision / recall / F1, and the
   3DMatch RMSE recall where gt.info exists; time per pair is the leaderboard's latency.
   Baselines on the same pairs and features: open3d RANSAC (100k iterations, confidence 0.999)
   and FGR (``baselines``).

Units: ``inlier_threshold``, ``sigma_d``, ``nms_radius`` and ``max_translation_error`` are in the
data's units (metres for 3DMatch, KITTI and the built-in rooms); ``rte`` is reported x100
(centimetres for metres).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from tasks.base import BaseTask
from tasks.registration_parts import baselines
from tasks.registration_parts.inlier_search import VotingInlierSearch
from tasks.registration_parts.metrics import (
    InlierScore,
    RegistrationRecall,
    RMSERecall,
    SuccessfulRotationError,
    SuccessfulTranslationError,
)
from tasks.registration_parts.rendering import pair_panel
from tasks.registration_parts.rigid import apply_transform
from tasks.registration_parts.variational_nonlocal import (
    CorrespondenceScorer,
    VariationalNonLocalNet,
    balanced_kl,
    feature_compatibility,
)

PANEL_POINTS = 4000  # keypoints per cloud drawn in an example picture


def correspondence_points(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, K, 3) source and target points of the batch's correspondences."""
    return batch["src"][batch["correspondences"][..., 0]], batch["tgt"][batch["correspondences"][..., 1]]


def inlier_labels(batch: dict, tau: float) -> torch.Tensor:
    """Ground-truth labels (B, K): the correspondence lands within ``tau`` under the true transform."""
    source, target = correspondence_points(batch)
    with torch.autocast(device_type=source.device.type, enabled=False):
        return (apply_transform(batch["transform"].float(), source.float()) - target.float()).norm(dim=-1) < tau


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, balanced: bool) -> torch.Tensor:
    """Inlier BCE on the logits; ``balanced`` weighs positives by ``#negatives / #positives`` (PointDSC's option)."""
    targets = labels.float()
    if not balanced:
        return F.binary_cross_entropy_with_logits(logits.float(), targets)
    positives = targets.sum().clamp_min(1.0)
    negatives = (1 - targets).sum().clamp_min(1.0)
    return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=negatives / positives)


def spectral_matching_loss(gamma: torch.Tensor, labels: torch.Tensor, balanced: bool = False) -> torch.Tensor:
    """PointDSC's ``(gamma_ij - y_i y_j)^2`` with a zero diagonal on both sides, averaged over all pairs,
    or (``balanced``) as the mean of the averages over inlier-inlier pairs and over the rest."""
    y = labels.to(gamma.dtype)
    target = y.unsqueeze(-1) * y.unsqueeze(-2)
    target = target * (1 - torch.eye(target.shape[-1], dtype=target.dtype, device=target.device))
    if not balanced:
        return F.mse_loss(gamma, target)
    squared = (gamma - target).square()
    positive = (squared * target).sum((-1, -2)) / target.sum((-1, -2)).clamp_min(1.0)
    negative = (squared * (1 - target)).sum((-1, -2)) / (1 - target).sum((-1, -2)).clamp_min(1.0)
    return (0.5 * positive + 0.5 * negative).mean()


class PointCloudRegistration(BaseTask):
    """VBReg on FPFH correspondences: the variational non-local network and the voting search.

    Network (``VariationalNonLocalNet``): ``num_layers``, ``channels``, ``num_heads``,
    ``belief_size``, ``hidden_size``, ``state_size``, ``label_size``, ``min_std``,
    ``sample_at_test`` (paper: 12, 128, 1, 256, 256, 128, 64, 0.1, sampling on).

    Geometry (data units): ``inlier_threshold`` tau (labels, hypothesis score, refinement),
    ``sigma_d`` (spatial compatibility), ``nms_radius``; search: ``seed_ratio``, ``min_seeds``,
    ``consensus_size``, ``power_iterations``, ``refine_iterations`` (3DMatch: 0.10, 0.10, 0.10,
    0.1, 1000, 40, 10, 20; KITTI: tau = sigma_d = 1.2).

    Loss: ``mix_ratio``, ``kl_weight``, ``kl_balance``, ``classification_weight``,
    ``spectral_matching_weight`` (0.5, 1, 0.8, 1, 1), and ``balanced_losses``: PointDSC/VBReg's
    ``--balanced`` option, off in the paper's runs; it balances inliers against outliers in both
    losses, which training needs when a few percent of the correspondences are inliers (FPFH on
    small training sets) — otherwise predicting "outlier" everywhere is nearly optimal.

    Metrics: ``max_rotation_error`` (degrees) and ``max_translation_error`` (data units) for a
    successful registration. Baselines: ``ransac_iterations``, ``ransac_confidence``.
    Optimiser arguments are ``BaseTask``'s (the paper: Adam, 1e-4, weight decay 1e-6).
    """

    monitor = "val_rr"
    mode = "max"
    task_name = "registration"
    method_name = "VBReg"
    input_names = ("corr_pos",)
    output_names = ("logits", "features", "queries", "keys")
    export_atol = 1e-3

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
        sample_at_test: bool = False,
        inlier_threshold: float = 0.10,
        sigma_d: float = 0.10,
        nms_radius: float = 0.10,
        seed_ratio: float = 0.1,
        min_seeds: int = 1000,
        consensus_size: int = 40,
        power_iterations: int = 10,
        refine_iterations: int = 20,
        mix_ratio: float = 0.5,
        kl_weight: float = 1.0,
        kl_balance: float = 0.8,
        classification_weight: float = 1.0,
        spectral_matching_weight: float = 1.0,
        balanced_losses: bool = False,
        max_rotation_error: float = 15.0,
        max_translation_error: float = 0.30,
        ransac_iterations: int = 100_000,
        ransac_confidence: float = 0.999,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.network = VariationalNonLocalNet(
            num_layers=num_layers,
            channels=channels,
            num_heads=num_heads,
            belief_size=belief_size,
            hidden_size=hidden_size,
            state_size=state_size,
            label_size=label_size,
            min_std=min_std,
            sigma_d=sigma_d,
            sample_at_test=sample_at_test,
        )
        self.search = VotingInlierSearch(
            inlier_threshold=inlier_threshold,
            sigma_d=sigma_d,
            nms_radius=nms_radius,
            seed_ratio=seed_ratio,
            min_seeds=min_seeds,
            consensus_size=consensus_size,
            power_iterations=power_iterations,
            refine_iterations=refine_iterations,
        )
        self.setup_metrics()

    def configure_metrics(self) -> MetricCollection:
        hp = self.hparams
        thresholds = dict(max_rotation_error=hp.max_rotation_error, max_translation_error=hp.max_translation_error)
        return MetricCollection(
            {
                "rr": RegistrationRecall(**thresholds),
                "rre": SuccessfulRotationError(**thresholds),
                "rte": SuccessfulTranslationError(**thresholds),
                "inlier_precision": InlierScore("precision"),
                "inlier_recall": InlierScore("recall"),
                "inlier_f1": InlierScore("f1"),
                "rmse_recall": RMSERecall(),
            },
            compute_groups=False,  # the metrics share state names but not meanings
        )

    # -- training: the variational lower bound ---------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        corr_pos = torch.cat(correspondence_points(batch), dim=-1)
        labels = inlier_labels(batch, hp.inlier_threshold)
        posterior_pass = self.network(corr_pos, labels)
        prior_pass = self.network(corr_pos)
        targets = labels.float()
        terms = {}
        for name, out in (("posterior", posterior_pass), ("prior", prior_pass)):
            terms[f"bce_{name}"] = classification_loss(out["logits"], labels, hp.balanced_losses)
            gamma = feature_compatibility(out["features"].float(), self.network.sigma)
            terms[f"sm_{name}"] = spectral_matching_loss(gamma, labels, hp.balanced_losses)
        kl = torch.stack(
            [balanced_kl(q, p, hp.kl_balance) for q, p in zip(posterior_pass["posteriors"], posterior_pass["priors"])]
        ).mean()
        loss = (
            hp.mix_ratio * (hp.classification_weight * terms["bce_posterior"] + hp.spectral_matching_weight * terms["sm_posterior"])
            + (1 - hp.mix_ratio) * (hp.classification_weight * terms["bce_prior"] + hp.spectral_matching_weight * terms["sm_prior"])
            + hp.mix_ratio * hp.kl_weight * kl
        )
        size = len(labels)
        self.log("train_loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train_{k}": v for k, v in terms.items()} | {"train_kl": kl, "train_inlier_ratio": targets.mean()}, batch_size=size)
        return loss

    # -- inference: prior pass, then the voting search ---------------------------------------------
    def predict_batch(self, batch: dict) -> dict:
        """``transform`` (B, 4, 4), ``inliers`` (B, K) under it, and the network's ``logits`` (B, K)."""
        source, target = correspondence_points(batch)
        logits, features, queries, keys = self.inference_module()(torch.cat([source, target], dim=-1))
        sigma = float(self.network.sigma.detach())
        results = [
            self.search(source[b], target[b], logits[b], features[b], queries[b], keys[b], sigma) for b in range(len(source))
        ]
        return {
            "transform": torch.stack([r[0] for r in results]),
            "inliers": torch.stack([r[1] for r in results]),
            "logits": logits.float(),
        }

    def update_metrics(self, metrics: MetricCollection, prediction: dict, batch: dict) -> None:
        metrics.update(
            estimate=prediction["transform"].float(),
            truth=batch["transform"].float(),
            predicted=prediction["inliers"],
            labels=inlier_labels(batch, self.hparams.inlier_threshold),
            information=batch["information"],
        )

    def example_panels(self, batch: dict, prediction: dict) -> list[torch.Tensor]:
        """Per pair: the input, the source moved by the estimate, and by the ground truth."""
        panels = []
        src_end, tgt_end = batch["src_offset"].tolist(), batch["tgt_offset"].tolist()
        for b, (s1, t1) in enumerate(zip(src_end, tgt_end)):
            s0, t0 = (src_end[b - 1], tgt_end[b - 1]) if b else (0, 0)
            source, target = batch["src"][s0:s1], batch["tgt"][t0:t1]
            source = source[:: max(1, len(source) // PANEL_POINTS)]
            target = target[:: max(1, len(target) // PANEL_POINTS)]
            truth = batch["transform"][b]
            panels.append(
                pair_panel(source, target, prediction["transform"][b], truth if torch.isfinite(truth).all() else None,
                           captions=("input", self.method_name, "ground truth"))
            )  # fmt: skip
        return panels

    # -- export: the network; the search stays outside (ONNX has no SVD) --------------------------
    def inference_module(self) -> nn.Module:
        return CorrespondenceScorer(self.network)

    def inference_inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        return (torch.cat(correspondence_points(batch), dim=-1),)

    def _example_correspondences(self, batch: int, count: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(batch, count, 6, generator=generator) * 2.0

    def example_input(self) -> tuple[torch.Tensor, ...]:
        return (self._example_correspondences(2, 97, 0),)

    def check_input(self) -> tuple[torch.Tensor, ...]:
        return (self._example_correspondences(3, 64, 1),)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"corr_pos": {0: "batch", 1: "correspondences"}}

    # -- leaderboard ----------------------------------------------------------------------------
    @property
    def backbone_name(self) -> str:
        return f"variational non-local x{self.hparams.num_layers}"

    def baselines(self) -> dict[str, Callable[[dict], Any]]:
        hp = self.hparams
        tau = hp.inlier_threshold
        ransac = dict(tau=tau, max_iterations=hp.ransac_iterations, confidence=hp.ransac_confidence)
        iterations = f"{hp.ransac_iterations // 1000}k" if hp.ransac_iterations >= 1000 else str(hp.ransac_iterations)
        return {
            f"RANSAC-{iterations} (FPFH)": partial(baselines.ransac_on_features, **ransac),
            f"RANSAC-{iterations} (K correspondences)": partial(baselines.ransac_on_correspondences, **ransac),
            "FGR (FPFH)": partial(baselines.fast_global_registration, tau=tau),
        }
