"""S3DIS, ScanNet and .ply/.pcd loaders on tiny fixtures of each layout, and their error messages."""

from pathlib import Path

import numpy as np
import pytest
import torch

from data.base import cache_root
from data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    InvalidValueError,
    LabelRangeError,
    MissingPairError,
    OutputExistsError,
    ShapeMismatchError,
    UnreadableFileError,
)
from data.point_cloud import IGNORE_INDEX, PointCloudDataset, PthScene, read_labels, write_point_file
from data.point_files import PointFileDataModule
from data.s3dis import S3DISDataModule
from data.scannet import ScanNetDataModule

NO_AUGMENTATION = [{"name": "center_shift"}]


def scene_arrays(n: int, seed: int, classes: int = 13):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 3, (n, 3)).astype(np.float32), rng.integers(0, 256, (n, 3)).astype(np.uint8), rng.integers(0, classes, n)


def write_raw_room(room: Path, objects: dict[str, int], seed: int = 0) -> int:
    """Annotations/<class>_<i>.txt files with the given point counts; returns the total."""
    (room / "Annotations").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, n in objects.items():
        rows = np.concatenate([rng.uniform(0, 3, (n, 3)), rng.integers(0, 256, (n, 3))], 1)
        np.savetxt(room / "Annotations" / f"{name}.txt", rows, fmt="%.3f %.3f %.3f %d %d %d")
    return sum(objects.values())


def write_npy_room(room: Path, n: int, seed: int, segment_name: str = "segment.npy", normals: bool = False):
    room.mkdir(parents=True)
    coord, color, segment = scene_arrays(n, seed)
    np.save(room / "coord.npy", coord)
    np.save(room / "color.npy", color)
    np.save(room / segment_name, segment.astype(np.int16))
    if normals:
        np.save(room / "normal.npy", np.tile([[0.0, 0.0, 1.0]], (n, 1)).astype(np.float32))
    return coord, color, segment


def datamodule(cls, root, **kwargs):
    return cls(root=str(root), train_transforms=NO_AUGMENTATION, eval_transforms=NO_AUGMENTATION, **kwargs)


# -- S3DIS ------------------------------------------------------------------------------------------


def test_s3dis_raw_layout_is_converted_once_and_maps_stairs_to_clutter(tmp_path):
    root = tmp_path / "Stanford3dDataset_v1.2_Aligned_Version"  # Area folders one level down
    write_raw_room(root / "Area_1" / "office_1", {"chair_1": 20, "wall_1": 30, "stairs_1": 5})
    write_raw_room(root / "Area_5" / "office_1", {"table_1": 10, "floor_1": 15})
    dm = datamodule(S3DISDataModule, tmp_path)
    dm.setup("fit")
    (sample,) = list(dm.datasets["train"])
    assert sample["name"] == "Area_1/office_1" and sample["coord"].shape == (55, 3) and sample["feat"].shape == (55, 3)
    counts = torch.bincount(sample["segment"], minlength=13)
    assert counts[8] == 20 and counts[2] == 30 and counts[12] == 5  # chair, wall, stairs -> clutter
    assert 0 <= float(sample["feat"].min()) and float(sample["feat"].max()) <= 1
    assert len(dm.datasets["val"]) == 1  # val area defaults to the test area, 5
    converted = dm.areas()[1][0].path
    assert converted.is_relative_to(cache_root()) and (converted / "segment.npy").is_file()
    again = datamodule(S3DISDataModule, tmp_path)
    assert again.areas()[1][0].path == converted  # converted once, then reused


def test_s3dis_raw_line_that_is_not_six_numbers_names_file_and_line(tmp_path):
    write_raw_room(tmp_path / "Area_1" / "office_1", {"ceiling_1": 4})
    path = tmp_path / "Area_1" / "office_1" / "Annotations" / "ceiling_1.txt"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(" ", "\x10 ", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UnreadableFileError, match=r"ceiling_1.txt: line 3 is not six numbers"):
        datamodule(S3DISDataModule, tmp_path).areas()


def test_s3dis_raw_unknown_class_is_refused(tmp_path):
    write_raw_room(tmp_path / "Area_1" / "office_1", {"lamp_1": 4})
    with pytest.raises(LabelRangeError, match=r"lamp_1.txt: class 'lamp'"):
        datamodule(S3DISDataModule, tmp_path).areas()


def test_s3dis_npy_and_pth_layouts_read_the_same_scene(tmp_path):
    coord, color, segment = write_npy_room(tmp_path / "npy" / "Area_5" / "conferenceRoom_1", 40, seed=1)
    (tmp_path / "pth" / "Area_5").mkdir(parents=True)
    torch.save({"coord": coord, "color": color, "semantic_gt": segment.reshape(-1, 1)}, tmp_path / "pth" / "Area_5" / "conferenceRoom_1.pth")
    samples = []
    for layout in ("npy", "pth"):
        dm = datamodule(S3DISDataModule, tmp_path / layout)
        dm.setup("test")
        samples.append(dm.datasets["test"][0])
    assert samples[0]["name"] == samples[1]["name"] == "Area_5/conferenceRoom_1"
    for key in ("coord", "feat", "segment"):
        torch.testing.assert_close(samples[0][key], samples[1][key])
    torch.testing.assert_close(samples[0]["segment"], torch.from_numpy(segment))


