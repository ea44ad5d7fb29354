"""LOL loaders on tiny fixtures in each supported layout, and their error messages."""

from pathlib import Path

import pytest
import torch

from data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    LayoutError,
    MissingPairError,
    OutputExistsError,
    ShapeMismatchError,
    UnreadableFileError,
)
from data.lol import LowLightDataModule, PairedImageDataset, discover_splits, find_pairs, paired_augmentation
from tests.conftest import write_lol_v1, write_pairs


def test_lol_v1_layout(lol_v1_root):
    layout, splits = discover_splits(lol_v1_root)
    assert layout == "lol_v1"
    assert set(splits) == {"train", "test"}
    assert len(find_pairs(splits["train"])) == 8
    assert [low.name for low, _ in find_pairs(splits["test"])] == ["t0.png", "t1.png", "t2.png"]


def test_lol_v2_real_pairs_low_and_normal_prefixed_names(tmp_path):
    base = tmp_path / "LOL-v2" / "Real_captured"
    for split, names in (("Train", ["00001", "00002"]), ("Test", ["00690"])):
        write_pairs(base / split, names, [(16, 20)] * len(names), "Low", "Normal", "low", "normal")
    layout, splits = discover_splits(tmp_path / "LOL-v2")
    assert layout == "lol_v2_real"
    [(low, high)] = find_pairs(splits["test"])
    assert (low.name, high.name) == ("low00690.png", "normal00690.png")


def test_lol_v2_synthetic_and_ambiguity_between_subsets(tmp_path):
    root = tmp_path / "LOL-v2"
    write_pairs(root / "Synthetic" / "Train", ["r1", "r2"], [(16, 16)] * 2, "Low", "Normal")
    write_pairs(root / "Synthetic" / "Test", ["r3"], [(16, 16)], "Low", "Normal")
    assert discover_splits(root)[0] == "lol_v2_synthetic"
    write_pairs(root / "Real_captured" / "Test", ["1"], [(16, 16)], "Low", "Normal", "low", "normal")
    with pytest.raises(LayoutError, match="both LOL-v2 subsets"):
        discover_splits(root)
    layout, splits = discover_splits(root, layout="lol_v2_real")
    assert layout == "lol_v2_real" and set(splits) == {"test"}


def test_retinexformer_tree_and_flat_folder_of_pairs(tmp_path):
    write_pairs(tmp_path / "rf" / "Train", ["a", "b"], [(16, 16)] * 2, "input", "target")
    write_pairs(tmp_path / "rf" / "Test", ["c"], [(16, 16)], "input", "target")
    assert discover_splits(tmp_path / "rf")[0] == "retinexformer"
    write_pairs(tmp_path / "flat", ["x", "y"], [(16, 16), (9, 7)])
    layout, splits = discover_splits(tmp_path / "flat")
    assert layout == "pairs" and list(splits) == ["test"]


def test_datamodule_fit_holds_out_validation_and_crops_identically(lol_v1_root):
    dm = LowLightDataModule(root=str(lol_v1_root), patch_size=32, batch_size=2, val_fraction=0.25)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["val"]) == 2
    train_names = {low.name for low, _ in dm.datasets["train"].pairs}
    assert not train_names & {low.name for low, _ in dm.datasets["val"].pairs}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == batch["target"].shape == (2, 3, 32, 32)
    assert batch["image"].dtype == torch.float32 and 0 <= batch["image"].min() and batch["target"].max() <= 1


def test_paired_augmentation_applies_the_same_crop_and_flip_to_both_images(tmp_path):
    write_pairs(tmp_path, ["a"], [(40, 40)])
    same = [(tmp_path / "low" / "a.png", tmp_path / "low" / "a.png")]  # an image paired with itself
    dataset = PairedImageDataset(same, paired_augmentation(24))
    for _ in range(5):
        sample = dataset[0]
        torch.testing.assert_close(sample["image"], sample["target"])


