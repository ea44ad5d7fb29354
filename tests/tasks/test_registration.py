"""VBReg's pieces against independent references: Kabsch, the KL term, the metrics, the voting search."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from tasks.registration import PointCloudRegistration, spectral_matching_loss
from tasks.registration_parts.inlier_search import VotingInlierSearch, nms_seeds, wilson_lower_bound
from tasks.registration_parts.metrics import (
    InlierScore,
    RegistrationRecall,
    RMSERecall,
    SuccessfulRotationError,
    SuccessfulTranslationError,
    information_rmse_squared,
    rotation_to_quaternion,
)
from tasks.registration_parts.rendering import SOURCE_COLOUR, TARGET_COLOUR, pair_panel
from tasks.registration_parts.rigid import apply_transform, rotation_error_degrees, translation_error, weighted_kabsch
from tasks.registration_parts.variational_nonlocal import (
    Gaussian,
    VariationalNonLocalNet,
    balanced_kl,
    feature_compatibility,
    gaussian_kl,
    spatial_compatibility,
)


def rigid(rotation: np.ndarray, translation) -> torch.Tensor:
    transform = torch.eye(4, dtype=torch.float64)
    transform[:3, :3] = torch.from_numpy(rotation)
    transform[:3, 3] = torch.tensor(translation, dtype=torch.float64)
    return transform


def random_rigid(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return rigid(Rotation.random(random_state=seed).as_matrix(), rng.uniform(-1, 1, 3))


# -- weighted Kabsch ---------------------------------------------------------------------------


def test_weighted_kabsch_recovers_a_known_transform_exactly():
    truth = random_rigid(0)
    source = torch.rand(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    weights = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    estimate = weighted_kabsch(source, apply_transform(truth, source), weights)
    assert torch.allclose(estimate, truth, atol=1e-10)


def test_weighted_kabsch_is_invariant_to_the_scale_of_the_weights():
    generator = torch.Generator().manual_seed(2)
    source = torch.rand(30, 3, generator=generator)
    target = apply_transform(random_rigid(1).float(), source) + 0.05 * torch.randn(30, 3, generator=generator)
    weights = torch.rand(30, generator=generator)
    small = weighted_kabsch(source, target, weights)
    large = weighted_kabsch(source, target, weights * 1000.0)
    assert torch.allclose(small, large, atol=1e-5)


def test_weighted_kabsch_ignores_zero_weight_outliers_and_returns_a_rotation():
    truth = random_rigid(3)
    generator = torch.Generator().manual_seed(3)
    source = torch.rand(40, 3, dtype=torch.float64, generator=generator)
    target = apply_transform(truth, source)
    target[:15] = torch.rand(15, 3, dtype=torch.float64, generator=generator) * 5  # outliers
    weights = torch.ones(40, dtype=torch.float64)
    weights[:15] = 0
    estimate = weighted_kabsch(source, target, weights)
    assert torch.allclose(estimate, truth, atol=1e-10)
    # batched, with an (unweighted) noisy fit: still a proper rotation (det +1)
    batch = weighted_kabsch(source.expand(4, 40, 3), target.expand(4, 40, 3))
    assert torch.allclose(torch.det(batch[:, :3, :3]), torch.ones(4, dtype=torch.float64))


# -- the network and its loss ------------------------------------------------------------------


def test_kl_term_is_zero_when_prior_equals_posterior_and_matches_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    mean, std = torch.randn(2, 7, 5, generator=generator), torch.rand(2, 7, 5, generator=generator) + 0.1
    same = Gaussian((mean, std))
    assert balanced_kl(same, Gaussian((mean.clone(), std.clone()))).item() == pytest.approx(0.0, abs=1e-7)
    other = Gaussian((mean + 0.5, std * 1.5))
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(other.mean, other.std))
    assert torch.allclose(gaussian_kl(same, other), reference, atol=1e-6)
    # both balanced terms have the same value; only their gradients differ
    assert balanced_kl(same, other, 0.8).item() == pytest.approx(reference.sum(-1).mean().item(), rel=1e-5)


def test_kl_balance_sends_most_of_the_gradient_to_the_prior():
    prior_mean = torch.zeros(1, 3, 4, requires_grad=True)
    posterior_mean = torch.ones(1, 3, 4, requires_grad=True)
    std = torch.ones(1, 3, 4)
    balanced_kl(Gaussian((posterior_mean, std)), Gaussian((prior_mean, std)), balance=0.8).backward()
    assert prior_mean.grad.abs().sum() == pytest.approx(4 * posterior_mean.grad.abs().sum().item(), rel=1e-5)


def test_spatial_compatibility_matches_its_definition():
    generator = torch.Generator().manual_seed(0)
    source, target = torch.rand(1, 6, 3, generator=generator), torch.rand(1, 6, 3, generator=generator)
    beta = spatial_compatibility(source, target, 0.5)[0]
    for i in range(6):
        for j in range(6):
            change = (source[0, i] - source[0, j]).norm() - (target[0, i] - target[0, j]).norm()
            assert beta[i, j].item() == pytest.approx(max(0.0, 1 - change.item() ** 2 / 0.25), abs=1e-5)


def test_feature_compatibility_and_spectral_matching_loss_by_hand():
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    gamma = feature_compatibility(features, 1.0)
    assert torch.equal(gamma, torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]))
    labels = torch.tensor([[True, True, False]])
    assert spectral_matching_loss(gamma, labels).item() == pytest.approx(0.0)
    assert spectral_matching_loss(torch.zeros_like(gamma), labels).item() == pytest.approx(2 / 9)


def test_network_posterior_pass_sees_the_labels_and_evaluation_is_deterministic():
    torch.manual_seed(0)
    net = VariationalNonLocalNet(num_layers=2, channels=16, belief_size=16, hidden_size=16, state_size=8, label_size=4)
    corr = torch.rand(2, 20, 6)
    labels = torch.rand(2, 20) > 0.5
    out = net(corr, labels)
    assert out["logits"].shape == (2, 20) and len(out["layer_features"]) == 2
    assert len(out["priors"]) == 2 * 3 and all(p is not None for p in out["posteriors"])
    prior_only = net(corr)
    assert all(p is None for p in prior_only["posteriors"])
    net.eval()
    first, second = net(corr)["logits"], net(corr)["logits"]
    assert torch.equal(first, second)  # prior means, no sampling


def test_training_loss_falls_on_a_synthetic_pair():
    torch.manual_seed(0)
    batch = synthetic_batch(count=64, inlier_fraction=0.3, seed=5)
    task = PointCloudRegistration(num_layers=2, channels=16, belief_size=16, hidden_size=16, state_size=8, label_size=4, lr=3e-3)
    task.log = task.log_dict = lambda *args, **kwargs: None
    optimiser = torch.optim.Adam(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = task.training_step(batch, 0)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


# -- the voting-based inlier search ------------------------------------------------------------


def synthetic_batch(count: int, inlier_fraction: float, seed: int) -> dict:
    """One pair of K correspondences, a share of them consistent with a random rigid motion."""
    generator = torch.Generator().manual_seed(seed)
    truth = random_rigid(seed).float()
    source = torch.rand(count, 3, generator=generator) * 3
    target = apply_transform(truth, source) + 0.005 * torch.randn(count, 3, generator=generator)
    outliers = torch.randperm(count, generator=generator)[: round(count * (1 - inlier_fraction))]
    target[outliers] = torch.rand(len(outliers), 3, generator=generator) * 3 + truth[:3, 3]
    index = torch.arange(count)
    return {
        "correspondences": torch.stack([index, index], dim=1)[None],
        "src": source,
        "tgt": target,
        "src_offset": torch.tensor([count]),
        "tgt_offset": torch.tensor([count]),
        "transform": truth[None],
        "information": torch.zeros(1, 6, 6),
    }


def test_voting_search_recovers_the_transform_with_95_percent_outliers():
    batch = synthetic_batch(count=600, inlier_fraction=0.05, seed=7)
    torch.manual_seed(0)
    task = PointCloudRegistration(num_layers=2, channels=16, belief_size=16, hidden_size=16, state_size=8, label_size=4, min_seeds=200).eval()
    with torch.no_grad():
        prediction = task.predict_batch(batch)
    assert rotation_error_degrees(prediction["transform"], batch["transform"]).item() < 1.0
    assert translation_error(prediction["transform"], batch["transform"]).item() < 0.02
    truth_inliers = (apply_transform(batch["transform"][0], batch["src"]) - batch["tgt"]).norm(dim=-1) < 0.1
    assert torch.equal(prediction["inliers"][0], truth_inliers)


def test_wilson_lower_bound_by_hand():
    z = 1.96
    assert wilson_lower_bound(torch.tensor(1.0), 1).item() == pytest.approx(1 / (1 + z * z), rel=1e-6)
    assert wilson_lower_bound(torch.tensor(0.0), 5).item() == pytest.approx(0.0, abs=1e-7)
    # more evidence for the same share gives a higher bound
    assert wilson_lower_bound(torch.tensor(20.0), 24) > wilson_lower_bound(torch.tensor(5.0), 6)


def test_nms_keeps_local_maxima_first():
    source = torch.tensor([[0.0, 0, 0], [0.05, 0, 0], [1.0, 0, 0], [1.05, 0, 0]])
    scores = torch.tensor([0.9, 0.8, 0.3, 0.5])
    assert nms_seeds(scores, source, radius=0.1, count=4).tolist() == [0, 3, 1, 2]


# -- metrics -----------------------------------------------------------------------------------


def rotation_about_z(degrees: float, translation=(0.0, 0.0, 0.0)) -> torch.Tensor:
    return rigid(Rotation.from_euler("z", degrees, degrees=True).as_matrix(), translation).float()


def test_registration_recall_and_errors_on_hand_made_pairs():
    truth = torch.eye(4).expand(3, 4, 4)
    estimate = torch.stack([rotation_about_z(10, (0.2, 0, 0)), rotation_about_z(4, (0, 0.1, 0)), rotation_about_z(20)])
    recall, rre, rte = RegistrationRecall(), SuccessfulRotationError(), SuccessfulTranslationError()
    for metric in (recall, rre, rte):
        metric.update(estimate, truth)
    assert recall.compute().item() == pytest.approx(200 / 3, rel=1e-6)  # the 20-degree pair fails
    assert rre.compute().item() == pytest.approx(7.0, rel=1e-5)  # successful pairs only
    assert rte.compute().item() == pytest.approx(15.0, rel=1e-5)  # centimetres
    kitti = RegistrationRecall(max_rotation_error=5.0, max_translation_error=0.6)
    kitti.update(estimate, truth)
    assert kitti.compute().item() == pytest.approx(100 / 3, rel=1e-6)


def test_inlier_precision_recall_f1_are_averaged_over_pairs():
    predicted = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    labels = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    scores = {which: InlierScore(which) for which in ("precision", "recall", "f1")}
    for metric in scores.values():
        metric.update(predicted, labels)
    assert scores["precision"].compute().item() == pytest.approx(75.0)
    assert scores["recall"].compute().item() == pytest.approx(75.0)
    assert scores["f1"].compute().item() == pytest.approx(75.0)


def test_rotation_to_quaternion_matches_scipy():
    rotations = Rotation.random(20, random_state=0)
    ours = rotation_to_quaternion(torch.from_numpy(rotations.as_matrix()))
    xyzw = rotations.as_quat()
    reference = torch.from_numpy(np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1))
    reference = torch.where(reference[:, :1] < 0, -reference, reference)
    assert torch.allclose(ours, reference, atol=1e-10)


def test_rmse_protocol_approximates_the_rmse_of_the_overlapping_points():
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(200, 3, dtype=torch.float64, generator=generator)  # overlap, in the target's frame
    ones, zeros = torch.ones(200, dtype=torch.float64), torch.zeros(200, dtype=torch.float64)
    x, y, z = points.T
    a = torch.stack(
        [torch.stack([ones, zeros, zeros, zeros, 2 * z, -2 * y], -1),
         torch.stack([zeros, ones, zeros, -2 * z, zeros, 2 * x], -1),
         torch.stack([zeros, zeros, ones, 2 * y, -2 * x, zeros], -1)], 1)  # fmt: skip
    information = torch.einsum("mki,mkj->ij", a, a)
    truth = random_rigid(4)
    error = rotation_about_z(1.0, (0.01, -0.02, 0.015)).double()  # small residual motion
    estimate = torch.linalg.inv(error) @ truth  # so that truth @ estimate^-1 = error
    rmse2 = information_rmse_squared(estimate[None], truth[None], information[None])
    direct = (apply_transform(error, points) - points).square().sum(-1).mean()
    assert rmse2.item() == pytest.approx(direct.item(), rel=1e-2)  # first-order in the rotation
    metric = RMSERecall()
    metric.update(torch.stack([estimate, truth]).float(), torch.stack([truth, truth]).float(), torch.stack([information, torch.zeros(6, 6, dtype=torch.float64)]).float())
    assert metric.compute().item() == pytest.approx(100.0)  # only the pair with information counts
    empty = RMSERecall()
    empty.update(truth[None].float(), truth[None].float(), torch.zeros(1, 6, 6))
    assert math.isnan(empty.compute().item())


# -- pictures ----------------------------------------------------------------------------------


def test_pair_panel_draws_both_clouds_in_their_colours():
    batch = synthetic_batch(count=300, inlier_fraction=1.0, seed=1)
    panel = pair_panel(batch["src"], batch["tgt"], batch["transform"][0], batch["transform"][0], size=64)
    assert panel.shape == (3, 64, 3 * 64 + 8) and 0 <= panel.min() and panel.max() <= 1
    pixels = panel.permute(1, 2, 0).reshape(-1, 3)
    for colour in (SOURCE_COLOUR, TARGET_COLOUR):
        direction = torch.tensor(colour) / torch.tensor(colour).norm()
        alignment = (pixels / pixels.norm(dim=1, keepdim=True)) @ direction
        assert (alignment > 0.999).sum() > 50  # many pixels of each hue (shaded by depth)


def test_open3d_baselines_recover_a_pair_with_matching_features():
    from tasks.registration_parts import baselines

    batch = synthetic_batch(count=300, inlier_fraction=0.5, seed=1)
    batch["src_features"] = torch.rand(300, 33, generator=torch.Generator().manual_seed(0))
    batch["tgt_features"] = batch["src_features"].clone()  # feature matching finds the K correspondences
    for method in (baselines.ransac_on_features, baselines.ransac_on_correspondences):
        prediction = method(batch, tau=0.1, max_iterations=5000, confidence=0.999)
        assert rotation_error_degrees(prediction["transform"], batch["transform"]).item() < 2.0
        assert prediction["inliers"].shape == (1, 300)
    prediction = baselines.fast_global_registration(batch, tau=0.1)
    assert rotation_error_degrees(prediction["transform"], batch["transform"]).item() < 2.0


def test_bf16_autocast_trains_scores_and_draws_in_float32_where_it_matters():
    """What a ``--trainer.precision bf16-mixed`` step runs: the loss, the search, the metrics, the picture."""
    batch = synthetic_batch(count=200, inlier_fraction=0.5, seed=3)
    torch.manual_seed(0)
    task = PointCloudRegistration(num_layers=2, channels=16, belief_size=16, hidden_size=16, state_size=8, label_size=4, min_seeds=50)
    task.log = task.log_dict = lambda *args, **kwargs: None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.training_step(batch, 0)
        loss.backward()
        task.eval()
        with torch.no_grad():
            prediction = task.predict_batch(batch)
            metrics = task.configure_metrics()
            task.update_metrics(metrics, prediction, batch)
            (panel,) = task.example_panels(batch, prediction)
    assert torch.isfinite(loss) and prediction["transform"].dtype == torch.float32
    assert metrics.compute()["rr"] == 100.0  # (percent) half the correspondences are inliers: found despite bf16 features
    assert panel.dtype == torch.float32 and panel.shape[0] == 3
