"""Every dataset format against every kind of bad input (issue 9, "Faults and bad input").

One table: a row per dataset format of ``data/``, a column per fault. Each cell writes a tiny valid
dataset with the fixture writers the format's own tests use, breaks one thing, and runs the loader
as a fit or test run does (``prepare_data``, ``setup``, then every batch of the stage's loaders).
It then checks that

* a ``DatasetError`` subclass (``data/errors.py``) of the expected kind is raised: nothing is
  skipped silently, no NaN reaches a batch, no raw numpy / PIL / h5py / open3d exception leaks;
* its message is a single line and names the offending file or folder;
* nothing was written under the test's folder, and no input was changed. The cache (converted
  volumes, registration features) is pointed inside that folder and watched too: it may gain
  only finished entries, renamed into place once whole (a NIfTI fit converts the valid training
  volumes in ``prepare_data`` before a test split's fault is met), never a staging folder, a
  temporary file or a partial output.

Cells that cannot occur in a format are listed in ``NOT_APPLICABLE`` with the reason, and
``test_the_matrix_is_complete`` checks that every format meets every fault one way or the other.
Where a format's own test file already covers a cell the same way, the cell is still listed here
(the table is the documentation) and its comment points to that test.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import nibabel as nib
import numpy as np
import open3d as o3d
import pytest

from data.echo_uda import EchoUDADataModule
from data.errors import (
    BadPointCloudError,
    DatasetError,
    DatasetNotFoundError,
    EmptyDatasetError,
    IntensityRangeError,
    InvalidValueError,
    LabelRangeError,
    LayoutError,
    MissingPairError,
    SplitError,
    UnreadableFileError,
)
from data.kitti_odometry import KittiOdometryDataModule
from data.lol import LowLightDataModule
from data.point_cloud import write_point_file
from data.point_files import PointFileDataModule
from data.registration_pairs import RegistrationPairsDataModule
from data.s3dis import S3DISDataModule
from data.scannet import ScanNetDataModule
from data.scene_folders import SceneClassificationDataModule
from data.synapse import SynapseDataModule
from data.threedmatch import ThreeDMatchDataModule, write_gt_log
from tests.conftest import write_lol_v1
from tests.data.synapse_files import write_nifti_case, write_raw_synapse, write_transunet
from tests.data.test_echo_data import write_camus_mhd, write_camus_nifti, write_cardiac_uda, write_echonet
from tests.data.test_point_datasets import scene_arrays, write_npy_room, write_point_cloud_split, write_raw_room
from tests.data.test_registration_data import random_motion, room_points, write_benchmark_scene, write_ply
from tests.data.test_scene_folders import write_class_folders

FAULTS = ("truncated", "missing_split", "empty_folder", "nan", "inf", "label_range", "value_range")
FORMATS = (
    "lol", "scene_folders", "synapse_npz_h5", "nifti", "camus", "echonet", "cardiac_uda",
    "s3dis", "scannet", "point_files", "threedmatch", "kitti", "registration_pairs",
)  # fmt: skip

#: (format, fault) -> why the fault cannot occur in that format
NOT_APPLICABLE = {
    ("lol", "nan"): "images decode to 8-bit RGB, which holds no NaN, and have no coordinates",
    ("lol", "inf"): "images decode to 8-bit RGB, which holds no infinity, and have no coordinates",
    ("lol", "label_range"): "no labels: the targets are reference images",
    ("scene_folders", "nan"): "images decode to 8-bit RGB, which holds no NaN, and have no coordinates",
    ("scene_folders", "inf"): "images decode to 8-bit RGB, which holds no infinity, and have no coordinates",
    ("scene_folders", "label_range"): "an image's label is the name of its class folder, so it cannot fall outside the classes",
    ("lol", "value_range"): "images decode to 8-bit RGB, which holds only 0..255",
    ("scene_folders", "value_range"): "images decode to 8-bit RGB, which holds only 0..255",
    ("nifti", "value_range"): "CT in Hounsfield units has no fixed range: every value is windowed to [0, 1] as TransUNet does",
    ("camus", "value_range"): "pixels have no fixed range here: a video is scaled to [0, 1] by its type (8-bit by 255, wider by its maximum)",
    ("echonet", "value_range"): "videos are 8-bit AVI, which holds only 0..255 (a tracing outside the frame is a label_range cell)",
    ("cardiac_uda", "value_range"): "pixels have no fixed range here: a video is scaled to [0, 1] by its type (8-bit by 255, wider by its maximum)",
    ("threedmatch", "value_range"): "fragments hold coordinates only, which have no fixed range (a gt.log matrix that is no motion: label_range)",
    ("kitti", "value_range"): "scans hold coordinates, which have no fixed range, and a reflectance that registration does not read",
    ("registration_pairs", "value_range"): "clouds hold coordinates only, which have no fixed range (a transform that is no motion: label_range)",
}
# For the other formats the columns read as follows. Volumes and videos have no coordinates:
# their NaN / inf cells put a non-finite value into a float image, video or tracing (EchoNet's
# tracings are coordinates). Registration data has no class labels: its label_range cells give
# a ground truth that points outside the data (a gt.log pair naming a fragment that does not
# exist, fewer KITTI poses than scans, a transform that is not a rigid motion). A label that is
# not a whole number (1.5, NaN) is a label_range or nan cell: a cast to integers would truncate
# it silently. value_range cells hold a value outside the range the format defines for it: a
# colour past 0..255 (stored as 8 bits it would wrap), CT outside TransUNet's windowed [0, 1].


@dataclass
class Case:
    """A broken dataset: ``run`` loads it, ``culprit`` must be named, ``error`` must be raised,
    and its message must contain ``says`` (the line of a text file, the value at fault)."""

    run: Callable[[], None]
    culprit: Path
    error: type[DatasetError]
    says: str = ""


CASES: dict[tuple[str, str, str], Callable[[Path], Case]] = {}


def cell(fmt: str, fault: str, variant: str = ""):
    """Register a case builder for one cell of the table (``variant`` tells apart two of a cell)."""

    def register(build: Callable[[Path], Case]) -> Callable[[Path], Case]:
        assert fmt in FORMATS and fault in FAULTS and (fmt, fault, variant) not in CASES
        CASES[(fmt, fault, variant)] = build
        return build

    return register


# -- running a loader and watching the disk --------------------------------------------------------


LOADERS = {"fit": ("train_dataloader", "val_dataloader"), "test": ("test_dataloader",)}


def load(make: Callable[[], object], *stages: str) -> Callable[[], None]:
    """A run of ``stages`` as the trainer drives a datamodule: prepare, set up, every batch."""

    def run() -> None:
        for stage in stages:
            datamodule = make()
            datamodule.prepare_data()
            datamodule.setup(stage)
            for name in LOADERS[stage]:
                for _ in getattr(datamodule, name)():
                    pass

    return run


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` with its kind, size and modification time."""
    state = {}
    for path in folder.rglob("*"):
        info = path.stat()
        state[str(path.relative_to(folder))] = ("dir",) if path.is_dir() else ("file", info.st_size, info.st_mtime_ns)
    return state


