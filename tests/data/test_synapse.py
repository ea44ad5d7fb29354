"""Synapse loaders on tiny npz / h5 / NIfTI fixtures: splits, shapes, spacing, and bad files."""

import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    IntensityRangeError,
    LabelRangeError,
    LayoutError,
    MissingPairError,
    OutputExistsError,
    ShapeMismatchError,
    UnreadableFileError,
)
from data.nifti_volumes import case_key, window_hu
from data.synapse import SynapseDataModule, synapse_augmentation
from tests.data.synapse_files import write_nifti_case, write_raw_synapse, write_transunet

NO_AUGMENTATION = dict(flip_p=0, affine_p=0, deform_p=0, noise_p=0, blur_p=0, contrast_p=0)


def _module(root, stage, **kwargs):
    datamodule = SynapseDataModule(root=str(root), **{"img_size": 32, **NO_AUGMENTATION, **kwargs})
    datamodule.prepare_data()
    datamodule.setup(stage)
    return datamodule


# -- TransUNet's npz / h5 layout ------------------------------------------------------------------


def test_transunet_layout_gives_resized_training_slices_and_whole_test_volumes(tmp_path):
    root = write_transunet(tmp_path / "synapse")
    datamodule = _module(root, "fit")
    train = datamodule.datasets["train"]
    assert len(train) == 10 and "val" not in datamodule.datasets and datamodule.val_dataloader() == []
    sample = train[0]
    assert sample["image"].shape == (1, 32, 32) and sample["mask"].shape == (32, 32)
    assert sample["mask"].dtype == torch.int64 and 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert sample["name"] == "case0005_slice000"
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (8, 1, 32, 32)

    datamodule = _module(root, "test")
    volume = datamodule.datasets["test"][1]
    assert volume["image"].shape == volume["mask"].shape == (5, 24, 20)
    assert volume["name"] == "case0002" and volume["index"] == 1
    torch.testing.assert_close(volume["spacing"], torch.ones(3))  # h5 stores no spacing: HD95 in voxels
    with h5py.File(root / "test_vol_h5" / "case0002.npy.h5") as handle:
        np.testing.assert_array_equal(volume["mask"].numpy(), handle["label"][()])


def test_held_out_cases_become_validation_volumes_in_slice_order(tmp_path):
    root = write_transunet(tmp_path / "synapse", train_cases={"case0005": 12, "case0006": 3, "case0007": 3})
    datamodule = _module(root, "fit", val_cases=1, split_seed=1)
    (held,) = datamodule.datasets["val"].volumes
    kept = {name.split("_")[0] for name in (s.path.stem for s in datamodule.datasets["train"].slices)}
    assert held.name not in kept and len(kept) == 2
    volume = datamodule.datasets["val"][0]
    expected = np.stack([np.load(root / "train_npz" / f"{held.name}_slice{z:03d}.npz")["image"] for z in range(volume["image"].shape[0])])
    np.testing.assert_allclose(volume["image"].numpy(), expected)  # slice 10 after slice 9, not after slice 1


def test_without_lists_every_file_is_used(tmp_path):
    root = write_transunet(tmp_path / "synapse", lists=False)
    assert len(_module(root, "fit").datasets["train"]) == 10
    assert [v.name for v in _module(root, "test").datasets["test"].volumes] == ["case0001", "case0002"]


def test_augmented_slices_repeat_for_the_same_key_and_differ_between_seeds(tmp_path):
    root = write_transunet(tmp_path / "synapse")
    train = _module(root, "fit", affine_p=1.0, noise_p=1.0).datasets["train"]
    first = train[(0, 3)]
    train[(1, 5)]  # another draw in between changes nothing
    assert torch.equal(first["image"], train[(0, 3)]["image"]) and torch.equal(first["mask"], train[(0, 3)]["mask"])
    assert not torch.equal(first["image"], train[(0, 4)]["image"])
    assert train[0]["image"].shape == first["image"].shape  # a plain index (no seed) still works


def test_augmentation_moves_image_and_labels_together():
    mask = np.zeros((48, 48), np.uint8)
    mask[10:30, 12:26] = 5
    image = (mask > 0).astype(np.float32) * 0.9
    transform = synapse_augmentation(48, **{**NO_AUGMENTATION, "affine_p": 1.0, "deform_p": 1.0, "deformation": "elastic"})
    for seed in range(3):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        assert set(np.unique(out["mask"])) <= {0, 5}
        moved, labelled = out["image"] > 0.45, out["mask"] > 0
        assert (moved & labelled).sum() / (moved | labelled).sum() > 0.85


