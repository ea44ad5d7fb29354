"""Classical registration on the same pairs and the same FPFH features, for the leaderboard.

* ``ransac_on_features``: open3d's ``registration_ransac_based_on_feature_matching`` — the
  "RANSAC" row of the FPFH tables. Settings: 3 points per sample, nearest-neighbour matching of
  the raw FPFH features (no mutual filter), edge-length (0.9) and distance checkers, inlier
  distance = the task's ``inlier_threshold`` (0.10 m on 3DMatch, PointDSC's baseline setting),
  up to ``max_iterations`` = 100 000 samples with early stop at confidence 0.999.
* ``ransac_on_correspondences``: ``registration_ransac_based_on_correspondence`` on exactly the
  K correspondences VBReg sees, same criteria (PointDSC's baseline script runs RANSAC this way).
* ``fast_global_registration``: open3d's FGR on the same features (``maximum_correspondence_distance``
  = ``inlier_threshold``, 64 iterations, 1000 tuples).

RANSAC draws its samples from open3d's global generator; ``seed`` (0 by default) reseeds it before
every pair, so a leaderboard row can be reproduced (with several threads open3d's parallel
sampling may still differ slightly between runs). Its recall moves by a few points from one seed
to another on a few dozen pairs; the benchmark reports several seeds.

Each returns what the task's ``predict_batch`` returns, so the same metrics score them: the
transform per pair and the inlier mask of the pair's K correspondences under it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import open3d as o3d
import torch

from tasks.registration_parts.rigid import apply_transform

registration = o3d.pipelines.registration


def _cloud(points: torch.Tensor) -> o3d.geometry.PointCloud:
    return o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.detach().double().cpu().numpy()))


def _feature(features: torch.Tensor) -> registration.Feature:
    feature = registration.Feature()
    feature.data = features.detach().double().cpu().numpy().T.copy()
    return feature


def split_pairs(batch: dict):
    """Per pair of a batch: (source keypoints, target keypoints, source features, target features, correspondences)."""
    src_end, tgt_end = batch["src_offset"].tolist(), batch["tgt_offset"].tolist()
    src_start, tgt_start = [0] + src_end[:-1], [0] + tgt_end[:-1]
    for b in range(len(src_end)):
        local = batch["correspondences"][b] - torch.tensor([src_start[b], tgt_start[b]], device=batch["correspondences"].device)
        yield (
            batch["src"][src_start[b] : src_end[b]],
            batch["tgt"][tgt_start[b] : tgt_end[b]],
            batch["src_features"][src_start[b] : src_end[b]],
            batch["tgt_features"][tgt_start[b] : tgt_end[b]],
            local,
        )


def _prediction(batch: dict, transforms: list[np.ndarray], tau: float) -> dict:
    device = batch["src"].device
    transform = torch.from_numpy(np.stack(transforms)).float().to(device)
    src = batch["src"][batch["correspondences"][..., 0]]
    tgt = batch["tgt"][batch["correspondences"][..., 1]]
    inliers = (apply_transform(transform, src.float()) - tgt.float()).norm(dim=-1) < tau
    return {"transform": transform, "inliers": inliers}


def _ransac_arguments(tau: float, max_iterations: int, confidence: float) -> tuple:
    """Estimation, sample size, checkers and criteria shared by both RANSAC variants."""
    checkers = [registration.CorrespondenceCheckerBasedOnEdgeLength(0.9), registration.CorrespondenceCheckerBasedOnDistance(tau)]
    return (
        registration.TransformationEstimationPointToPoint(False),
        3,
        checkers,
        registration.RANSACConvergenceCriteria(max_iterations, confidence),
    )


def _reseed(seed: Optional[int]) -> None:
    if seed is not None:
        o3d.utility.random.seed(seed)


def ransac_on_features(
    batch: dict, tau: float, max_iterations: int = 100_000, confidence: float = 0.999, seed: Optional[int] = 0
) -> dict:
    transforms = []
    for src, tgt, src_feat, tgt_feat, _ in split_pairs(batch):
        _reseed(seed)
        result = registration.registration_ransac_based_on_feature_matching(
            _cloud(src), _cloud(tgt), _feature(src_feat), _feature(tgt_feat), False, tau,
            *_ransac_arguments(tau, max_iterations, confidence),
        )  # fmt: skip
        transforms.append(np.asarray(result.transformation))
    return _prediction(batch, transforms, tau)


def ransac_on_correspondences(
    batch: dict, tau: float, max_iterations: int = 100_000, confidence: float = 0.999, seed: Optional[int] = 0
) -> dict:
    transforms = []
    for src, tgt, _, _, corr in split_pairs(batch):
        _reseed(seed)
        result = registration.registration_ransac_based_on_correspondence(
            _cloud(src), _cloud(tgt), o3d.utility.Vector2iVector(corr.cpu().numpy().astype(np.int32)), tau,
            *_ransac_arguments(tau, max_iterations, confidence),
        )  # fmt: skip
        transforms.append(np.asarray(result.transformation))
    return _prediction(batch, transforms, tau)


def fast_global_registration(batch: dict, tau: float) -> dict:
    transforms = []
    option = registration.FastGlobalRegistrationOption(maximum_correspondence_distance=tau)
    for src, tgt, src_feat, tgt_feat, _ in split_pairs(batch):
        result = registration.registration_fgr_based_on_feature_matching(
            _cloud(src), _cloud(tgt), _feature(src_feat), _feature(tgt_feat), option
        )
        transforms.append(np.asarray(result.transformation))
    return _prediction(batch, transforms, tau)
