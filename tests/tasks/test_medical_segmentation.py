"""Medical segmentation: the Synapse metrics on hand-made masks, the decoders on several encoders,
the loss, slice-by-slice volume inference and the pictures."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.medical_segmentation import MedicalSegmentation
from tasks.medical_segmentation.metrics import CaseAverage, case_scores, dice_coefficient, hd95
from tasks.medical_segmentation.network import SegmentationNetwork
from tasks.medical_segmentation.task import soft_dice_loss

TINY = dict(backbone="transdae_tiny", backbone_kwargs=dict(embed_dims=(8, 16, 32), channel_heads=2), decoder_depth=1, decoder_channel_heads=2)

# -- Dice and HD95 on masks whose answers are worked out by hand ---------------------------------


def _volume(shape=(5, 8, 8)):
    return np.zeros(shape, dtype=bool)


def test_dice_and_hd95_of_identical_masks():
    mask = _volume()
    mask[1:4, 2:6, 2:6] = True
    assert dice_coefficient(mask, mask) == 1.0
    assert hd95(mask, mask) == 0.0


def test_two_single_voxels_are_as_far_apart_as_the_spacing_says():
    a, b = _volume(), _volume()
    a[0, 0, 0] = True
    b[1, 2, 2] = True
    assert dice_coefficient(a, b) == 0.0
    assert hd95(a, b) == pytest.approx(3.0)  # sqrt(1 + 4 + 4) voxels
    assert hd95(a, b, spacing=(2.0, 0.5, 0.5)) == pytest.approx(math.sqrt(4 + 1 + 1))  # millimetres


def test_slab_shifted_by_one_voxel():
    # A: a 3 x 3 x 3 cube; B: the same cube one voxel to the right. Overlap 18 of 27 + 27 voxels.
    # Every surface voxel of A is either on B's surface (distance 0) or one voxel from it, and
    # vice versa, so the pooled distances are zeros and ones and the 95th percentile is 1.
    a, b = _volume((5, 5, 6)), _volume((5, 5, 6))
    a[1:4, 1:4, 1:4] = True
    b[1:4, 1:4, 2:5] = True
    assert dice_coefficient(a, b) == pytest.approx(2 * 18 / 54)
    assert hd95(a, b) == pytest.approx(1.0)


def test_hd95_ignores_the_farthest_five_percent_unlike_the_maximum():
    # 2D, one slice: A is a 10 x 10 square; B is A plus one stray voxel 20 columns away.
    a, b = np.zeros((1, 12, 40), bool), np.zeros((1, 12, 40), bool)
    a[0, 1:11, 1:11] = True
    b[...] = a
    b[0, 5, 31] = True
    # on a one-slice volume every voxel touches the outside in z, so all voxels are surface:
    # A -> B: all 100 at distance 0; B -> A: 100 zeros and the stray voxel at 21.
    distances = np.concatenate([np.zeros(100), np.zeros(100), [21.0]])
    assert hd95(a, b) == pytest.approx(np.percentile(distances, 95)) == pytest.approx(0.0)
    assert hd95(a, b) < 21.0


def _brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Independent reference: surfaces by 6-neighbour test, all pairwise distances."""

    def surface(mask):
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis, shift in itertools.product(range(3), (-1, 1)):
            inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    pairwise = np.linalg.norm(sa[:, None] - sb[None], axis=-1)
    return float(np.percentile(np.concatenate([pairwise.min(1), pairwise.min(0)]), 95))


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_a_brute_force_reference_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    from scipy.ndimage import gaussian_filter

    a = gaussian_filter(rng.normal(size=(6, 14, 12)), 1.5) > 0.05
    b = gaussian_filter(rng.normal(size=(6, 14, 12)), 1.5) > 0.05
    spacing = (2.5, 0.8, 0.7)
    assert hd95(a, b, spacing) == pytest.approx(_brute_force_hd95(a, b, spacing))


