"""Class-folder scene datasets: layouts, stratified and explicit splits, errors, the built-in set."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.builtin_scenes import CLASSES, render_scene, write_builtin_scenes
from data.errors import DatasetNotFoundError, EmptyDatasetError, LayoutError, OutputExistsError, SplitError, UnreadableFileError
from data.scene_folders import (
    SceneClassificationDataModule,
    find_class_root,
    read_split_files,
    scan_classes,
    stratified_split,
)

SUFFIXES = (".png", ".jpg", ".tif")


def write_class_folders(root: Path, classes: dict[str, int], size: int = 24, seed: int = 0) -> Path:
    """``root/<class>/<class>_<i>.<png|jpg|tif>``: each class a distinct mean colour plus noise."""
    rng = np.random.default_rng(seed)
    for k, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        colour = np.array([(k * 70) % 256, (k * 130 + 40) % 256, (k * 50 + 90) % 256])
        for i in range(count):
            pixels = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:02d}{SUFFIXES[i % 3]}")
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_class_folders(tmp_path / "AID", {"beach": 10, "forest": 10, "river": 10})


def _module(root, tmp_path, **kwargs) -> SceneClassificationDataModule:
    defaults = dict(root=str(root), image_size=16, train_ratio=0.5, val_ratio=0.2, batch_size=4, eval_batch_size=4)
    return SceneClassificationDataModule(**{**defaults, **kwargs})


# -- layouts ------------------------------------------------------------------------------------


def test_uc_merced_layout_descends_to_the_class_folders(tmp_path):
    write_class_folders(tmp_path / "UCMerced_LandUse" / "Images", {"a": 2, "b": 2})
    assert find_class_root(tmp_path / "UCMerced_LandUse") == tmp_path / "UCMerced_LandUse" / "Images"
    assert find_class_root(tmp_path) == tmp_path / "UCMerced_LandUse" / "Images"


def test_scan_lists_classes_and_images_sorted(dataset):
    classes = scan_classes(dataset)
    assert list(classes) == ["beach", "forest", "river"]
    assert classes["beach"][:3] == ["beach/beach_00.png", "beach/beach_01.jpg", "beach/beach_02.tif"]


# -- splits -----------------------------------------------------------------------------------


def test_stratified_split_has_the_protocol_counts_per_class_and_is_seeded(dataset):
    classes = scan_classes(dataset)
    splits = stratified_split(classes, train_ratio=0.5, val_ratio=0.2, seed=0)
    for name in classes:
        counts = [sum(f.startswith(name + "/") for f in splits[s]) for s in ("train", "val", "test")]
        assert counts == [4, 1, 5]  # 50 % train (of which 20 % val), the rest test
    everything = sorted(f for s in splits.values() for f in s)
    assert everything == sorted(f for files in classes.values() for f in files)  # a partition
    assert stratified_split(classes, 0.5, 0.2, seed=0) == splits
    assert stratified_split(classes, 0.5, 0.2, seed=1) != splits


def test_split_is_written_once_and_read_back_by_later_runs(dataset, tmp_path):
    split_dir = tmp_path / "splits"
    dm = _module(dataset, tmp_path, split_dir=str(split_dir))
    dm.setup("fit")
    assert sorted(p.name for p in split_dir.iterdir()) == ["test.txt", "train.txt", "val.txt"]
    assert "train_ratio=0.5" in (split_dir / "train.txt").read_text().splitlines()[0]
    # a later run with another seed reads the written split instead of drawing a new one
    (split_dir / "test.txt").write_text("beach/beach_00.png\nforest/forest_00.png\nriver/river_00.png\n")
    (split_dir / "train.txt").write_text("beach/beach_01.jpg\nforest/forest_01.jpg\nriver/river_01.jpg\n")
    (split_dir / "val.txt").write_text("beach/beach_02.tif\nforest/forest_02.tif\nriver/river_02.tif\n")
    again = _module(dataset, tmp_path, split_dir=str(split_dir), split_seed=7)
    again.setup("fit")
    again.setup("test")
    assert again.datasets["test"].files == ["beach/beach_00.png", "forest/forest_00.png", "river/river_00.png"]
    assert len(again.datasets["train"]) == 3


def test_split_files_in_the_root_are_used(dataset, tmp_path):
    for split in ("train", "val", "test"):
        index = {"train": 1, "val": 2, "test": 3}[split]
        lines = [f"# explicit {split} split"] + [f"{c}/{c}_{index:02d}{SUFFIXES[index % 3]}" for c in ("beach", "forest", "river")]
        (dataset / f"{split}.txt").write_text("\n".join(lines) + "\n")
    dm = _module(dataset, tmp_path)
    dm.setup("test")
    assert dm.datasets["test"].files == ["beach/beach_03.png", "forest/forest_03.png", "river/river_03.png"]


def test_default_split_goes_to_the_cache_and_names_the_protocol(dataset, tmp_path):
    dm = _module(dataset, tmp_path)
    dm.setup("fit")
    assert "scene_splits" in str(dm.split_folder) and (dm.split_folder / "train.txt").is_file()
    assert dm.dataset_name == "AID (train 50%, seed 0)"
    assert dm.class_names == ["beach", "forest", "river"] and dm.num_classes == 3


# -- batches ----------------------------------------------------------------------------------


def test_batches_hold_resized_images_in_unit_range_labels_and_names(dataset, tmp_path):
    dm = _module(dataset, tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["label"].dtype == torch.int64 and len(batch["name"]) == 4
    plain = next(iter(dm.plain_train_dataloader()))
    for name, label in zip(plain["name"], plain["label"]):
        assert dm.class_names[label] == name.split("/")[0]


def test_training_augmentation_follows_the_draws_seed_and_evaluation_is_repeatable(dataset, tmp_path):
    dm = _module(dataset, tmp_path)
    dm.setup("fit")
    train = dm.datasets["train"]
    first, again, other = train[(0, 11)]["image"], train[(0, 11)]["image"], train[(0, 12)]["image"]
    torch.testing.assert_close(first, again)  # a resumed fit replays the same augmentation
    assert not torch.equal(first, other)
    torch.testing.assert_close(dm.datasets["val"][0]["image"], dm.datasets["val"][0]["image"])


def test_predict_lists_a_folder_and_writes_one_csv(dataset, tmp_path):
    out = tmp_path / "out"
    dm = _module(dataset, tmp_path, predict_dir=str(dataset / "beach"), predict_output_dir=str(out))
    dm.setup("predict")
    dm.class_names = ["beach", "forest", "river"]
    batch = next(iter(dm.predict_dataloader()))
    probs = torch.tensor([[0.1, 0.7, 0.2]]).expand(len(batch["name"]), 3)
    dm.write_prediction(probs, batch["name"])
    assert not (out / "predictions.csv").exists()  # staged until predict succeeds
    dm.finish_predictions()
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "name,class,probability" and lines[1] == "beach_00.png,forest,0.700000"
    with pytest.raises(OutputExistsError, match="predictions.csv"):
        dm.setup("predict")


# -- errors name what is wrong ------------------------------------------------------------------


def test_corrupt_image_raises_an_error_naming_it(dataset, tmp_path):
    (dataset / "beach" / "beach_00.png").write_bytes(b"not an image")
    dm = _module(dataset, tmp_path, train_ratio=0.9, val_ratio=0.0, split_dir=str(tmp_path / "s"))
    (tmp_path / "s").mkdir()
    for split, files in (("train", ["beach/beach_00.png", "forest/forest_00.png", "river/river_00.png"]),
                         ("val", ["beach/beach_01.jpg", "forest/forest_01.jpg", "river/river_01.jpg"]),
                         ("test", ["beach/beach_02.tif", "forest/forest_02.tif", "river/river_02.tif"])):  # fmt: skip
        (tmp_path / "s" / f"{split}.txt").write_text("\n".join(files))
    dm.setup("fit")
    with pytest.raises(UnreadableFileError, match=r"beach_00\.png: cannot decode image"):
        dm.datasets["train"][0]


def test_empty_class_folder_raises_an_error_naming_it(dataset, tmp_path):
    (dataset / "desert").mkdir()
    with pytest.raises(EmptyDatasetError, match=r"desert: class folder holds no images"):
        _module(dataset, tmp_path).setup("fit")


def test_class_missing_from_a_split_raises_an_error_naming_the_class(dataset, tmp_path):
    split_dir = tmp_path / "splits"
    _module(dataset, tmp_path, split_dir=str(split_dir)).setup("fit")
    lines = (split_dir / "test.txt").read_text().splitlines()
    (split_dir / "test.txt").write_text("\n".join(line for line in lines if not line.startswith("forest/")))
    with pytest.raises(SplitError, match=r"test\.txt: class 'forest' has no image in the test split"):
        _module(dataset, tmp_path, split_dir=str(split_dir)).setup("test")


def test_too_few_images_for_the_ratios_names_the_class(tmp_path):
    root = write_class_folders(tmp_path / "data", {"big": 10, "tiny": 2})
    with pytest.raises(SplitError, match=r"tiny: class has 2 images: too few"):
        _module(root, tmp_path).setup("fit")


def test_listed_but_missing_and_twice_listed_files_are_errors(dataset, tmp_path):
    split_dir = tmp_path / "splits"
    _module(dataset, tmp_path, split_dir=str(split_dir)).setup("fit")
    train = (split_dir / "train.txt").read_text()
    (split_dir / "train.txt").write_text(train + "beach/gone.png\n")
    with pytest.raises(DatasetNotFoundError, match=r"beach/gone\.png: listed in .*train\.txt but missing"):
        read_split_files(split_dir, dataset, ["beach", "forest", "river"])
    first_test = [line for line in (split_dir / "test.txt").read_text().splitlines() if not line.startswith("#")][0]
    (split_dir / "train.txt").write_text(train + first_test + "\n")
    with pytest.raises(SplitError, match="also listed in train.txt"):
        read_split_files(split_dir, dataset, ["beach", "forest", "river"])


def test_a_root_without_class_folders_is_a_layout_error(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(LayoutError, match="holds no class folders"):
        _module(tmp_path / "flat", tmp_path).setup("fit")


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="dataset root does not exist"):
        _module(tmp_path / "nowhere", tmp_path).setup("fit")


# -- the built-in set ---------------------------------------------------------------------------


def test_builtin_scenes_are_written_in_uc_merced_layout_and_deterministic(tmp_path):
    write_builtin_scenes(tmp_path / "a", images_per_class=2, size=48)
    images = tmp_path / "a" / "UCMerced_LandUse" / "Images"
    assert sorted(p.name for p in images.iterdir()) == sorted(CLASSES) and len(CLASSES) >= 10
    first = images / "forest" / "forest00.tif"
    with Image.open(first) as image:
        assert image.format == "TIFF" and image.size == (48, 48) and image.mode == "RGB"
    write_builtin_scenes(tmp_path / "b", images_per_class=1, size=48)
    assert (tmp_path / "b" / "UCMerced_LandUse" / "Images" / "forest" / "forest00.tif").read_bytes() == first.read_bytes()


def test_every_class_renders_varied_scenes():
    for name in CLASSES:
        a, b = (render_scene(name, 64, np.random.default_rng([1, i])) for i in range(2))
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert a.std() > 3 and np.abs(a.astype(int) - b.astype(int)).mean() > 3, name


def test_builtin_datamodule_reads_the_generated_set(tmp_path):
    dm = SceneClassificationDataModule(image_size=32, train_ratio=0.5, val_ratio=0.5, builtin_images_per_class=4, builtin_size=48)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == len(CLASSES) and dm.dataset_name.startswith("built-in (UC Merced layout)")
    assert len(dm.datasets["train"]) == len(dm.datasets["val"]) == len(CLASSES)
