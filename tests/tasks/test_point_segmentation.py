"""The point-segmentation task: metrics by hand, voting coverage, learning-rate groups, pictures, a loss that falls."""

from types import SimpleNamespace

import numpy as np
import torch

from tasks.point_segmentation import PointSegmentation

TINY = dict(
    voxel_size=0.15, base_channels=8, channels=[24, 48], depths=[2, 1], decoder_channels=[24, 16], head_dim=8,
    window_size=4, quant_size=1.0, drop_path_rate=0.0, mlp_ratio=2.0,
)  # fmt: skip


def tiny_task(**kwargs) -> PointSegmentation:
    torch.manual_seed(0)
    return PointSegmentation(**{**TINY, **kwargs})


def room_batch(seed: int = 1, rays: int = 2500) -> dict:
    """One generated room, scanned once, as a batch."""
    from data.builtin_rooms import S3DIS_CLASSES, generate_room, scan_room

    room = generate_room(np.random.default_rng([seed, 7]))
    coord, colour, part = scan_room(room, rays, scans=1)
    labels = torch.tensor([S3DIS_CLASSES.index(room.parts[p].label) for p in part])
    coord = torch.from_numpy(coord)
    return {
        "coord": coord - coord.min(0).values,
        "feat": torch.from_numpy(colour).float() / 255,
        "offset": torch.tensor([len(coord)]),
        "segment": labels,
        "name": ["room"],
    }


def test_metrics_match_a_hand_computed_confusion_matrix():
    task = tiny_task(num_classes=3, class_names=["floor", "wall", "chair"])
    metrics = task.configure_metrics().clone(prefix="test_")
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, -1, -1])
    predicted = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 2, 0])
    metrics.update(torch.nn.functional.one_hot(predicted, 3).float(), target)
    values = {k: float(v) for k, v in metrics.compute().items()}
    # confusion over the 8 labelled points: floor 2/3 right, wall 2/2, chair 2/3
    iou = [2 / 4, 2 / 3, 2 / 3]  # floor: tp 2, fp 1 (a chair), fn 1; wall: tp 2, fp 1; chair: tp 2, fn 1
    assert abs(values["test_iou_floor"] - iou[0]) < 1e-6 and abs(values["test_iou_wall"] - iou[1]) < 1e-6
    assert abs(values["test_iou_chair"] - iou[2]) < 1e-6
    assert abs(values["test_miou"] - sum(iou) / 3) < 1e-6
    assert abs(values["test_macc"] - (2 / 3 + 1 + 2 / 3) / 3) < 1e-6
    assert abs(values["test_allacc"] - 6 / 8) < 1e-6