def test_empty_masks_follow_the_chosen_convention():
    label = np.zeros((3, 6, 6), np.int64)
    label[1, 1:3, 1:3] = 1  # organ 1 present
    label[1, 4, 4] = 3  # organ 3 present
    prediction = np.zeros_like(label)
    prediction[1, 1:3, 1:3] = 1  # organ 1 right
    prediction[0, 0, 0] = 2  # organ 2 predicted but absent; organ 3 missed
    dice, distance = case_scores(prediction, label, num_classes=4, convention="transunet")
    np.testing.assert_array_equal(dice, [1.0, 1.0, 0.0])  # TransUNet: false positive on an absent organ = 1
    np.testing.assert_array_equal(distance, [0.0, 0.0, 0.0])
    dice, distance = case_scores(prediction, label, num_classes=5, convention="nan")
    np.testing.assert_array_equal(dice[:3], [1.0, 0.0, 0.0])
    assert math.isnan(dice[3])  # organ 4: absent and not predicted -> undefined
    assert distance[0] == 0.0 and np.isnan(distance[1:]).all()


def test_case_average_means_over_cases_then_organs_and_counts_a_repeated_case_once():
    metric = CaseAverage("dice")
    dice = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    metric.update(torch.tensor([0, 1]), dice, torch.zeros(2, 2))
    metric.update(torch.tensor([1]), dice[1:], torch.zeros(1, 2))  # DDP padding repeats case 1
    assert metric.compute().item() == pytest.approx(((1 + 0.5) / 2 + (0 + 1) / 2) / 2)
    organ = CaseAverage("dice", organ=1)
    organ.update(torch.tensor([0, 1]), dice, torch.zeros(2, 2))
    assert organ.compute().item() == pytest.approx(0.5)
    undefined = CaseAverage("hd95")
    undefined.update(torch.tensor([0, 1]), dice, torch.tensor([[2.0, math.nan], [4.0, 6.0]]))
    assert undefined.compute().item() == pytest.approx((3.0 + 6.0) / 2)


def test_case_average_pools_the_cases_of_every_process():
    # what a second DDP process holds: case 1 again (the sampler's padding) and case 2
    other = {torch.long: torch.tensor([1, 2]), torch.float32: torch.tensor([[0.5, 1.0], [0.0, 0.5]])}

    def all_gather(tensor, group=None):
        return [tensor, other[tensor.dtype]]

    metric = CaseAverage("dice", dist_sync_fn=all_gather, distributed_available_fn=lambda: True)
    metric.update(torch.tensor([0, 1]), torch.tensor([[1.0, 0.0], [0.5, 1.0]]), torch.zeros(2, 2))
    per_organ = [(1.0 + 0.5 + 0.0) / 3, (0.0 + 1.0 + 0.5) / 3]
    assert metric.compute().item() == pytest.approx(sum(per_organ) / 2)


# -- networks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone,kwargs,decoder",
    [
        ("transdae_tiny", TINY["backbone_kwargs"], "transdae"),
        ("test_resnet", {}, "transdae"),
        ("test_convnext", {}, "transdae"),
        ("test_resnet", {}, "unet"),
    ],
)
def test_decoders_run_on_different_encoders_at_any_size(backbone, kwargs, decoder):
    torch.manual_seed(0)
    network = SegmentationNetwork(backbone, kwargs, decoder, num_classes=5, decoder_depth=1, decoder_channel_heads=2)
    image = torch.rand(2, 1, 45, 38, requires_grad=True)
    logits = network(image)
    assert logits.shape == (2, 5, 45, 38)
    logits.square().mean().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is not None for p in network.decoder.parameters())


def test_slices_of_any_size_are_edge_padded_to_the_stride_and_cropped_back():
    torch.manual_seed(0)
    network = SegmentationNetwork("transdae_tiny", TINY["backbone_kwargs"], num_classes=3, decoder_depth=1, decoder_channel_heads=2)
    network.eval()
    image = torch.rand(1, 1, 29, 43)
    # the reference: F.pad's replicate mode to the next multiple of the largest stride, then a crop
    m = network.pad_multiple
    padded = F.pad((image - 0.5) / 0.5, (0, -43 % m, 0, -29 % m), mode="replicate")
    with torch.no_grad():
        expected = network.decoder(network.encoder(padded))[..., :29, :43]
        torch.testing.assert_close(network(image), expected)