@pytest.mark.parametrize(
    "problem,error,message",
    [
        ("nan", InvalidValueError, r"coord.npy: 1 of 30 points have NaN"),
        ("empty", EmptyDatasetError, r"coord.npy: scene has no points"),
        ("short_labels", ShapeMismatchError, r"segment.npy: has 29 labels for 30 points"),
        ("label_range", LabelRangeError, r"segment.npy: label 13 outside 0..12"),
    ],
)
def test_broken_scene_files_raise_errors_naming_the_file(tmp_path, problem, error, message):
    room = tmp_path / "Area_5" / "office_1"
    coord, _, segment = write_npy_room(room, 30, seed=2)
    if problem == "nan":
        coord[4, 1] = np.nan
        np.save(room / "coord.npy", coord)
    elif problem == "empty":
        np.save(room / "coord.npy", np.zeros((0, 3), np.float32))
        np.save(room / "color.npy", np.zeros((0, 3), np.uint8))
        np.save(room / "segment.npy", np.zeros(0, np.int16))
    elif problem == "short_labels":
        np.save(room / "segment.npy", segment[:29])
    else:
        segment[0] = 13
        np.save(room / "segment.npy", segment)
    dm = datamodule(S3DISDataModule, tmp_path)
    dm.setup("test")
    with pytest.raises(error, match=message):
        dm.datasets["test"][0]


def test_labels_stored_as_whole_floats_are_classes_and_text_labels_may_hold_comments(tmp_path):
    room = tmp_path / "Area_5" / "office_1"
    _, _, segment = write_npy_room(room, 30, seed=2)
    np.save(room / "segment.npy", segment.astype(np.float32))  # some exports store labels as floats
    dm = datamodule(S3DISDataModule, tmp_path)
    dm.setup("test")
    torch.testing.assert_close(dm.datasets["test"][0]["segment"], torch.from_numpy(segment))
    labels = tmp_path / "scan.labels"
    labels.write_text("# class per point\n3\n\n1.0\n255\n")
    assert read_labels(labels).tolist() == [3, 1, 255]
    labels.write_text("3\n1 2\n")
    with pytest.raises(UnreadableFileError, match=r"scan.labels: line 2 is not one integer label: '1 2'"):
        read_labels(labels)