def test_voting_with_zero_votes_scores_every_point_of_every_voxel():
    task = tiny_task(test_votes=0, test_rotations=[0.0, 0.5]).eval()
    batch = room_batch()
    seen = []
    forward = task.segmenter.forward

    def recording(coord, feat, offset):
        seen.append(coord.clone())
        return forward(coord, feat, offset)

    task.segmenter.forward = recording
    probabilities = task.predict_batch(batch)
    assert probabilities.shape == (len(batch["coord"]), 13)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(len(batch["coord"])))
    # passes = rotations x the fullest voxel's point count; the unrotated passes see every point
    unrotated = torch.cat(seen[: len(seen) // 2])
    assert len(seen) % 2 == 0 and len(seen) > 2
    assert len(torch.unique(unrotated, dim=0)) == len(torch.unique(batch["coord"], dim=0))


def test_attention_blocks_train_at_a_tenth_of_the_learning_rate():
    task = tiny_task(lr=0.01, block_lr_scale=0.1, lr_milestones=[0.5])
    task._trainer = SimpleNamespace(estimated_stepping_batches=10)
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    block = {id(p) for p in task.segmenter.backbone.stages.parameters()}
    for group in optimizer.param_groups:
        in_blocks = {id(p) in block for p in group["params"]}
        assert in_blocks in ({True}, {False}) and group["lr"] == (0.001 if True in in_blocks else 0.01)
    total = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert total == sum(p.numel() for p in task.parameters())
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    assert max(g["lr"] for g in optimizer.param_groups) < 0.01 * 0.11  # the milestone at 50 % divided it by 10


def test_pictures_are_rgb_images_in_the_unit_range():
    task = tiny_task().eval()
    batch = room_batch()
    prediction = task.predict_batch(batch)
    (panel,) = task.example_panels(batch, prediction)
    assert panel.ndim == 3 and panel.shape[0] == 3 and panel.shape[2] > 2 * panel.shape[1]  # input | prediction | truth
    assert 0 <= float(panel.min()) and float(panel.max()) <= 1 and float(panel.std()) > 0.05
    metrics = task.configure_metrics().clone(prefix="test_")
    task.update_metrics(metrics, prediction, batch)
    ((caption, chart),) = task.report_figures(metrics)
    assert "IoU per class" in caption and chart.shape[0] == 3 and 0 <= float(chart.min()) <= float(chart.max()) <= 1


def test_training_loss_falls_on_one_room():
    task = tiny_task(lr=0.01)
    batch = room_batch(rays=2000)
    optimiser = torch.optim.AdamW(task.parameters(), lr=0.01)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(task(batch["coord"], batch["feat"], batch["offset"]), batch["segment"])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0]


def test_pictures_are_drawn_inside_a_bfloat16_autocast_step():
    task = tiny_task().eval()
    batch = room_batch(rays=800)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = task.predict_batch(batch)
        (panel,) = task.example_panels(batch, prediction)
    assert panel.dtype == torch.float32 and float(panel.std()) > 0.05


def test_inverse_sqrt_frequency_weights_by_hand():
    from tasks.point_segmentation import inverse_sqrt_frequency

    # shares 0.64, 0.16, 0.0, 0.04, 0.16 -> 1/sqrt: 1.25, 2.5, -, 5, 2.5 (mean 2.8125 over present)
    weights = inverse_sqrt_frequency(torch.tensor([64, 16, 0, 4, 16]))
    torch.testing.assert_close(weights, torch.tensor([1.25, 2.5, 0.0, 5.0, 2.5]) / 2.8125)


def test_class_weights_are_checked_and_weight_the_loss():
    import pytest

    with pytest.raises(ValueError, match="inverse_sqrt_frequency"):
        tiny_task(class_weights="balanced")
    with pytest.raises(ValueError, match="13 non-negative numbers"):
        tiny_task(class_weights=[1.0, 2.0])
    batch = room_batch(rays=800)
    plain, weighted = tiny_task(), tiny_task(class_weights=[0.0] * 12 + [1.0])  # only clutter counts
    for task in (plain, weighted):
        task.log = lambda *args, **kwargs: None
    logits = plain.segmenter(batch["coord"], batch["feat"], batch["offset"])
    clutter = batch["segment"] == 12
    expected = torch.nn.functional.cross_entropy(logits[clutter], batch["segment"][clutter])
    torch.testing.assert_close(weighted.training_step(batch, 0), expected)
    assert not torch.allclose(plain.training_step(batch, 0), expected)


def test_class_counts_read_every_training_scene(tmp_path):
    from data.point_cloud import NpyScene, PointCloudDataset
    from data.point_transforms import Compose

    for name, labels in (("a", [0, 0, 2, -1]), ("b", [2, 1, 1, 255])):
        folder = tmp_path / name
        folder.mkdir()
        np.save(folder / "coord.npy", np.random.rand(4, 3).astype(np.float32))
        np.save(folder / "color.npy", np.full((4, 3), 100, np.uint8))
        np.save(folder / "segment.npy", np.array(labels))
    dataset = PointCloudDataset([NpyScene(n, tmp_path / n) for n in "ab"], Compose([]), ("color",), num_classes=4)
    assert dataset.class_counts().tolist() == [2, 2, 2, 0]  # -1 and 255 are ignored
