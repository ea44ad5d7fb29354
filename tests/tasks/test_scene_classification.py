"""Scene classification: metric protocol, the MoE loss in training, the baseline, the pictures."""

import pytest
import torch

from backbones.afmnet import MixtureOfExperts
from tasks.scene_classification import (
    ColourHistogramNearestNeighbour,
    SceneClassification,
    colour_histograms,
    confusion_matrix_image,
    labelled_panel,
)
from tests.backbones.test_afmnet import TINY


@pytest.fixture
def task():
    torch.manual_seed(0)
    return SceneClassification(num_classes=3, backbone="afmnet_tiny", backbone_kwargs=TINY, image_size=64)


def test_metrics_are_overall_average_accuracy_and_kappa_by_hand(task):
    metrics = task.configure_metrics()
    # true:      0 0 0 0 1 1 2 2
    # predicted: 0 0 0 1 1 1 0 2
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 0, 0, 1, 1, 1, 0, 2])
    task.update_metrics(metrics, torch.nn.functional.one_hot(predicted, 3).float(), {"label": labels})
    values = {name: float(value) for name, value in metrics.compute().items()}
    assert values["oa"] == pytest.approx(6 / 8)
    assert values["aa"] == pytest.approx((3 / 4 + 2 / 2 + 1 / 2) / 3)
    observed = 6 / 8
    expected = (4 * 4 + 2 * 3 + 2 * 1) / 64  # sum over classes of (true share x predicted share)
    assert values["kappa"] == pytest.approx((observed - expected) / (1 - expected))


def test_training_loss_is_cross_entropy_plus_weighted_balancing_loss(task):
    batch = {"image": torch.rand(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 1])}
    task.train()
    losses = {}
    for weight in (0.0, 10.0):
        task.hparams.aux_loss_weight = weight
        torch.manual_seed(1)
        losses[weight] = float(task.training_step(batch, 0))
    moe = [m for m in task.network.modules() if isinstance(m, MixtureOfExperts)]
    assert len(moe) == 1 and moe[0].aux_loss is not None
    assert losses[10.0] - losses[0.0] == pytest.approx(10.0 * float(moe[0].aux_loss), rel=1e-4)


def test_moe_head_on_another_timm_backbone_reaches_the_loss():
    torch.manual_seed(0)
    task = SceneClassification(num_classes=4, backbone="resnet18", backbone_kwargs=dict(layers=[1, 1, 1, 1], channels=(8, 8, 16, 16)),
                               head="moe", moe_experts=4, moe_top_k=2, moe_hidden=8, image_size=32)  # fmt: skip
    assert task.method_name == "resnet18 + MoE head" and task.backbone_name == "resnet18"
    probs = task.predict_batch({"image": torch.rand(2, 3, 32, 32)})
    assert probs.shape == (2, 4) and torch.allclose(probs.sum(dim=1), torch.ones(2))
    task.train()
    task.training_step({"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 3])}, 0)
    assert task.network.head[0].aux_loss is not None


def test_training_lowers_the_loss_on_a_small_batch(task):
    torch.manual_seed(2)
    images = torch.rand(6, 3, 64, 64)
    images[3:, 0] += 0.5  # two visibly different groups
    batch = {"image": images.clamp(0, 1), "label": torch.tensor([0, 0, 0, 1, 1, 1])}
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    task.train()
    losses = []
    for _ in range(12):
        loss = task.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_method_and_backbone_names(task):
    assert task.method_name == "AFM-Net" and task.backbone_name == "afmnet_tiny"
    assert task.monitor == "val_oa" and task.mode == "max"


def test_colour_histograms_by_hand():
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0] = torch.tensor([[0.0, 0.3], [0.3, 1.0]])  # red: bins 0, 1, 1, 3 (of 4)
    hist = colour_histograms(image, bins=4)
    assert hist.shape == (1, 12)
    torch.testing.assert_close(hist[0, :4], torch.tensor([0.25, 0.5, 0.0, 0.25]))
    torch.testing.assert_close(hist[0, 4:8], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # green all zero


def test_colour_histogram_baseline_predicts_the_nearest_training_image():
    red, green, blue = (torch.zeros(3, 8, 8) for _ in range(3))
    red[0], green[1], blue[2] = 0.9, 0.9, 0.9
    train = [{"image": torch.stack([red, green, blue]), "label": torch.tensor([2, 0, 1])}]
    baseline = ColourHistogramNearestNeighbour.fit(train, num_classes=3, bins=8)
    query = torch.stack([green * 0.95, red * 0.97, blue])
    prediction = baseline({"image": query})
    torch.testing.assert_close(prediction, torch.eye(3)[[0, 2, 1]])


def test_baselines_must_be_fitted_first(task):
    with pytest.raises(RuntimeError, match="fit_baselines"):
        task.baselines()


def test_pictures_are_rgb_images_in_unit_range():
    confmat = torch.tensor([[5, 1, 0], [0, 4, 2], [1, 0, 6]])
    picture = confusion_matrix_image(confmat, ["beach", "forest", "river"])
    assert picture.ndim == 3 and picture.shape[0] == 3 and 0 <= picture.min() and picture.max() <= 1
    big = confusion_matrix_image(torch.eye(45, dtype=torch.long) * 3, [f"class{i}" for i in range(45)])
    assert big.shape[1] > 45 * 16
    panel = labelled_panel(torch.rand(3, 32, 32), "beach", "river", 0.8)
    assert panel.shape == (3, 194, 160)
    # the predicted name is red when wrong, green when right
    wrong, right = panel[:, 177:194], labelled_panel(torch.rand(3, 32, 32), "beach", "beach", 0.8)[:, 177:194]
    assert (wrong[0] - wrong[1]).max() > 0.5 and (right[1] - right[0]).max() > 0.3


def test_export_contract(task):
    module = task.inference_module().eval()
    (example,) = task.example_input()
    (check,) = task.check_input()
    assert example.shape[0] != check.shape[0] and example.shape[1:] == check.shape[1:] == (3, 64, 64)
    with torch.no_grad():
        probs = module(check)
    assert probs.shape == (3, 3) and torch.allclose(probs.sum(dim=1), torch.ones(3))
    assert task.dynamic_axes == {"image": {0: "batch"}}
