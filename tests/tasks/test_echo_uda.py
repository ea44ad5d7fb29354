"""GraphEcho's parts against independent references: Sinkhorn, gradient reversal, TCC, SCGM
nodes and memory, the segmentor, the loss and the Dice protocol."""

import math

import pytest
import torch
from torchmetrics.functional.segmentation import dice_score

from tasks.echo_uda import EchoVideoSegmentation
from tasks.echo_uda.graph_matching import (
    FeatureDiscriminator,
    GradientReversal,
    SpatialCrossDomainGraphMatching,
    focal_bce,
    matching_loss,
    sample_nodes,
    sinkhorn,
    spectral_bipartition,
)
from tasks.echo_uda.metrics import PooledDice, VideoDice
from tasks.echo_uda.segmentor import FPNSegmentor
from tasks.echo_uda.task import segmentation_loss
from tasks.echo_uda.temporal_cycle import cycle_back_loss

TINY = dict(fpn_dim=16, semantic_dim=8, backbone_kwargs=dict(widths=(8, 8, 16, 16), stem_width=8), nodes_per_level=16)


# -- Sinkhorn and the matching loss ------------------------------------------------------------


def test_sinkhorn_without_slack_makes_a_square_matrix_doubly_stochastic():
    scores = torch.randn(7, 7, generator=torch.Generator().manual_seed(0)) * 3
    assignment = sinkhorn(scores, iterations=200, slack=False).exp()
    torch.testing.assert_close(assignment.sum(0), torch.ones(7), atol=1e-4, rtol=0)
    torch.testing.assert_close(assignment.sum(1), torch.ones(7), atol=1e-4, rtol=0)


def test_sinkhorn_with_slack_rows_and_columns_sum_to_one_including_the_slack():
    scores = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)) * 2
    padded = sinkhorn(scores, iterations=100, slack=True, keep_slack=True).exp()
    assert padded.shape == (6, 9)
    torch.testing.assert_close(padded[:-1].sum(1), torch.ones(5), atol=1e-3, rtol=0)  # every real row
    torch.testing.assert_close(padded[:, :-1].sum(0), torch.ones(8), atol=1e-3, rtol=0)  # every real column
    real = sinkhorn(scores, iterations=100, slack=True).exp()
    torch.testing.assert_close(real, padded[:-1, :-1])
    assert (real.sum(1) <= 1 + 1e-4).all() and (real.sum(0) <= 1 + 1e-4).all()


def test_sinkhorn_matches_a_naive_probability_space_loop():
    scores = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    p = scores.exp()
    for _ in range(10):
        p = p / p.sum(1, keepdim=True)
        p = p / p.sum(0, keepdim=True)
    torch.testing.assert_close(sinkhorn(scores, iterations=10, slack=False).exp(), p)


def test_focal_bce_matches_its_formula():
    p, t = torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1.0, 0.0, 0.0])
    expected = torch.tensor([-0.25 * 0.1**2 * math.log(0.9), -0.75 * 0.2**2 * math.log(0.8), -0.75 * 0.6**2 * math.log(0.4)])
    torch.testing.assert_close(focal_bce(p, t), expected)


def test_matching_loss_prefers_same_class_assignments():
    same = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    good = torch.tensor([[0.9, 0.05], [0.05, 0.9]])
    bad = torch.tensor([[0.05, 0.9], [0.9, 0.05]])
    assert matching_loss(good, same) < matching_loss(bad, same)


# -- gradient reversal ---------------------------------------------------------------------------


def test_gradient_reversal_is_identity_forward_and_flips_the_gradient_sign():
    x = torch.randn(3, 4, requires_grad=True)
    weights = torch.randn(3, 4)
    y = GradientReversal(0.02)(x)
    torch.testing.assert_close(y, x)
    (y * weights).sum().backward()
    torch.testing.assert_close(x.grad, -0.02 * weights)


def test_feature_discriminator_trains_itself_and_pushes_features_the_other_way():
    torch.manual_seed(0)
    discriminator = FeatureDiscriminator(16, reversal_strength=1.0, layers=1)
    source, target = torch.randn(2, 16, 4, 4, requires_grad=True), torch.randn(2, 16, 4, 4, requires_grad=True)
    loss = discriminator(source, target)
    loss.backward()
    # the discriminator's own weights descend the loss; the features receive the reversed gradient
    reference_source = source.detach().clone().requires_grad_()
    plain = discriminator.tower(reference_source)
    torch.nn.functional.binary_cross_entropy_with_logits(plain, torch.ones_like(plain)).backward()
    torch.testing.assert_close(source.grad, -reference_source.grad)