# -- NIfTI ----------------------------------------------------------------------------------------


def test_raw_nifti_volumes_are_windowed_reordered_and_keep_their_spacing(tmp_path):
    root = write_raw_synapse(tmp_path / "raw")
    datamodule = _module(root, "test")
    assert datamodule.dataset_name == "nifti:raw"
    volume = datamodule.datasets["test"][0]
    hu = nib.load(str(root / "Testing" / "img" / "img0004.nii.gz")).get_fdata()
    label = nib.load(str(root / "Testing" / "label" / "label0004.nii.gz")).get_fdata()
    np.testing.assert_allclose(volume["image"].numpy(), window_hu(hu, (-125, 275)).transpose(2, 1, 0), atol=1e-6)
    np.testing.assert_array_equal(volume["mask"].numpy(), label.transpose(2, 1, 0))
    torch.testing.assert_close(volume["spacing"], torch.tensor([2.5, 0.7, 0.8]))  # (z, y, x) in mm

    datamodule = _module(root, "fit", val_cases=1)
    assert len(datamodule.datasets["train"]) == 2 * 6  # two cases of six axial slices, read from the cache
    sample = datamodule.datasets["train"][0]
    assert sample["image"].shape == (1, 32, 32) and int(sample["mask"].max()) <= 8
    assert datamodule.datasets["val"][0]["image"].shape == (6, 16, 20)


def test_transunet_lists_split_raw_nifti_cases(tmp_path):
    root = write_raw_synapse(tmp_path / "raw", train=(1, 2, 3, 4), test=())
    (root / "lists").mkdir()
    (root / "lists" / "train.txt").write_text("case0001_slice000\ncase0001_slice001\ncase0003_slice000\n")
    (root / "lists" / "test_vol.txt").write_text("case0002\ncase0004\n")
    assert {s.source.name for s in _module(root, "fit").datasets["train"].slices} == {"label0001.nii.gz", "label0003.nii.gz"}
    assert [v.name for v in _module(root, "test").datasets["test"].volumes] == ["case0002", "case0004"]