def finished_cache_entry(tmp: Path, path: str, state: dict[str, tuple]) -> bool:
    """Whether a new path is allowed: an empty folder of the cache, or a file of a finished
    ``build_once`` entry (the valid volumes a fit converted before it met the broken one; such an
    entry is renamed into place only once whole, and carries its GENERATOR.json)."""
    relative = Path(path)
    if not relative.is_relative_to("cache") or any(part.startswith(".") for part in relative.parts):
        return False  # outside the cache, or a staging folder / temporary file left behind
    if state[path] == ("dir",):
        return True
    entry = tmp / Path(*relative.parts[:2])
    return len(relative.parts) > 2 and (entry / "GENERATOR.json").is_file()


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def with_token(path: Path, token: str) -> Path:
    """Rewrite a .ply / .pcd as ASCII with ``token`` as the y coordinate of its third point."""
    o3d.io.write_point_cloud(str(path), o3d.io.read_point_cloud(str(path)), write_ascii=True)
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(("end_header", "DATA"))) + 1
    fields = lines[start + 2].split()
    fields[1] = token
    lines[start + 2] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")
    return path


def poke_nifti(path: Path, value: float) -> Path:
    """Store ``path`` as float32 with one voxel set to ``value`` (NaN or inf)."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[(0,) * data.ndim] = value
    nib.save(nib.Nifti1Image(data, image.affine), str(path))
    return path


# -- LOL (data/lol.py) ------------------------------------------------------------------------------


def lol(root: Path) -> Callable[[], None]:
    return load(lambda: LowLightDataModule(root=str(root), patch_size=8, batch_size=1), "test")


def lol_root(tmp: Path) -> Path:
    return write_lol_v1(tmp / "lol", n_train=2, test_sizes=((12, 16), (12, 16)))


@cell("lol", "truncated")  # as test_lol.py::test_unreadable_image_names_the_file
def _(tmp):
    root = lol_root(tmp)
    broken = root / "eval15" / "high" / "t1.png"
    broken.write_bytes(broken.read_bytes()[:60])  # the header survives, the pixels do not
    return Case(lol(root), broken, UnreadableFileError)


@cell("lol", "missing_split")
def _(tmp):
    root = lol_root(tmp)
    shutil.rmtree(root / "eval15")
    return Case(lol(root), root, DatasetNotFoundError)


@cell("lol", "empty_folder")  # as test_lol.py::test_empty_folder_and_missing_root_and_unknown_layout
def _(tmp):
    root = lol_root(tmp)
    for path in (root / "eval15").rglob("*.png"):
        path.unlink()
    return Case(lol(root), root / "eval15" / "low", EmptyDatasetError)


# -- AID / NWPU / UC Merced class folders (data/scene_folders.py) -----------------------------------


def scene_root(tmp: Path) -> Path:
    """Two classes of three images, with explicit split files (so no split is drawn and written)."""
    root = write_class_folders(tmp / "AID", {"beach": 3, "forest": 3}, size=8)
    for split, index in (("train", 0), ("val", 1), ("test", 2)):
        (root / f"{split}.txt").write_text("".join(f"{name}/{name}_{index:02d}{('.png', '.jpg', '.tif')[index]}\n" for name in ("beach", "forest")))
    return root


def scenes(root: Path) -> Callable[[], None]:
    make = lambda: SceneClassificationDataModule(root=str(root), image_size=8, augment=False, batch_size=1)  # noqa: E731
    return load(make, "fit", "test")


@cell("scene_folders", "truncated")
def _(tmp):
    root = scene_root(tmp)
    return Case(scenes(root), truncate(root / "forest" / "forest_01.jpg"), UnreadableFileError)


@cell("scene_folders", "missing_split")
def _(tmp):
    root = scene_root(tmp)
    (root / "test.txt").unlink()
    return Case(scenes(root), root / "test.txt", DatasetNotFoundError)


@cell("scene_folders", "empty_folder")  # as test_scene_folders.py::test_empty_class_folder_raises_an_error_naming_it
def _(tmp):
    root = scene_root(tmp)
    (root / "desert").mkdir()
    return Case(scenes(root), root / "desert", EmptyDatasetError)


# -- Synapse, TransUNet's npz / h5 (data/synapse.py) ------------------------------------------------

NO_AUGMENTATION = dict(flip_p=0, affine_p=0, deform_p=0, noise_p=0, blur_p=0, contrast_p=0)


def synapse(root: Path, *stages: str) -> Callable[[], None]:
    return load(lambda: SynapseDataModule(root=str(root), img_size=32, batch_size=1, **NO_AUGMENTATION), *stages)


def transunet_root(tmp: Path, lists: bool = True) -> Path:
    return write_transunet(tmp / "synapse", train_cases={"case0005": 2}, test_cases=("case0001",), lists=lists)


@cell("synapse_npz_h5", "truncated")  # as test_synapse.py::test_a_truncated_file_is_named
def _(tmp):
    root = transunet_root(tmp)
    return Case(synapse(root, "test"), truncate(root / "test_vol_h5" / "case0001.npy.h5"), UnreadableFileError)


@cell("synapse_npz_h5", "missing_split")  # as test_synapse.py::test_a_missing_split_is_named
def _(tmp):
    root = transunet_root(tmp)
    shutil.rmtree(root / "test_vol_h5")
    return Case(synapse(root, "test"), root / "test_vol_h5", DatasetNotFoundError)


@cell("synapse_npz_h5", "empty_folder")  # as test_synapse.py::test_an_empty_folder_is_named
def _(tmp):
    root = transunet_root(tmp, lists=False)
    for path in (root / "train_npz").iterdir():
        path.unlink()
    return Case(synapse(root, "fit"), root / "train_npz", EmptyDatasetError)


def rewrite_npz(path: Path, value: float) -> Path:
    with np.load(path) as stored:
        image, label = stored["image"].copy(), stored["label"]
    image[3, 4] = value
    np.savez(path, image=image, label=label)
    return path


@cell("synapse_npz_h5", "nan")
def _(tmp):
    root = transunet_root(tmp)
    return Case(synapse(root, "fit"), rewrite_npz(root / "train_npz" / "case0005_slice001.npz", np.nan), IntensityRangeError)


@cell("synapse_npz_h5", "inf")
def _(tmp):
    root = transunet_root(tmp)
    path = root / "test_vol_h5" / "case0001.npy.h5"
    with h5py.File(path, "r+") as handle:
        handle["image"][1, 2, 3] = np.inf
    return Case(synapse(root, "test"), path, IntensityRangeError)


@cell("synapse_npz_h5", "value_range")  # TransUNet's files hold CT already windowed to [0, 1]
def _(tmp):
    root = transunet_root(tmp)
    return Case(synapse(root, "fit"), rewrite_npz(root / "train_npz" / "case0005_slice001.npz", 1.5), IntensityRangeError)


@cell("synapse_npz_h5", "label_range")  # as test_synapse.py::test_h5_labels_out_of_range_are_named
def _(tmp):
    root = transunet_root(tmp)
    path = root / "train_npz" / "case0005_slice000.npz"
    with np.load(path) as stored:
        image, label = stored["image"], stored["label"].copy()
    label[0, 0] = 9
    np.savez(path, image=image, label=label)
    return Case(synapse(root, "fit"), path, LabelRangeError)


# -- Synapse / BTCV as NIfTI (data/nifti_volumes.py, read through data/synapse.py) -------------------


def nifti_root(tmp: Path) -> Path:
    return write_raw_synapse(tmp / "raw", train=(1,), test=(2,))


@cell("nifti", "truncated")  # as test_synapse.py::test_a_truncated_file_is_named
def _(tmp):
    root = nifti_root(tmp)
    return Case(synapse(root, "fit"), truncate(root / "Training" / "img" / "img0001.nii.gz"), UnreadableFileError)


@cell("nifti", "missing_split")  # as test_synapse.py::test_a_missing_split_is_named
def _(tmp):
    root = nifti_root(tmp)
    shutil.rmtree(root / "Testing")
    return Case(synapse(root, "test"), root, DatasetNotFoundError)


@cell("nifti", "empty_folder")  # as test_synapse.py::test_an_empty_folder_is_named
def _(tmp):
    root = nifti_root(tmp)
    (root / "Training" / "label" / "label0001.nii.gz").unlink()  # the label folder is left empty
    return Case(synapse(root, "fit"), root / "Training" / "img" / "img0001.nii.gz", MissingPairError)


@cell("nifti", "nan")
def _(tmp):
    root = nifti_root(tmp)
    return Case(synapse(root, "fit"), poke_nifti(root / "Training" / "img" / "img0001.nii.gz", np.nan), InvalidValueError)


@cell("nifti", "inf")
def _(tmp):
    root = nifti_root(tmp)
    return Case(synapse(root, "test"), poke_nifti(root / "Testing" / "img" / "img0002.nii.gz", np.inf), InvalidValueError)


@cell("nifti", "label_range")  # as test_synapse.py::test_nifti_labels_out_of_range_are_named_with_the_btcv_hint
def _(tmp):
    root = nifti_root(tmp)
    label = root / "Testing" / "label" / "label0002.nii.gz"
    write_nifti_case(root / "Testing" / "img" / "img0002.nii.gz", label, np.random.default_rng(3), labels=[1, 13])
    return Case(synapse(root, "test"), label, LabelRangeError)


# -- echo: CAMUS, EchoNet-Dynamic, CardiacUDA (data/camus.py, data/echonet.py, data/cardiac_uda.py) ---


def echo(fmt: str, root: Path, structures: list[str], *stages: str, site: str = "Site_G_100") -> Callable[[], None]:
    """Source and target both ``root`` (supervised training), so every video of every split is read."""

    def make() -> EchoUDADataModule:
        return EchoUDADataModule(
            source_format=fmt, target_format=fmt, source_root=str(root), target_root=str(root),
            source_site=site, target_site=site, structures=structures, clip_length=2, resize=16, crop=16,
            samples_per_epoch=4, batch_size=1,
        )  # fmt: skip

    return load(make, *stages)


def camus(root: Path, *stages: str) -> Callable[[], None]:
    return echo("camus", root, ["LV", "MYO", "LA"], *stages)


CAMUS_FILE = "database_nifti/patient0001/patient0001_4CH_half_sequence.nii.gz"


@cell("camus", "truncated")
def _(tmp):
    root = write_camus_nifti(tmp / "camus")
    return Case(camus(root, "fit"), truncate(root / CAMUS_FILE), UnreadableFileError)


@cell("camus", "truncated", "metaimage")
def _(tmp):
    root = write_camus_mhd(tmp / "camus", patients=3)
    raw = root / "training" / "patient0001" / "patient0001_4CH_sequence.raw"
    return Case(camus(root, "fit", "test"), truncate(raw), UnreadableFileError)


@cell("camus", "missing_split")
def _(tmp):
    root = write_camus_nifti(tmp / "camus")
    (root / "database_split" / "subgroup_testing.txt").unlink()
    return Case(camus(root, "test"), root / "database_split" / "subgroup_testing.txt", DatasetNotFoundError)


@cell("camus", "empty_folder")
def _(tmp):
    root = write_camus_nifti(tmp / "camus")
    (root / "database_nifti" / "patient0007").mkdir()
    return Case(camus(root, "fit"), root / "database_nifti" / "patient0007", EmptyDatasetError)


@cell("camus", "nan")
def _(tmp):
    root = write_camus_nifti(tmp / "camus")
    return Case(camus(root, "fit"), poke_nifti(root / CAMUS_FILE, np.nan), InvalidValueError)


@cell("camus", "inf")
def _(tmp):
    root = write_camus_nifti(tmp / "camus")
    return Case(camus(root, "fit"), poke_nifti(root / CAMUS_FILE, -np.inf), InvalidValueError)


@cell("camus", "label_range")
def _(tmp):
    root = write_camus_nifti(tmp / "camus")
    label = root / CAMUS_FILE.replace("sequence", "sequence_gt")
    image = nib.load(str(label))
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 5  # CAMUS labels 1 LV, 2 MYO, 3 LA
    nib.save(nib.Nifti1Image(data, image.affine), str(label))
    return Case(camus(root, "fit"), label, LabelRangeError)


def echonet(root: Path, *stages: str) -> Callable[[], None]:
    return echo("echonet", root, ["LV"], *stages)


@cell("echonet", "truncated")
def _(tmp):
    root = write_echonet(tmp / "echonet")
    # the container's header survives: OpenCV decodes the first frames and then stops quietly
    return Case(echonet(root, "fit"), truncate(root / "Videos" / "0XAAA.avi", keep=0.9), UnreadableFileError)


@cell("echonet", "truncated", "header")  # as test_echo_data.py::test_a_video_with_no_frames_names_the_file
def _(tmp):
    root = write_echonet(tmp / "echonet")
    return Case(echonet(root, "fit"), truncate(root / "Videos" / "0XBBB.avi", keep=0.3), UnreadableFileError)


@cell("echonet", "missing_split")
def _(tmp):
    root = write_echonet(tmp / "echonet")
    (root / "FileList.csv").write_text((root / "FileList.csv").read_text().replace(",TEST", ",VAL"))
    return Case(echonet(root, "test"), root, EmptyDatasetError)


@cell("echonet", "missing_split", "unknown value")  # the official loader would leave it in no split
def _(tmp):
    root = write_echonet(tmp / "echonet")
    (root / "FileList.csv").write_text((root / "FileList.csv").read_text().replace(",TEST", ",TSET"))
    return Case(echonet(root, "fit"), root / "FileList.csv", SplitError, says="line 5: Split 'TSET'")


@cell("echonet", "empty_folder")
def _(tmp):
    root = write_echonet(tmp / "echonet")
    for path in (root / "Videos").iterdir():
        path.unlink()
    return Case(echonet(root, "fit"), root / "Videos", EmptyDatasetError)


def add_tracing(root: Path, line: str) -> Path:
    with (root / "VolumeTracings.csv").open("a") as handle:
        handle.write(line + "\n")
    return root / "VolumeTracings.csv"


@cell("echonet", "nan")
def _(tmp):
    root = write_echonet(tmp / "echonet")
    return Case(echonet(root, "fit"), add_tracing(root, "0XAAA.avi,nan,12,24,12,1"), InvalidValueError)


@cell("echonet", "inf")
def _(tmp):
    root = write_echonet(tmp / "echonet")
    return Case(echonet(root, "fit"), add_tracing(root, "0XBBB.avi,8,12,inf,12,5"), InvalidValueError)


@cell("echonet", "label_range")  # as test_echo_data.py::test_echonet_traced_frame_past_the_end_and_bad_header_are_named
def _(tmp):
    root = write_echonet(tmp / "echonet")
    return Case(echonet(root, "fit"), add_tracing(root, "0XAAA.avi,1,1,2,2,99"), LabelRangeError)


@cell("echonet", "label_range", "outside the frame")  # a tracing for a larger frame: clipping would hide it
def _(tmp):
    root = write_echonet(tmp / "echonet")  # 32 x 32 frames; up to one pixel past the border is allowed
    return Case(echonet(root, "fit"), add_tracing(root, "0XBBB.avi,8,20,34,20,5"), LabelRangeError, says="line 34:")


def cardiac(root: Path, *stages: str, site: str = "Site_G_100") -> Callable[[], None]:
    return echo("cardiac_uda", root, ["LV", "LA", "RA", "RV"], *stages, site=site)


CARDIAC_VIDEO = "Site_G_100/patient1-4_image.nii.gz"


@cell("cardiac_uda", "truncated")
def _(tmp):
    root = write_cardiac_uda(tmp / "cardiac", sites=("Site_G_100",))
    return Case(cardiac(root, "fit", "test"), truncate(root / CARDIAC_VIDEO), UnreadableFileError)


@cell("cardiac_uda", "missing_split")  # a site (domain) is CardiacUDA's split
def _(tmp):
    root = write_cardiac_uda(tmp / "cardiac", sites=("Site_G_100",))
    return Case(cardiac(root, "fit", site="Site_R_126"), root / "Site_R_126", DatasetNotFoundError)


@cell("cardiac_uda", "empty_folder")
def _(tmp):
    root = write_cardiac_uda(tmp / "cardiac", sites=("Site_G_100",))
    (root / "Site_R_126").mkdir()
    return Case(cardiac(root, "fit", site="Site_R_126"), root / "Site_R_126", EmptyDatasetError)


@cell("cardiac_uda", "nan")
def _(tmp):
    root = write_cardiac_uda(tmp / "cardiac", sites=("Site_G_100",))
    return Case(cardiac(root, "fit", "test"), poke_nifti(root / CARDIAC_VIDEO, np.nan), InvalidValueError)


@cell("cardiac_uda", "inf")
def _(tmp):
    root = write_cardiac_uda(tmp / "cardiac", sites=("Site_G_100",))
    return Case(cardiac(root, "fit", "test"), poke_nifti(root / CARDIAC_VIDEO, np.inf), InvalidValueError)


@cell("cardiac_uda", "label_range")  # as test_echo_data.py::test_cardiac_uda_unknown_label_value_and_missing_site_are_named
def _(tmp):
    root = write_cardiac_uda(tmp / "cardiac", sites=("Site_G_100",))
    label = root / CARDIAC_VIDEO.replace("_image", "_label")
    nib.save(nib.Nifti1Image(np.full((20, 24, 6), 7, np.uint8), np.eye(4)), str(label))
    return Case(cardiac(root, "fit", "test"), label, LabelRangeError)


# -- point clouds: S3DIS, ScanNet, .ply / .pcd files (data/s3dis.py, data/scannet.py, data/point_files.py)

CENTRE_ONLY = [{"name": "center_shift"}]


def points(cls, root: Path, *stages: str, **kwargs) -> Callable[[], None]:
    make = lambda: cls(root=str(root), train_transforms=CENTRE_ONLY, eval_transforms=CENTRE_ONLY, batch_size=1, **kwargs)  # noqa: E731
    return load(make, *stages)


def s3dis_root(tmp: Path) -> Path:
    root = tmp / "s3dis"
    write_npy_room(root / "Area_1" / "office_1", 20, seed=1)
    write_npy_room(root / "Area_5" / "office_1", 20, seed=2)
    return root


def s3dis_raw_root(tmp: Path) -> Path:
    root = tmp / "s3dis_raw"
    write_raw_room(root / "Area_1" / "office_1", {"chair_1": 5, "wall_1": 5})
    write_raw_room(root / "Area_5" / "office_1", {"table_1": 5}, seed=1)
    return root


def npy_with(path: Path, index: tuple, value) -> Path:
    array = np.load(path)
    array[index] = value
    np.save(path, array)
    return path


@cell("s3dis", "truncated")  # as test_point_datasets.py::test_truncated_npy_array_is_named
def _(tmp):
    root = s3dis_root(tmp)
    return Case(points(S3DISDataModule, root, "test"), truncate(root / "Area_5" / "office_1" / "coord.npy"), UnreadableFileError)


@cell("s3dis", "truncated", "raw")
def _(tmp):
    root = s3dis_raw_root(tmp)
    path = root / "Area_5" / "office_1" / "Annotations" / "table_1.txt"
    path.write_bytes(path.read_bytes()[:-9])  # the last line is cut short
    return Case(points(S3DISDataModule, root, "test"), path, UnreadableFileError)


@cell("s3dis", "missing_split")  # as test_point_datasets.py::test_missing_test_area_is_named
def _(tmp):
    root = s3dis_root(tmp)
    shutil.rmtree(root / "Area_5")
    return Case(points(S3DISDataModule, root, "test"), root, DatasetNotFoundError)


@cell("s3dis", "empty_folder")
def _(tmp):
    root = s3dis_root(tmp)
    shutil.rmtree(root / "Area_5" / "office_1")
    return Case(points(S3DISDataModule, root, "test"), root / "Area_5", EmptyDatasetError)


@cell("s3dis", "empty_folder", "room")
def _(tmp):
    root = s3dis_root(tmp)
    (root / "Area_5" / "office_2").mkdir()
    return Case(points(S3DISDataModule, root, "test"), root / "Area_5" / "office_2", DatasetNotFoundError)


@cell("s3dis", "empty_folder", "raw room")
def _(tmp):
    root = s3dis_raw_root(tmp)
    (root / "Area_5" / "office_2").mkdir()
    return Case(points(S3DISDataModule, root, "test"), root / "Area_5" / "office_2", DatasetNotFoundError)


@cell("s3dis", "nan")  # as test_point_datasets.py::test_broken_scene_files_raise_errors_naming_the_file
def _(tmp):
    root = s3dis_root(tmp)
    return Case(points(S3DISDataModule, root, "test"), npy_with(root / "Area_5" / "office_1" / "coord.npy", (4, 1), np.nan), InvalidValueError)


def raw_with(path: Path, token: str, field: int = 0) -> Path:
    """``token`` as field ``field`` of the second line of an ``x y z r g b`` file."""
    lines = path.read_text().splitlines()
    fields = lines[1].split()
    fields[field] = token
    lines[1] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")
    return path


@cell("s3dis", "nan", "raw")
def _(tmp):
    root = s3dis_raw_root(tmp)
    path = raw_with(root / "Area_5" / "office_1" / "Annotations" / "table_1.txt", "nan")
    return Case(points(S3DISDataModule, root, "test"), path, InvalidValueError)


@cell("s3dis", "inf")
def _(tmp):
    root = s3dis_root(tmp)
    return Case(points(S3DISDataModule, root, "test"), npy_with(root / "Area_5" / "office_1" / "coord.npy", (2, 0), -np.inf), InvalidValueError)


@cell("s3dis", "inf", "raw")
def _(tmp):
    root = s3dis_raw_root(tmp)
    path = raw_with(root / "Area_1" / "office_1" / "Annotations" / "wall_1.txt", "inf")
    return Case(points(S3DISDataModule, root, "fit"), path, InvalidValueError)


@cell("s3dis", "label_range")  # as test_point_datasets.py::test_broken_scene_files_raise_errors_naming_the_file
def _(tmp):
    root = s3dis_root(tmp)
    return Case(points(S3DISDataModule, root, "test"), npy_with(root / "Area_5" / "office_1" / "segment.npy", 0, 13), LabelRangeError)


@cell("s3dis", "label_range", "raw")  # as test_point_datasets.py::test_s3dis_raw_unknown_class_is_refused
def _(tmp):
    root = s3dis_raw_root(tmp)
    write_raw_room(root / "Area_5" / "office_2", {"lamp_1": 4})
    return Case(points(S3DISDataModule, root, "test"), root / "Area_5" / "office_2" / "Annotations" / "lamp_1.txt", LabelRangeError)


@cell("s3dis", "nan", "label")  # a cast to int64 would make it -9223372036854775808
def _(tmp):
    root = s3dis_root(tmp)
    path = root / "Area_5" / "office_1" / "segment.npy"
    np.save(path, np.load(path).astype(np.float32))
    return Case(points(S3DISDataModule, root, "test"), npy_with(path, 6, np.nan), LabelRangeError, says="label nan of point 6")


@cell("s3dis", "label_range", "fractional")  # a cast to int64 would make it class 2
def _(tmp):
    root = s3dis_root(tmp)
    path = root / "Area_1" / "office_1" / "segment.npy"
    np.save(path, np.load(path).astype(np.float64))
    return Case(points(S3DISDataModule, root, "fit"), npy_with(path, 3, 2.5), LabelRangeError, says="label 2.5 of point 3")


@cell("s3dis", "value_range")  # stored as uint8, 256 would wrap to 0
def _(tmp):
    root = s3dis_raw_root(tmp)
    path = raw_with(root / "Area_1" / "office_1" / "Annotations" / "chair_1.txt", "256", field=4)
    return Case(points(S3DISDataModule, root, "fit"), path, InvalidValueError, says="line 2")


@cell("s3dis", "value_range", "raw fractional")  # colours written in [0, 1] would all truncate to black
def _(tmp):
    root = s3dis_raw_root(tmp)
    path = raw_with(root / "Area_5" / "office_1" / "Annotations" / "table_1.txt", "0.5", field=3)
    return Case(points(S3DISDataModule, root, "test"), path, InvalidValueError)


@cell("s3dis", "value_range", "npy")
def _(tmp):
    root = s3dis_root(tmp)
    path = root / "Area_5" / "office_1" / "color.npy"
    np.save(path, np.load(path).astype(np.float32))
    return Case(points(S3DISDataModule, root, "test"), npy_with(path, (7, 2), 300.0), InvalidValueError)


def write_scannet_pth(path: Path, n: int = 20, seed: int = 0, **changes) -> Path:
    """A scan in Point Transformer V2's layout (a ``torch.save``d dict of numpy arrays); labels
    stay integers unless a change is not a whole number."""
    import torch

    coord, color, segment = scene_arrays(n, seed, classes=20)
    scene = {"coord": coord, "color": color, "normal": np.tile(np.float32([0, 0, 1]), (n, 1)), "semantic_gt20": segment}
    for key, (index, value) in changes.items():
        scene[key] = scene[key].astype(np.int64 if key == "semantic_gt20" and float(value).is_integer() else np.float32)
        scene[key][index] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(scene, path)
    return path


def scannet_root(tmp: Path) -> Path:
    root = tmp / "scannet"
    write_scannet_pth(root / "train" / "scene0000_00.pth")
    write_scannet_pth(root / "val" / "scene0001_00.pth", seed=1)
    return root


def scannet(root: Path, *stages: str) -> Callable[[], None]:
    return points(ScanNetDataModule, root, *stages)


@cell("scannet", "truncated")
def _(tmp):
    root = scannet_root(tmp)
    return Case(scannet(root, "test"), truncate(root / "val" / "scene0001_00.pth"), UnreadableFileError)


@cell("scannet", "missing_split")
def _(tmp):
    root = scannet_root(tmp)
    shutil.rmtree(root / "val")
    return Case(scannet(root, "test"), root / "val", DatasetNotFoundError)


@cell("scannet", "empty_folder")
def _(tmp):
    root = scannet_root(tmp)
    (root / "val" / "scene0001_00.pth").unlink()
    return Case(scannet(root, "test"), root / "val", EmptyDatasetError)


@cell("scannet", "empty_folder", "npy scene")
def _(tmp):
    root = tmp / "scannet"
    write_npy_room(root / "val" / "scene0001_00", 20, seed=1, segment_name="segment20.npy", normals=True)
    (root / "val" / "scene0002_00").mkdir()
    return Case(scannet(root, "test"), root / "val" / "scene0002_00", DatasetNotFoundError)


@cell("scannet", "nan")
def _(tmp):
    root = scannet_root(tmp)
    path = write_scannet_pth(root / "val" / "scene0001_00.pth", coord=((3, 2), np.nan))
    return Case(scannet(root, "test"), path, InvalidValueError)


@cell("scannet", "nan", "normal")  # a NaN feature is as bad as a NaN coordinate
def _(tmp):
    root = scannet_root(tmp)
    path = write_scannet_pth(root / "val" / "scene0001_00.pth", normal=((3, 2), np.nan))
    return Case(scannet(root, "test"), path, InvalidValueError)


@cell("scannet", "inf")
def _(tmp):
    root = scannet_root(tmp)
    path = write_scannet_pth(root / "train" / "scene0000_00.pth", coord=((0, 0), np.inf))
    return Case(scannet(root, "fit"), path, InvalidValueError)


@cell("scannet", "label_range")
def _(tmp):
    root = scannet_root(tmp)
    path = write_scannet_pth(root / "val" / "scene0001_00.pth", semantic_gt20=(5, 20))
    return Case(scannet(root, "test"), path, LabelRangeError)


@cell("scannet", "label_range", "fractional")
def _(tmp):
    root = scannet_root(tmp)
    path = write_scannet_pth(root / "val" / "scene0001_00.pth", semantic_gt20=(4, 1.5))
    return Case(scannet(root, "test"), path, LabelRangeError)


@cell("scannet", "value_range")  # Point Transformer V2 stores colours as floats in 0..255
def _(tmp):
    root = scannet_root(tmp)
    path = write_scannet_pth(root / "train" / "scene0000_00.pth", color=((2, 1), 256.0))
    return Case(scannet(root, "fit"), path, InvalidValueError)


def point_files_root(tmp: Path) -> Path:
    root = tmp / "clouds"
    write_point_cloud_split(root / "train", ["a.ply", "b.pcd"], n=20)
    write_point_cloud_split(root / "test", ["c.ply"], n=20)
    (root / "classes.txt").write_text("floor\nwall\nchair\n")
    return root


def point_files(root: Path, *stages: str) -> Callable[[], None]:
    return points(PointFileDataModule, root, *stages)


@cell("point_files", "truncated")  # as test_point_datasets.py::test_truncated_point_file_is_named
def _(tmp):
    root = point_files_root(tmp)
    return Case(point_files(root, "fit"), truncate(root / "train" / "b.pcd", keep=0.8), UnreadableFileError)


@cell("point_files", "missing_split")
def _(tmp):
    root = point_files_root(tmp)
    shutil.rmtree(root / "train")
    return Case(point_files(root, "fit"), root / "train", DatasetNotFoundError)


@cell("point_files", "empty_folder")
def _(tmp):
    root = point_files_root(tmp)
    for path in (root / "test").iterdir():
        path.unlink()
    return Case(point_files(root, "test"), root / "test", EmptyDatasetError)


@cell("point_files", "nan")
def _(tmp):
    root = point_files_root(tmp)
    return Case(point_files(root, "fit"), with_token(root / "train" / "a.ply", "nan"), InvalidValueError)


@cell("point_files", "inf")  # open3d cannot parse "inf" in an ASCII PLY and returns garbage points
def _(tmp):
    root = point_files_root(tmp)
    return Case(point_files(root, "fit"), with_token(root / "train" / "a.ply", "inf"), InvalidValueError)


@cell("point_files", "inf", "pcd")
def _(tmp):
    root = point_files_root(tmp)
    return Case(point_files(root, "fit"), with_token(root / "train" / "b.pcd", "-inf"), InvalidValueError)


@cell("point_files", "label_range")
def _(tmp):
    root = point_files_root(tmp)
    labels = root / "test" / "c.labels"
    np.savetxt(labels, np.r_[np.zeros(19, int), 3], fmt="%d")  # classes 0..2
    return Case(point_files(root, "test"), labels, LabelRangeError)


def labels_with(path: Path, line: int, token: str) -> Path:
    """``token`` as line ``line`` (1-based) of a one-label-per-line file."""
    lines = path.read_text().splitlines()
    lines[line - 1] = token
    path.write_text("\n".join(lines) + "\n")
    return path


@cell("point_files", "nan", "label")
def _(tmp):
    root = point_files_root(tmp)
    return Case(point_files(root, "fit"), labels_with(root / "train" / "b.labels", 4, "nan"), LabelRangeError, says="line 4: label nan")


@cell("point_files", "label_range", "fractional")  # numpy's int parser would refuse it without a line
def _(tmp):
    root = point_files_root(tmp)
    return Case(point_files(root, "test"), labels_with(root / "test" / "c.labels", 7, "1.5"), LabelRangeError, says="line 7: label 1.5")


@cell("point_files", "value_range")  # a 16-bit colour: open3d divides every colour by 255
def _(tmp):
    root = point_files_root(tmp)
    path = root / "train" / "a.ply"
    cloud = o3d.io.read_point_cloud(str(path))
    rgb = np.rint(np.asarray(cloud.colors) * 255).astype(int)
    rgb[5] = (300, 20, 20)
    header = ["ply", "format ascii 1.0", f"element vertex {len(rgb)}", *(f"property float {a}" for a in "xyz")]
    header += [f"property ushort {c}" for c in ("red", "green", "blue")] + ["end_header"]
    rows = [" ".join([*(f"{v:.5f}" for v in xyz), *map(str, colour)]) for xyz, colour in zip(np.asarray(cloud.points), rgb)]
    path.write_text("\n".join(header + rows) + "\n")
    return Case(point_files(root, "fit"), path, InvalidValueError)


# -- registration: 3DMatch, KITTI, pair lists (data/threedmatch.py, data/kitti_odometry.py,
#    data/registration_pairs.py, all read through data/registration.py) -----------------------------


def registration(cls, root: Path, *stages: str, **kwargs) -> Callable[[], None]:
    make = lambda: cls(root=str(root), num_correspondences=16, eval_num_correspondences=16, batch_size=1, **kwargs)  # noqa: E731
    return load(make, *stages)


def threedmatch_root(tmp: Path) -> Path:
    root = tmp / "3dmatch"
    write_benchmark_scene(root / "test", fragments=2)
    return root


def threedmatch(root: Path, *stages: str) -> Callable[[], None]:
    return registration(ThreeDMatchDataModule, root, *stages)


FRAGMENT = "test/scene-a/cloud_bin_0.ply"


@cell("threedmatch", "truncated")
def _(tmp):
    root = threedmatch_root(tmp)
    return Case(threedmatch(root, "test"), truncate(root / FRAGMENT), UnreadableFileError)


@cell("threedmatch", "missing_split")
def _(tmp):
    root = threedmatch_root(tmp)
    return Case(threedmatch(root, "fit"), root, DatasetNotFoundError)


@cell("threedmatch", "empty_folder")
def _(tmp):
    root = threedmatch_root(tmp)
    shutil.rmtree(root / "test" / "scene-a")
    return Case(threedmatch(root, "test"), root / "test", EmptyDatasetError)


def ply_with(path: Path, index: tuple, value: float) -> Path:
    cloud = np.asarray(o3d.io.read_point_cloud(str(path)).points).copy()
    cloud[index] = value
    write_ply(path, cloud)
    return path


@cell("threedmatch", "nan")
def _(tmp):
    root = threedmatch_root(tmp)
    return Case(threedmatch(root, "test"), ply_with(root / FRAGMENT, (7, 1), np.nan), BadPointCloudError)


@cell("threedmatch", "nan", "gt.log")
def _(tmp):
    root = threedmatch_root(tmp)
    log = root / "test" / "scene-a" / "gt.log"
    motion = random_motion(3)
    motion[1, 3] = np.nan
    write_gt_log(log, {(0, 1): motion}, 2)
    return Case(threedmatch(root, "test"), log, InvalidValueError)


@cell("threedmatch", "inf")
def _(tmp):
    root = threedmatch_root(tmp)
    return Case(threedmatch(root, "test"), ply_with(root / FRAGMENT, (0, 2), np.inf), BadPointCloudError)


@cell("threedmatch", "label_range")  # as test_registration_data.py::test_a_gt_log_naming_a_missing_fragment_...
def _(tmp):
    root = threedmatch_root(tmp)
    write_gt_log(root / "test" / "scene-a" / "gt.log", {(0, 1): np.eye(4), (0, 2): np.eye(4)}, 2)
    return Case(threedmatch(root, "test"), root / "test" / "scene-a" / "cloud_bin_2.ply", MissingPairError)


@cell("threedmatch", "label_range", "gt.log not a motion")  # orthonormal, but a reflection
def _(tmp):
    root = threedmatch_root(tmp)
    log = root / "test" / "scene-a" / "gt.log"
    mirrored = random_motion(4)
    mirrored[:3, 0] *= -1
    write_gt_log(log, {(0, 1): mirrored}, 2)
    return Case(threedmatch(root, "test"), log, InvalidValueError)


def write_kitti(root: Path, sequence: int = 8, scans: int = 9, points: int = 60) -> Path:
    """``sequences/NN/velodyne/*.bin`` and ``poses/NN.txt``: the camera moves 1.5 m per scan, so
    scans 0 and 6 form the one pair 10 m apart."""
    velodyne = root / "sequences" / f"{sequence:02d}" / "velodyne"
    velodyne.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for t in range(scans):
        np.c_[rng.uniform(0, 10, (points, 3)), np.ones(points)].astype(np.float32).tofile(velodyne / f"{t:06d}.bin")
    poses = np.tile(np.eye(4), (scans, 1, 1))
    poses[:, 2, 3] = np.arange(scans) * 1.5
    (root / "poses").mkdir()
    np.savetxt(root / "poses" / f"{sequence:02d}.txt", poses[:, :3, :].reshape(scans, 12))
    return root


def kitti(root: Path, sequence: int = 8) -> Callable[[], None]:
    return registration(KittiOdometryDataModule, root, "test", test_sequences=[sequence], icp_refinement=False)


SCAN = "sequences/08/velodyne/000000.bin"


@cell("kitti", "truncated")  # a cut at a whole point is indistinguishable from a smaller scan: .bin has no header
def _(tmp):
    root = write_kitti(tmp / "kitti")
    path = root / SCAN
    path.write_bytes(path.read_bytes()[:-6])
    return Case(kitti(root), path, UnreadableFileError)


@cell("kitti", "missing_split")
def _(tmp):
    root = write_kitti(tmp / "kitti")
    return Case(kitti(root, sequence=9), root / "sequences" / "09" / "velodyne", DatasetNotFoundError)


@cell("kitti", "empty_folder")
def _(tmp):
    root = write_kitti(tmp / "kitti")
    for path in (root / "sequences" / "08" / "velodyne").iterdir():
        path.unlink()
    return Case(kitti(root), root / "sequences" / "08" / "velodyne", EmptyDatasetError)


def scan_with(path: Path, index: tuple, value: float) -> Path:
    scan = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    scan[index] = value
    scan.tofile(path)
    return path


@cell("kitti", "nan")
def _(tmp):
    root = write_kitti(tmp / "kitti")
    return Case(kitti(root), scan_with(root / SCAN, (5, 0), np.nan), BadPointCloudError)


@cell("kitti", "nan", "poses")
def _(tmp):
    root = write_kitti(tmp / "kitti")
    poses = root / "poses" / "08.txt"
    lines = poses.read_text().splitlines()
    lines[0] = " ".join(["nan", *lines[0].split()[1:]])
    poses.write_text("\n".join(lines) + "\n")
    return Case(kitti(root), poses, InvalidValueError)


@cell("kitti", "inf")
def _(tmp):
    root = write_kitti(tmp / "kitti")
    return Case(kitti(root), scan_with(root / SCAN, (1, 2), np.inf), BadPointCloudError)


@cell("kitti", "label_range")
def _(tmp):
    root = write_kitti(tmp / "kitti")
    poses = root / "poses" / "08.txt"
    poses.write_text("\n".join(poses.read_text().splitlines()[:5]) + "\n")  # five poses for nine scans
    return Case(kitti(root), poses, UnreadableFileError)


def pairs_root(tmp: Path, source: str = "a.ply") -> Path:
    root = tmp / "pairs"
    write_ply(root / "clouds" / "a.ply", room_points(0, 400))
    write_ply(root / "clouds" / "b.ply", room_points(1, 400))
    numbers = " ".join(f"{v:.12g}" for v in random_motion(5).ravel())
    (root / "test.txt").write_text(f"clouds/{source} clouds/b.ply {numbers}\n")
    return root


def pair_list(root: Path, *stages: str) -> Callable[[], None]:
    return registration(RegistrationPairsDataModule, root, *stages)


@cell("registration_pairs", "truncated")
def _(tmp):
    root = pairs_root(tmp)
    return Case(pair_list(root, "test"), truncate(root / "clouds" / "a.ply"), UnreadableFileError)


@cell("registration_pairs", "missing_split")
def _(tmp):
    root = pairs_root(tmp)
    return Case(pair_list(root, "fit"), root / "train.txt", DatasetNotFoundError)


@cell("registration_pairs", "empty_folder")
def _(tmp):
    (tmp / "pairs").mkdir(parents=True)
    return Case(pair_list(tmp / "pairs", "test"), tmp / "pairs", DatasetNotFoundError)


@cell("registration_pairs", "empty_folder", "empty list")
def _(tmp):
    root = pairs_root(tmp)
    (root / "test.txt").write_text("# source target transform\n")
    return Case(pair_list(root, "test"), root / "test.txt", EmptyDatasetError)


@cell("registration_pairs", "nan")
def _(tmp):
    root = pairs_root(tmp, source="a.npz")
    cloud = room_points(0, 400)
    cloud[9, 0] = np.nan
    np.savez(root / "clouds" / "a.npz", pcd=cloud)
    return Case(pair_list(root, "test"), root / "clouds" / "a.npz", BadPointCloudError)


@cell("registration_pairs", "inf")
def _(tmp):
    root = pairs_root(tmp, source="a.bin")
    cloud = room_points(0, 400)
    cloud = np.c_[cloud, np.ones(len(cloud))].astype(np.float32)
    cloud[3, 1] = -np.inf
    cloud.tofile(root / "clouds" / "a.bin")
    return Case(pair_list(root, "test"), root / "clouds" / "a.bin", BadPointCloudError)


@cell("registration_pairs", "label_range")  # as test_registration_data.py::test_pair_lists_read_relative_paths_and_refuse_bad_lines
def _(tmp):
    root = pairs_root(tmp)
    (root / "test.txt").write_text("clouds/a.ply clouds/b.ply 2 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1\n")  # a scaling, not a motion
    return Case(pair_list(root, "test"), root / "test.txt", InvalidValueError)


# -- the tests -------------------------------------------------------------------------------------


def test_the_matrix_is_complete():
    """Every format meets every fault: at least one case, or a stated reason why it cannot occur."""
    covered = {(fmt, fault) for fmt, fault, _ in CASES}
    for fmt in FORMATS:
        for fault in FAULTS:
            assert ((fmt, fault) in covered) != ((fmt, fault) in NOT_APPLICABLE), (fmt, fault)


@pytest.mark.parametrize("key", list(CASES), ids=["-".join(filter(None, key)).replace(" ", "_") for key in CASES])
def test_bad_input_raises_one_line_naming_the_culprit_and_writes_nothing(key, tmp_path, monkeypatch):
    monkeypatch.setenv("GLOCAL_CACHE", str(tmp_path / "cache"))  # converted volumes, features: watched too
    case = CASES[key](tmp_path / "data")
    before = snapshot(tmp_path)
    with pytest.raises(DatasetError) as raised:
        case.run()
    error = raised.value
    message = str(error)
    assert isinstance(error, case.error), f"{type(error).__name__}: {message}"
    assert message and "\n" not in message, message
    assert str(case.culprit) in message, message
    assert case.says in message, message
    after = snapshot(tmp_path)
    left = sorted(path for path in set(after) - set(before) if not finished_cache_entry(tmp_path, path, after))
    assert not left, f"left behind: {left}"
    changed = sorted(path for path in before if after.get(path) != before[path])
    assert not changed, f"changed or removed: {changed}"