def test_decoder_widths_need_one_entry_per_decoder_scale():
    network = SegmentationNetwork("test_resnet", decoder="unet", num_classes=3, decoder_dims=(4, 8, 8, 16))
    assert network(torch.rand(2, 1, 32, 32)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="one entry per decoder scale"):
        SegmentationNetwork("test_resnet", decoder="transdae", decoder_dims=(8, 8, 16, 16, 32))


def test_soft_dice_loss_by_hand():
    target = torch.tensor([[[0, 1], [1, 1]]])
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 100
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(1, 2, 2, 2)  # p = 0.5 everywhere
    # class 0: 2*0.5 / (4*0.25 + 1) = 0.5; class 1: 2*1.5 / (1 + 3) = 0.75 -> loss 1 - 0.625
    assert soft_dice_loss(uniform, target).item() == pytest.approx(0.375, abs=1e-5)


def test_training_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    task = MedicalSegmentation(**TINY, num_classes=3, organs=["a", "b"], img_size=32)
    image = torch.rand(4, 1, 32, 32)
    mask = torch.zeros(4, 32, 32, dtype=torch.long)
    mask[:, 4:14, 4:14] = 1
    mask[:, 18:28, 16:30] = 2
    image[:, 0][mask == 1] = 0.8
    image[:, 0][mask == 2] = 0.3
    optimiser = torch.optim.AdamW(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        logits = task(image)
        loss = 0.4 * torch.nn.functional.cross_entropy(logits, mask) + 0.6 * soft_dice_loss(logits, mask)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_volumes_are_segmented_slice_by_slice_at_the_training_size_and_resized_back():
    task = MedicalSegmentation(**TINY, img_size=32).eval()
    seen = []
    original = task.network.forward
    task.network.forward = lambda x: seen.append(tuple(x.shape)) or original(x)
    volume = torch.rand(1, 5, 40, 36)
    task.hparams.inference_batch_size = 2
    with torch.no_grad():
        labels = task.predict_batch({"image": volume})
    assert labels.shape == (1, 5, 40, 36) and labels.dtype == torch.long
    assert seen == [(2, 1, 32, 32), (2, 1, 32, 32), (1, 1, 32, 32)]


def test_metrics_panels_and_report_figure_of_a_test_batch():
    task = MedicalSegmentation(**TINY, img_size=32, num_examples=1)
    volume = torch.rand(1, 4, 32, 32)
    mask = torch.zeros(1, 4, 32, 32, dtype=torch.long)
    mask[0, 2, 5:15, 5:15] = 5  # liver on slice 2 only
    batch = {"image": volume, "mask": mask, "spacing": torch.ones(1, 3), "index": torch.tensor([0]), "name": ["case0001"]}
    prediction = mask.clone()
    metrics = task.configure_metrics().clone(prefix="test_")
    task.update_metrics(metrics, prediction, batch)
    values = metrics.compute()
    assert values["test_dice_liver"].item() == 1.0 and values["test_hd95"].item() == 0.0
    assert values["test_dice"].item() == pytest.approx(1 / 8)  # TransUNet: 7 absent, unpredicted organs score 0
    (panel,) = task.example_panels(batch, prediction)
    assert panel.shape[0] == 3 and panel.shape[2] > 3 * 32 and 0 <= panel.min() and panel.max() <= 1
    (caption, bars), = task.report_figures(metrics)
    assert "Dice" in caption and bars.shape[0] == 3


def test_method_and_backbone_names_for_the_leaderboard():
    assert MedicalSegmentation(**TINY, img_size=32).method_name == "TransDAE"
    unet = MedicalSegmentation(backbone="test_resnet", decoder="unet", img_size=32)
    assert (unet.method_name, unet.backbone_name) == ("U-Net", "test_resnet")
    with pytest.raises(ValueError, match="decoder"):
        MedicalSegmentation(decoder="fpn")
    with pytest.raises(ValueError, match="metric_convention"):
        MedicalSegmentation(**TINY, metric_convention="monai")