def test_nnunet_tree_and_btcv_label_mapping(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "btcv"
    write_nifti_case(root / "imagesTr" / "BTCV_001_0000.nii.gz", root / "labelsTr" / "BTCV_001.nii.gz", rng, labels=range(1, 14))
    write_nifti_case(root / "imagesTs" / "BTCV_002_0000.nii.gz", root / "labelsTs" / "BTCV_002.nii.gz", rng, labels=range(1, 14))
    assert case_key(root / "imagesTr" / "BTCV_001_0000.nii.gz") == "case0001"
    with pytest.raises(LabelRangeError, match=r"labelsTs/BTCV_002.nii.gz: label value 13 is outside the class range 0 .. 8"):
        _module(root, "test").datasets["test"][0]
    volume = _module(root, "test", label_map="btcv").datasets["test"][0]
    raw = nib.load(str(root / "labelsTs" / "BTCV_002.nii.gz")).get_fdata().transpose(2, 1, 0)
    mapped = volume["mask"].numpy()
    assert set(np.unique(mapped)) == set(range(9))
    for btcv, synapse in {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8, 5: 0, 9: 0, 13: 0}.items():
        assert (mapped[raw == btcv] == synapse).all()


def test_predict_writes_label_volumes_under_the_input_names(tmp_path):
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    write_nifti_case(inputs / "scan.nii.gz", None, rng, spacing=(0.9, 0.9, 3.0))
    with h5py.File(inputs / "case0009.npy.h5", "w") as handle:
        handle.create_dataset("image", data=rng.random((4, 10, 12)).astype(np.float32))
    out = tmp_path / "out"
    datamodule = SynapseDataModule(predict_dir=str(inputs), predict_output_dir=str(out))
    datamodule.setup("predict")
    for item in datamodule.datasets["predict"]:
        datamodule.write_prediction(torch.ones(1, *item["image"].shape, dtype=torch.long), [item["name"]])
    assert not out.exists()  # staged until predict succeeds
    datamodule.finish_predictions()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no staging folder left
    written = nib.load(str(out / "scan.nii.gz"))
    assert written.shape == (20, 16, 6) and np.allclose(written.affine, nib.load(str(inputs / "scan.nii.gz")).affine)
    with h5py.File(out / "case0009.npy.h5") as handle:
        assert handle["label"].shape == (4, 10, 12)
    with pytest.raises(OutputExistsError):
        SynapseDataModule(predict_dir=str(inputs), predict_output_dir=str(out)).setup("predict")


# -- bad files: one error naming the file -----------------------------------------------------------


def _rewrite_npz(root, name, **arrays):
    np.savez(root / "train_npz" / f"{name}.npz", **arrays)
    return root / "train_npz" / f"{name}.npz"


@pytest.mark.parametrize(
    "arrays,error,message",
    [
        (dict(image=np.zeros((24, 20), np.float32), label=np.full((24, 20), 9.0)), LabelRangeError, "label value 9 is outside the class range 0 .. 8"),
        (dict(image=np.zeros((24, 20), np.float32), label=np.full((24, 20), -1.0)), LabelRangeError, "label value -1 is outside"),
        (dict(image=np.zeros((24, 20), np.float32), label=np.full((24, 20), 1.5)), LabelRangeError, "non-integer value 1.5"),
        (dict(image=np.zeros((24, 20), np.float32)), UnreadableFileError, "has no 'label' array (it holds: image)"),
        (dict(image=np.zeros((24, 20), np.float32), label=np.zeros((24, 21))), ShapeMismatchError, "label shape (24, 21) differs from image shape (24, 20)"),
        (dict(image=np.full((24, 20), 180.0, np.float32), label=np.zeros((24, 20))), IntensityRangeError, "expected CT windowed to [0, 1]"),
    ],
)
def test_bad_training_slices_raise_an_error_naming_the_file(tmp_path, arrays, error, message):
    root = write_transunet(tmp_path / "synapse")
    path = _rewrite_npz(root, "case0006_slice001", **arrays)
    train = _module(root, "fit").datasets["train"]
    index = [s.path for s in train.slices].index(path)
    with pytest.raises(error) as raised:
        train[index]
    assert str(path) in str(raised.value) and message in str(raised.value)


def test_bad_test_volumes_raise_an_error_naming_the_file(tmp_path):
    root = write_transunet(tmp_path / "synapse")
    path = root / "test_vol_h5" / "case0002.npy.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("image", data=np.zeros((5, 24, 20), np.float32))
        handle.create_dataset("label", data=np.zeros((5, 24, 19), np.float32))
    test = _module(root, "test").datasets["test"]
    with pytest.raises(ShapeMismatchError, match="case0002.npy.h5: label shape"):
        test[1]
    path.write_bytes(b"not an h5 file")
    with pytest.raises(UnreadableFileError, match="case0002.npy.h5: cannot read"):
        test[1]


def test_a_listed_file_that_is_missing_is_named(tmp_path):
    root = write_transunet(tmp_path / "synapse")
    (root / "train_npz" / "case0007_slice002.npz").unlink()
    with pytest.raises(DatasetNotFoundError, match="case0007_slice002.npz: listed in .*train.txt but does not exist"):
        _module(root, "fit")


def test_nifti_without_its_label_map_or_of_another_shape_is_named(tmp_path):
    root = write_raw_synapse(tmp_path / "raw")
    (root / "Training" / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(MissingPairError, match="img0002.nii.gz: no label map for case0002"):
        _module(root, "fit")
    rng = np.random.default_rng(1)
    write_nifti_case(root / "Training" / "img" / "img0002.nii.gz", None, rng)
    write_nifti_case(root / "x" / "img.nii.gz", root / "Training" / "label" / "label0002.nii.gz", rng, shape=(20, 16, 5))
    with pytest.raises(ShapeMismatchError, match="label0002.nii.gz: shape"):
        _module(root, "fit")


# -- each format: a truncated file, a missing split, an empty folder, labels out of range ----------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _item_error(dataset, path):
    """The error reading the item whose source is ``path`` (the first item if none matches)."""
    for i in range(len(dataset)):
        try:
            dataset[i]
        except Exception as error:  # noqa: BLE001  (the test checks its type and message)
            return error
    raise AssertionError(f"no item of the dataset failed; expected one to name {path}")


@pytest.mark.parametrize(
    "layout,stage,relative",
    [
        ("transunet", "fit", "train_npz/case0006_slice001.npz"),
        ("transunet", "test", "test_vol_h5/case0002.npy.h5"),
        ("nifti", "fit", "Training/img/img0002.nii.gz"),
        ("nifti", "fit", "Training/label/label0002.nii.gz"),
        ("nifti", "test", "Testing/img/img0004.nii.gz"),
    ],
)
def test_a_truncated_file_is_named(tmp_path, layout, stage, relative):
    root = write_transunet(tmp_path / "synapse") if layout == "transunet" else write_raw_synapse(tmp_path / "raw")
    path = _truncate(root / relative)
    with pytest.raises(UnreadableFileError) as raised:
        # NIfTI training volumes are converted in prepare_data; the others are read per item
        datamodule = _module(root, stage)
        raise _item_error(datamodule.datasets["train" if stage == "fit" else "test"], path)
    assert str(raised.value).startswith(f"{path}: cannot read")


@pytest.mark.parametrize(
    "layout,stage,missing,message",
    [
        ("transunet", "fit", "train_npz", "train_npz: training folder does not exist"),
        ("transunet", "test", "test_vol_h5", "test_vol_h5: test folder does not exist"),
        ("nifti", "test", "Testing", "raw: no NIfTI test volumes"),
    ],
)
def test_a_missing_split_is_named(tmp_path, layout, stage, missing, message):
    root = write_transunet(tmp_path / "synapse") if layout == "transunet" else write_raw_synapse(tmp_path / "raw")
    shutil.rmtree(root / missing)
    with pytest.raises(DatasetNotFoundError, match=message):
        _module(root, stage)


def test_a_missing_root_or_an_unknown_folder_is_named(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nowhere: dataset root does not exist"):
        _module(tmp_path / "nowhere", "fit")
    (tmp_path / "photos").mkdir()
    with pytest.raises(LayoutError, match="photos: no train_npz/ or test_vol_h5/"):
        _module(tmp_path / "photos", "fit")


@pytest.mark.parametrize(
    "layout,stage,emptied,error,message",
    [
        ("transunet", "fit", "train_npz", EmptyDatasetError, "train_npz: holds no .npz slices"),
        ("transunet", "test", "test_vol_h5", EmptyDatasetError, "test_vol_h5: holds no .h5 volumes"),
        ("nifti", "fit", "Training/img", DatasetNotFoundError, "raw: no NIfTI training volumes"),
        ("nifti", "fit", "Training/label", MissingPairError, "img0001.nii.gz: no label map for case0001"),
        ("nifti", "test", "Testing/img", DatasetNotFoundError, "raw: no NIfTI test volumes"),
    ],
)
def test_an_empty_folder_is_named(tmp_path, layout, stage, emptied, error, message):
    root = write_transunet(tmp_path / "synapse", lists=False) if layout == "transunet" else write_raw_synapse(tmp_path / "raw")
    for path in (root / emptied).iterdir():
        path.unlink()
    with pytest.raises(error, match=message):
        _module(root, stage)


def test_an_empty_list_or_predict_folder_is_named(tmp_path):
    root = write_transunet(tmp_path / "synapse")
    (root / "lists_Synapse" / "train.txt").write_text("\n")
    with pytest.raises(EmptyDatasetError, match="train.txt: list is empty"):
        _module(root, "fit")
    (tmp_path / "inputs").mkdir()
    datamodule = SynapseDataModule(predict_dir=str(tmp_path / "inputs"), predict_output_dir=str(tmp_path / "out"))
    with pytest.raises(EmptyDatasetError, match="inputs: holds no volumes"):
        datamodule.setup("predict")


@pytest.mark.parametrize("split", ["Training", "Testing"])
def test_nifti_labels_out_of_range_are_named_with_the_btcv_hint(tmp_path, split):
    root = write_raw_synapse(tmp_path / "raw")
    number = 2 if split == "Training" else 4
    label_path = root / split / "label" / f"label{number:04d}.nii.gz"
    write_nifti_case(root / split / "img" / f"img{number:04d}.nii.gz", label_path, np.random.default_rng(3), labels=[1, 13])
    datamodule = _module(root, "fit" if split == "Training" else "test")
    error = _item_error(datamodule.datasets["train" if split == "Training" else "test"], label_path)
    assert isinstance(error, LabelRangeError)
    assert str(error).startswith(f"{label_path}: label value 13 is outside the class range 0 .. 8")
    assert "--data.label_map btcv" in str(error)
    # with BTCV's mapping the same file is read: 13 (an adrenal gland) becomes background
    datamodule = _module(root, "fit" if split == "Training" else "test", label_map="btcv")
    for i in range(len(datamodule.datasets["train" if split == "Training" else "test"])):
        datamodule.datasets["train" if split == "Training" else "test"][i]


def test_h5_labels_out_of_range_are_named(tmp_path):
    root = write_transunet(tmp_path / "synapse")
    path = root / "test_vol_h5" / "case0001.npy.h5"
    with h5py.File(path, "r+") as handle:
        handle["label"][2, 3, 4] = 9
    with pytest.raises(LabelRangeError, match="case0001.npy.h5: label value 9 is outside the class range 0 .. 8"):
        _module(root, "test").datasets["test"][0]