# -- TCC -----------------------------------------------------------------------------------------


def _phase_embeddings(period: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Distinct unit vectors, one per cardiac phase."""
    return torch.nn.functional.normalize(torch.randn(period, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_cycle_back_loss_is_low_for_a_cyclic_clip_and_high_for_shuffled_frames():
    phases = _phase_embeddings(8)
    cyclic = torch.cat([phases, phases])[None]  # two identical heartbeats
    shuffled = cyclic[:, torch.randperm(16, generator=torch.Generator().manual_seed(3))]
    low, high = cycle_back_loss(cyclic), cycle_back_loss(shuffled)
    assert low < 0.1
    assert high > 1.0 and high > 10 * low


def test_cycle_back_loss_of_collapsed_embeddings_is_chance():
    collapsed = torch.nn.functional.normalize(torch.ones(1, 12, 8), dim=-1)
    torch.testing.assert_close(cycle_back_loss(collapsed), torch.tensor(math.log(6.0)))


def test_cycle_back_loss_training_aligns_two_heartbeats():
    torch.manual_seed(0)
    embeddings = torch.randn(1, 16, 8, requires_grad=True)
    optimiser = torch.optim.Adam([embeddings], lr=0.05)
    first = cycle_back_loss(torch.nn.functional.normalize(embeddings, dim=-1)).item()
    for _ in range(100):
        loss = cycle_back_loss(torch.nn.functional.normalize(embeddings, dim=-1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.2 * first


# -- SCGM ----------------------------------------------------------------------------------------


def test_sample_nodes_takes_features_where_the_mask_names_a_structure():
    features = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4, :4] = 2  # top-left quarter -> level cells (0..1, 0..1)
    labels[0, 4:, 4:] = -1  # ignored
    nodes, node_labels = sample_nodes([features], labels, nodes_per_level=100, bg_ratio=8)
    positives = nodes[node_labels == 2]
    assert len(positives) == 4 and (node_labels == 0).sum() == 1 and (node_labels >= 0).all()
    expected = features[0].permute(1, 2, 0)[:2, :2].reshape(-1, 2)
    torch.testing.assert_close(positives, expected)


def test_sample_nodes_caps_structure_nodes_per_level():
    labels = torch.ones(2, 16, 16, dtype=torch.long)
    labels[:, :2] = 0
    nodes, node_labels = sample_nodes([torch.randn(2, 4, 16, 16)], labels, nodes_per_level=10, bg_ratio=5)
    assert (node_labels > 0).sum() == 10 and (node_labels == 0).sum() == 2


def test_spectral_bipartition_separates_two_clouds():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(15, 4, generator=generator) * 0.1
    b = torch.randn(15, 4, generator=generator) * 0.1 + 3
    side = spectral_bipartition(torch.cat([a, b]), neighbours=7)
    assert side[:15].all() and not side[15:].any()


def test_missing_class_is_completed_from_the_memory_seed():
    torch.manual_seed(0)
    scgm = SpatialCrossDomainGraphMatching(8, num_classes=3)
    source, target = torch.randn(6, 8), torch.randn(4, 8)
    source_y, target_y = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 1])
    (s, sy), (t, ty) = scgm.complete_classes(source, source_y, target, target_y)
    assert sy.tolist() == [0, 0, 1, 1, 2, 2] and ty.tolist() == [0, 0, 1, 1, 2, 2]
    hallucinated = t[ty == 2]
    expected_mean = scgm.seed_projection(scgm.target_seeds[2][None])
    assert torch.allclose(hallucinated, expected_mean.expand_as(hallucinated), atol=0.05)


def test_memory_seed_moves_towards_its_class_nodes():
    torch.manual_seed(0)
    scgm = SpatialCrossDomainGraphMatching(8, num_classes=2, cluster_min_nodes=20)
    nodes = torch.randn(30, 8) * 0.05 + 1.0
    before = torch.dist(scgm.source_seeds[1], nodes.mean(0))
    for _ in range(5):
        scgm.update_seeds(nodes, torch.ones(30, dtype=torch.long), nodes[:0], torch.zeros(0, dtype=torch.long))
    assert torch.dist(scgm.source_seeds[1], nodes.mean(0)) < 0.5 * before


def test_scgm_gives_every_loss_and_gradients_to_both_domains():
    torch.manual_seed(0)
    scgm = SpatialCrossDomainGraphMatching(8, num_classes=3, nodes_per_level=8)
    pyramid_s = [torch.randn(2, 8, s, s, requires_grad=True) for s in (8, 4)]
    pyramid_t = [torch.randn(2, 8, s, s, requires_grad=True) for s in (8, 4)]
    labels_s = torch.randint(0, 3, (2, 16, 16))
    labels_t = torch.randint(-1, 2, (2, 16, 16))  # class 2 missing on the target: completed
    losses = scgm(pyramid_s, labels_s, pyramid_t, labels_t)
    assert set(losses) == {"node_adversarial", "node", "matching", "quadratic"}
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pyramid_s + pyramid_t)


def test_scgm_without_confident_target_nodes_matches_source_halves():
    scgm = SpatialCrossDomainGraphMatching(8, num_classes=3, nodes_per_level=8)
    pyramid = [torch.randn(1, 8, 8, 8)]
    losses = scgm(pyramid, torch.randint(0, 3, (1, 8, 8)), pyramid, torch.full((1, 8, 8), -1))
    assert set(losses) == {"node", "matching", "quadratic"}


# -- segmentor, loss, metrics --------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (45, 71)])
def test_segmentor_gives_logits_at_input_size_and_a_four_level_pyramid(size):
    net = FPNSegmentor(5, fpn_dim=16, semantic_dim=8, backbone_kwargs=dict(widths=(8, 8, 16, 16)))
    logits, pyramid = net(torch.rand(2, 1, *size))
    assert logits.shape == (2, 5, *size)
    assert [p.shape[1] for p in pyramid] == [16] * 4 and net.strides == [4, 8, 16, 32]
    assert pyramid[0].shape[-1] > pyramid[-1].shape[-1]


def test_segmentor_takes_any_timm_backbone():
    net = FPNSegmentor(3, backbone="resnet18", fpn_dim=16, semantic_dim=8)
    logits, pyramid = net(torch.rand(1, 1, 64, 64))
    assert logits.shape == (1, 3, 64, 64) and net.channels == [64, 128, 256, 512]


def test_segmentation_loss_is_small_for_confident_correct_logits():
    masks = torch.randint(0, 3, (2, 8, 8))
    correct = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float() * 20 - 10
    assert segmentation_loss(correct, masks) < 0.01 < segmentation_loss(-correct, masks)


def test_pooled_and_video_dice_against_torchmetrics_and_by_hand():
    generator = torch.Generator().manual_seed(0)
    videos = [(torch.randint(0, 3, (4, 8, 8), generator=generator), torch.randint(0, 3, (4, 8, 8), generator=generator)) for _ in range(3)]
    pooled, per_video, lv = PooledDice(3), VideoDice(3), PooledDice(3, structure=1)
    for prediction, target in videos:
        pooled.update(prediction, target)
        per_video.update(prediction, target)
        lv.update(prediction, target)
    all_p = torch.cat([p for p, _ in videos]).flatten()[None]
    all_t = torch.cat([t for _, t in videos]).flatten()[None]
    reference = dice_score(all_p, all_t, num_classes=3, include_background=False, average="none", input_format="index")[0]
    torch.testing.assert_close(pooled.compute(), reference.mean())
    torch.testing.assert_close(lv.compute(), reference[0])
    per = [dice_score(p.flatten()[None], t.flatten()[None], 3, include_background=False, average="macro", input_format="index") for p, t in videos]
    torch.testing.assert_close(per_video.compute(), torch.cat(per).mean())


def test_dice_by_hand_on_a_tiny_case_and_absent_structures_are_skipped():
    prediction = torch.tensor([[[1, 1, 0, 0]]])
    target = torch.tensor([[[1, 0, 0, 0]]])
    metric = PooledDice(3)  # structure 2 occurs nowhere: left out of the mean
    metric.update(prediction, target)
    torch.testing.assert_close(metric.compute(), torch.tensor(2 * 1 / (2 * 1 + 1 + 0)))


# -- the task --------------------------------------------------------------------------------------


def _batch(clips=2, frames=8, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(clips, frames, size, size, dtype=torch.long)
    masks[..., 8:20, 6:14] = 1
    masks[..., 8:20, 18:26] = 2
    video = (masks > 0).float()[:, :, None] * -0.6 + 0.7 + 0.05 * torch.randn(clips, frames, 1, size, size, generator=generator)
    labelled = torch.ones(clips, frames, dtype=torch.bool)
    labelled[:, 1::2] = False
    return {"video": video, "mask": masks, "labelled": labelled}


@pytest.mark.parametrize("adaptation", ["none", "scgm", "tcc", "full"])
def test_training_step_trains_every_variant(adaptation):
    torch.manual_seed(0)
    task = EchoVideoSegmentation(structures=("LV", "RV"), adaptation=adaptation, graph_frames=4, **TINY)
    task.log = task.log_dict = lambda *args, **kwargs: None
    batch = {"source": _batch(), "target": _batch(seed=1)}
    optimiser = torch.optim.Adam(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = task.training_step(batch, 0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    if adaptation != "none":  # every parameter receives a gradient (DDP without unused-parameter search)
        assert all(p.grad is not None for p in task.parameters())


def test_predict_batch_segments_every_frame_and_metrics_use_annotated_frames_only():
    task = EchoVideoSegmentation(structures=("LV", "RV"), adaptation="none", frames_per_forward=3, **TINY).eval()
    batch = _batch(clips=1, frames=7)
    prediction = task.predict_batch(batch)
    assert prediction.shape == (1, 7, 32, 32) and prediction.dtype == torch.long
    metrics = task.configure_metrics()
    task.update_metrics(metrics, batch["mask"], batch)  # the ground truth as prediction: perfect
    values = metrics.compute()
    assert set(values) == {"dice", "video_dice", "dice_lv", "dice_rv"}
    assert all(abs(v.item() - 1.0) < 1e-6 for v in values.values())
    panels = task.example_panels(batch, prediction)
    assert len(panels) == 1 and panels[0].shape[0] == 3 and 0 <= panels[0].min() and panels[0].max() <= 1


def test_unknown_adaptation_is_refused():
    with pytest.raises(ValueError, match="adaptation"):
        EchoVideoSegmentation(adaptation="everything")


def test_example_panels_show_masks_before_and_after_adaptation(tmp_path):
    torch.manual_seed(0)
    before = EchoVideoSegmentation(structures=("LV", "RV"), adaptation="none", **TINY).eval()
    path = tmp_path / "source_only.ckpt"
    torch.save({"hyper_parameters": dict(before.hparams), "state_dict": before.state_dict()}, path)
    batch = _batch(clips=1, frames=4)  # annotated frames 0 and 2
    after = EchoVideoSegmentation(structures=("LV", "RV"), before_adaptation=str(path), **TINY).eval()
    prediction = after.predict_batch(batch)
    (panel,) = after.example_panels(batch, prediction)
    plain = EchoVideoSegmentation(structures=("LV", "RV"), **TINY).example_panels(batch, prediction)[0]
    tile = (panel.shape[1] - 2) // 3 - 2  # rows: ground truth, before, after; 2-pixel padding
    assert panel.shape[1] == 3 * tile + 8 and plain.shape[1] == 2 * tile + 6
    assert panel.shape[2] == 3 * (tile + 2) + 2  # a caption column and the two annotated frames
    # the middle row is the source-only model's masks, the others as without it (captions aside)
    expected_before = EchoVideoSegmentation(structures=("LV", "RV"), **TINY).example_panels(batch, before.predict_batch(batch))[0]
    frames = slice(tile + 4, None)
    torch.testing.assert_close(panel[:, tile + 4 : 2 * tile + 4, frames], expected_before[:, tile + 4 : 2 * tile + 4, frames])
    torch.testing.assert_close(panel[:, 2 * tile + 6 :, frames], plain[:, tile + 4 :, frames])
    torch.testing.assert_close(panel[:, : tile + 4], plain[:, : tile + 4])  # the ground-truth row
    assert not torch.equal(panel[:, 2 * tile + 6 :, : tile + 4], plain[:, tile + 4 :, : tile + 4])  # "after" vs "prediction"
    assert "before_adaptation" not in "".join(after.state_dict())  # the reference is not saved


def test_a_missing_before_adaptation_checkpoint_is_reported_and_a_mismatched_one_refused(tmp_path):
    from data.errors import LayoutError

    batch = _batch(clips=1, frames=2)
    task = EchoVideoSegmentation(structures=("LV", "RV"), before_adaptation=str(tmp_path / "none.ckpt"), **TINY).eval()
    with pytest.warns(UserWarning, match=r"none.ckpt: no such checkpoint"):
        (panel,) = task.example_panels(batch, task.predict_batch(batch))
    other = EchoVideoSegmentation(structures=("LV",), adaptation="none", **TINY)
    torch.save({"hyper_parameters": dict(other.hparams), "state_dict": other.state_dict()}, tmp_path / "lv.ckpt")
    task = EchoVideoSegmentation(structures=("LV", "RV"), before_adaptation=str(tmp_path / "lv.ckpt"), **TINY).eval()
    with pytest.raises(LayoutError, match=r"lv.ckpt: segments \['LV'\], not \['LV', 'RV'\]"):
        task.example_panels(batch, task.predict_batch(batch))
