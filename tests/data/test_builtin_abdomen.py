"""Built-in CT phantoms: anatomy, variation between cases, determinism, and the Synapse layout."""

import h5py
import numpy as np

from data.builtin_abdomen import ORGANS, build_builtin_synapse, phantom_case
from data.synapse import SynapseDataModule


def _centroid(label: np.ndarray, organ: int) -> np.ndarray:
    return np.argwhere(label == organ).mean(axis=0)  # (z, y, x)


def test_every_organ_is_present_and_anatomically_placed():
    image, label = phantom_case(seed=3, size=64, slices=24)
    assert image.dtype == np.float32 and image.min() >= 0 and image.max() <= 1
    assert set(np.unique(label).astype(int)) == set(range(len(ORGANS) + 1))
    organ = {name: i + 1 for i, name in enumerate(ORGANS)}
    centre = {name: _centroid(label, k) for name, k in organ.items()}
    # radiological convention: the patient's right (liver, right kidney) on the image's left
    assert centre["liver"][2] < 32 < centre["spleen"][2]
    assert centre["right kidney"][2] < centre["aorta"][2] < centre["left kidney"][2]
    assert centre["stomach"][2] > 32 and centre["stomach"][1] < centre["left kidney"][1]  # left, anterior
    assert centre["right kidney"][0] > centre["left kidney"][0]  # the right kidney sits lower
    assert (label == organ["liver"]).sum() > 5 * (label == organ["spleen"]).sum()
    # organ-specific intensity: enhancing kidneys brighter than liver, gallbladder fluid darkest
    mean = {name: image[label == k].mean() for name, k in organ.items()}
    assert mean["gallbladder"] < mean["pancreas"] < mean["liver"] < mean["aorta"]


def test_cases_differ_but_a_seed_repeats_its_case():
    first, first_label = phantom_case(seed=1, size=48, slices=12)
    again, again_label = phantom_case(seed=1, size=48, slices=12)
    other, other_label = phantom_case(seed=2, size=48, slices=12)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_label, again_label)
    overlap = ((first_label == 5) & (other_label == 5)).sum() / ((first_label == 5) | (other_label == 5)).sum()
    assert 0.3 < overlap < 0.95  # the same anatomy, another patient


def test_builtin_set_is_written_in_transunet_layout_and_read_by_the_synapse_loader():
    root = build_builtin_synapse(train_cases=2, test_cases=1, size=32, slices=6)
    assert (root / "lists_Synapse" / "train.txt").read_text().split() == [
        f"case{c:04d}_slice{z:03d}" for c in (1, 2) for z in range(6)
    ]
    with h5py.File(root / "test_vol_h5" / "case0003.npy.h5") as handle:
        assert handle["image"].shape == handle["label"].shape == (6, 32, 32)
    datamodule = SynapseDataModule(img_size=32, builtin_train_cases=2, builtin_test_cases=1, builtin_size=32, builtin_slices=6)
    datamodule.prepare_data()
    datamodule.setup("test")
    assert datamodule.dataset_name.startswith("built-in")
    assert datamodule.datasets["test"][0]["mask"].max() <= 8
    assert build_builtin_synapse(train_cases=2, test_cases=1, size=32, slices=6) == root  # generated once