def test_truncated_npy_array_is_named(tmp_path):
    room = tmp_path / "Area_5" / "office_1"
    write_npy_room(room, 300, seed=2)
    data = (room / "coord.npy").read_bytes()
    (room / "coord.npy").write_bytes(data[: len(data) // 2])
    dm = datamodule(S3DISDataModule, tmp_path)
    dm.setup("test")
    with pytest.raises(UnreadableFileError, match=r"coord.npy: cannot read .npy array"):
        dm.datasets["test"][0]


def test_missing_test_area_is_named(tmp_path):
    write_npy_room(tmp_path / "Area_1" / "office_1", 20, seed=1)
    write_npy_room(tmp_path / "Area_2" / "office_1", 20, seed=2)
    dm = datamodule(S3DISDataModule, tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"no Area_5 for the test split \(areas: \[1, 2\]\)"):
        dm.setup("test")


def test_training_keys_draw_their_augmentation_from_their_seed(tmp_path):
    coord, color, segment = scene_arrays(400, seed=5)
    torch.save({"coord": coord, "color": color, "semantic_gt": segment}, tmp_path / "room.pth")
    from data.point_transforms import DEFAULT_TRAIN, Compose

    dataset = PointCloudDataset([PthScene("room", tmp_path / "room.pth")], Compose(DEFAULT_TRAIN), ("color",), 13)
    torch.manual_seed(1)  # global random state must not matter
    first = dataset[(0, 123)]
    torch.manual_seed(2)
    again, other = dataset[(0, 123)], dataset[(0, 124)]
    for key in ("coord", "feat", "segment"):
        torch.testing.assert_close(first[key], again[key])
    assert first["coord"].shape != other["coord"].shape or not torch.equal(first["coord"], other["coord"])
    torch.testing.assert_close(dataset[0]["coord"], dataset[0]["coord"])  # evaluation keys: plain and fixed


# -- ScanNet ----------------------------------------------------------------------------------------


def test_scannet_npy_layout_with_normals_and_ignored_labels(tmp_path):
    _, _, segment = write_npy_room(tmp_path / "val" / "scene0011_00", 25, seed=3, segment_name="segment20.npy", normals=True)
    segment = segment % 20
    segment[:3] = [-1, 255, 19]
    np.save(tmp_path / "val" / "scene0011_00" / "segment20.npy", segment)
    dm = datamodule(ScanNetDataModule, tmp_path)
    dm.setup("test")
    sample = dm.datasets["test"][0]
    assert sample["feat"].shape == (25, 6)  # colour and normals
    assert sample["segment"][:3].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 19]


def test_scannet_pth_layout_uses_semantic_gt20(tmp_path):
    (tmp_path / "train").mkdir()
    coord, color, segment = scene_arrays(12, seed=4, classes=20)
    normal = np.tile([[1.0, 0.0, 0.0]], (12, 1)).astype(np.float32)
    torch.save({"coord": coord, "color": color, "normal": normal, "semantic_gt20": segment, "semantic_gt200": segment + 50},
               tmp_path / "train" / "scene0000_00.pth")  # fmt: skip
    dm = datamodule(ScanNetDataModule, tmp_path)
    sample = dm._dataset("train", dm.scenes("train"))[0]
    assert sample["segment"].tolist() == segment.tolist() and sample["feat"].shape == (12, 6)


# -- .ply / .pcd with label files ---------------------------------------------------------------------


def write_point_cloud_split(folder: Path, names: list[str], n: int = 30, labels: str = ".labels") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        coord, color, segment = scene_arrays(n + i, seed=10 + i, classes=3)
        write_point_file(folder / name, coord, color / 255.0)
        stem = folder / Path(name).stem
        if labels == ".npy":
            np.save(stem.with_suffix(".npy"), segment)
        else:
            np.savetxt(stem.with_suffix(labels), segment, fmt="%d")


def test_point_files_ply_and_pcd_with_label_files(tmp_path):
    write_point_cloud_split(tmp_path / "train", ["a.ply", "b.pcd"])
    write_point_cloud_split(tmp_path / "test", ["c.ply"], labels=".npy")
    (tmp_path / "classes.txt").write_text("floor\nwall\nchair\n")
    dm = datamodule(PointFileDataModule, tmp_path)
    assert dm.class_names == ("floor", "wall", "chair")
    dm.setup("fit")
    names = [s["name"] for s in dm.datasets["train"]]
    assert names == ["train/a.ply", "train/b.pcd"] and len(dm.datasets["val"]) == 1  # no val/: test/
    sample = dm.datasets["train"][1]
    assert sample["coord"].shape == (31, 3) and int(sample["segment"].max()) <= 2


def test_point_file_without_labels_or_with_wrong_count_is_named(tmp_path):
    write_point_cloud_split(tmp_path / "train", ["a.ply"])
    (tmp_path / "train" / "a.labels").unlink()
    dm = datamodule(PointFileDataModule, tmp_path, class_names=["x", "y", "z"])
    with pytest.raises(MissingPairError, match=r"a.ply: no label file beside it"):
        dm.setup("fit")
    np.savetxt(tmp_path / "train" / "a.labels", np.zeros(7, int), fmt="%d")
    with pytest.raises(ShapeMismatchError, match=r"a.labels: has 7 labels for 30 points"):
        dm._dataset("train", dm.scenes("train"))[0]


@pytest.mark.parametrize("suffix,ascii", [(".ply", False), (".ply", True), (".pcd", False), (".pcd", True)])
def test_truncated_point_file_is_named(tmp_path, suffix, ascii):
    import open3d as o3d

    coord, color, _ = scene_arrays(500, seed=3)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(coord.astype(np.float64)))
    cloud.colors = o3d.utility.Vector3dVector(color / 255.0)
    path = tmp_path / f"scan{suffix}"
    o3d.io.write_point_cloud(str(path), cloud, write_ascii=ascii)
    from data.point_cloud import read_point_file

    assert len(read_point_file(path)["coord"]) == 500
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    # open3d alone reads a cut ASCII file as whole, the missing points set to zero
    with pytest.raises(UnreadableFileError, match=rf"scan{suffix}: truncated: .* for the 500 points its header announces"):
        read_point_file(path)
    path.write_bytes(data[:20])
    with pytest.raises(UnreadableFileError, match=rf"scan{suffix}: no .ply / .pcd header"):
        read_point_file(path)


def test_predictions_are_written_as_coloured_point_files_and_never_overwritten(tmp_path):
    import open3d as o3d

    write_point_cloud_split(tmp_path / "in", ["a.ply", "b.pcd"], n=10)
    dm = PointFileDataModule(class_names=["x", "y", "z"], predict_dir=str(tmp_path / "in"), predict_output_dir=str(tmp_path / "out"))
    dm.setup("predict")
    probabilities = torch.zeros(21, 3)
    probabilities[:10, 1] = 1
    probabilities[10:, 2] = 1
    dm.write_prediction(probabilities, ["a.ply", "b.pcd"])
    assert not (tmp_path / "out").exists()  # staged until predict ends
    dm.finish_predictions()
    written = o3d.io.read_point_cloud(str(tmp_path / "out" / "b.pcd"))
    assert len(written.points) == 11 and written.has_colors()
    assert np.loadtxt(tmp_path / "out" / "a.labels").tolist() == [1] * 10
    with pytest.raises(OutputExistsError):
        dm.setup("predict")