def test_test_split_keeps_full_images_of_any_size(lol_v1_root):
    dm = LowLightDataModule(root=str(lol_v1_root))
    dm.setup("test")
    sizes = [tuple(b["image"].shape[-2:]) for b in dm.test_dataloader()]
    assert sizes == [(40, 56), (37, 45), (40, 56)]


def test_missing_reference_names_the_file(tmp_path):
    root = write_lol_v1(tmp_path / "lol")
    (root / "eval15" / "high" / "t1.png").unlink()
    with pytest.raises(MissingPairError, match=r"eval15/low/t1\.png: no reference image"):
        find_pairs(root / "eval15")


def test_missing_low_image_names_the_file(tmp_path):
    root = write_lol_v1(tmp_path / "lol")
    (root / "eval15" / "low" / "t2.png").unlink()
    with pytest.raises(MissingPairError, match=r"eval15/high/t2\.png: no low-light image"):
        find_pairs(root / "eval15")


def test_size_mismatch_names_the_file(tmp_path):
    write_pairs(tmp_path / "a", ["x"], [(16, 16)])
    write_pairs(tmp_path / "b", ["x"], [(16, 18)])
    (tmp_path / "b" / "high" / "x.png").replace(tmp_path / "a" / "high" / "x.png")
    with pytest.raises(ShapeMismatchError, match=r"a/low/x\.png: size \(16, 16\) differs"):
        find_pairs(tmp_path / "a")


def test_unreadable_image_names_the_file(tmp_path):
    root = write_lol_v1(tmp_path / "lol")
    broken = root / "eval15" / "high" / "t0.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated: the header survives, the pixels do not
    dm = LowLightDataModule(root=str(root))
    dm.setup("test")
    with pytest.raises(UnreadableFileError, match=r"eval15/high/t0\.png: cannot decode"):
        next(iter(dm.test_dataloader()))


def test_garbage_file_fails_at_setup_naming_it(tmp_path):
    root = write_lol_v1(tmp_path / "lol")
    (root / "eval15" / "low" / "t0.png").write_bytes(b"not an image")
    with pytest.raises(UnreadableFileError, match=r"eval15/low/t0\.png"):
        LowLightDataModule(root=str(root)).setup("test")


def test_empty_folder_and_missing_root_and_unknown_layout(tmp_path):
    (tmp_path / "empty" / "low").mkdir(parents=True)
    (tmp_path / "empty" / "high").mkdir()
    with pytest.raises(EmptyDatasetError, match="empty/low: holds no images"):
        find_pairs(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="nowhere: dataset root does not exist"):
        LowLightDataModule(root=str(tmp_path / "nowhere")).setup("test")
    (tmp_path / "other" / "stuff").mkdir(parents=True)
    with pytest.raises(LayoutError, match="other: no LOL-v1"):
        LowLightDataModule(root=str(tmp_path / "other")).setup("test")


def test_flat_pairs_cannot_be_trained_on(tmp_path):
    write_pairs(tmp_path / "flat", ["x"], [(16, 16)])
    with pytest.raises(DatasetNotFoundError, match="has no train split"):
        LowLightDataModule(root=str(tmp_path / "flat")).setup("fit")


def test_predict_refuses_to_overwrite_existing_outputs(tmp_path):
    write_pairs(tmp_path / "in", ["a", "b"], [(8, 8)] * 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"keep me")
    dm = LowLightDataModule(predict_dir=str(tmp_path / "in" / "low"), predict_output_dir=str(out))
    with pytest.raises(OutputExistsError, match=r"out/b\.png: already exists"):
        dm.setup("predict")
    assert (out / "b.png").read_bytes() == b"keep me"
    assert not (out / "a.png").exists()


def test_write_prediction_keeps_names(tmp_path):
    dm = LowLightDataModule(predict_output_dir=str(tmp_path / "out"))
    dm.write_prediction(torch.rand(2, 3, 5, 7), ["one.png", "two.jpg"])
    assert not (tmp_path / "out").exists()  # staged until predict ends
    dm.finish_predictions()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["one.png", "two.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staging folder is gone
