"""Synapse multi-organ abdominal CT: TransUNet's preprocessed layout, raw NIfTI, or built-in phantoms.

Layouts under ``root`` (``layout="auto"`` picks the one present):

``transunet`` (TransUNet, DAE-Former, TransDAE and most 2D papers)::

    train_npz/case0005_slice000.npz      keys image (H x W, in [0, 1]) and label (H x W)
    test_vol_h5/case0001.npy.h5          keys image and label, D x H x W
    lists_Synapse/train.txt              one slice name per line (also lists/lists_Synapse/,
    lists_Synapse/test_vol.txt           lists/ or root itself; or --data.list_dir)

  Without the lists every file of the two folders is used.

``nifti`` (the raw BTCV / Synapse download, or nnU-Net's tree; see ``data.nifti_volumes``)::

    Training/img/img0001.nii.gz  +  Training/label/label0001.nii.gz   (also img/ + label/)
    imagesTr/BTCV_001_0000.nii.gz + labelsTr/BTCV_001.nii.gz
    Testing/..., imagesTs/ + labelsTs/                                (a test split, if any)

  With TransUNet's lists beside them the cases are split as the lists say (train.txt's slice
  names give the training cases), so the raw download reproduces the published 18 / 12 split;
  ``label_map="btcv"`` maps BTCV's 13 labels to Synapse's 8 organs.

Training samples are 2D slices resized to ``img_size`` and augmented with albumentations (the
DAE-Former set: flips, affine scale / rotation / shear / translation, elastic or piecewise-affine
deformation, Gaussian noise, blur, contrast). Evaluation samples are whole volumes at their own
size; the task predicts them slice by slice. Synapse has no validation split: ``val_cases``
holds out whole training cases (0 = none, as the papers do; then the last epoch is tested).

Every file is checked when read: a missing key, an image and label of different shapes, an
image outside [0, 1], or a label that is not an integer in ``[0, num_classes)`` raises an error
naming the file.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import albumentations as A
import cv2
import h5py
import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.base import BaseDataModule
from data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    IntensityRangeError,
    LabelRangeError,
    LayoutError,
    ShapeMismatchError,
    UnreadableFileError,
)
from data.nifti_volumes import LABEL_MAPS, NiftiCase, is_nifti, pair_cases
from data.sampling import SampleKey, sample_key, seed_transform

ORGANS = ("aorta", "gallbladder", "left kidney", "right kidney", "liver", "pancreas", "spleen", "stomach")
LAYOUTS = ("auto", "transunet", "nifti")
LIST_DIRS = ("lists_Synapse", "lists/lists_Synapse", "lists", ".")
IMAGE_DIRS = ("img", "images", "image", "imagesTr")
LABEL_DIRS = ("label", "labels", "labelsTr")
INTENSITY_SLACK = 1e-3  # resampled [0, 1] data may overshoot by rounding


# -- reading and checking one file ------------------------------------------------------------


def _read_arrays(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` or ``.h5`` file, or an error naming the file."""
    if not path.is_file():
        raise DatasetNotFoundError(path, "listed but does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path) as archive:
                present = list(archive.files)
                arrays = {key: archive[key] for key in keys if key in present}
        else:
            with h5py.File(path, "r") as handle:
                present = list(handle.keys())
                arrays = {key: handle[key][()] for key in keys if key in present}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # truncated or not npz / h5
        raise UnreadableFileError(path, f"cannot read ({type(error).__name__}: {error})") from None
    for key in keys:
        if key not in arrays:
            raise UnreadableFileError(path, f"has no '{key}' array (it holds: {', '.join(present) or 'nothing'})")
    return arrays


def check_image(image: np.ndarray, path: Path, ndim: int) -> np.ndarray:
    """A float32 image of ``ndim`` dimensions with values in [0, 1] (TransUNet's windowed CT)."""
    if image.ndim != ndim:
        raise UnreadableFileError(path, f"image has shape {image.shape}; expected {ndim} dimensions")
    image = np.asarray(image, dtype=np.float32)
    low, high = float(image.min()), float(image.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < -INTENSITY_SLACK or high > 1 + INTENSITY_SLACK:
        raise IntensityRangeError(
            path, f"image values span {low:g} .. {high:g}; expected CT windowed to [0, 1] (TransUNet's preprocessing)"
        )
    return np.clip(image, 0.0, 1.0)


def check_label(label: np.ndarray, image: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    """An int64 label map of the image's shape with every value in ``[0, num_classes)``."""
    if label.shape != image.shape:
        raise ShapeMismatchError(path, f"label shape {label.shape} differs from image shape {image.shape}")
    rounded = np.rint(label)
    if not np.array_equal(rounded, label):
        bad = label[rounded != label].flat[0]
        raise LabelRangeError(path, f"label holds the non-integer value {bad:g}")
    low, high = int(rounded.min()), int(rounded.max())
    if low < 0 or high >= num_classes:
        value = low if low < 0 else high
        hint = ""
        if is_nifti(path) and high >= num_classes:  # raw BTCV numbers 13 structures, Synapse keeps 8
            hint = "; raw BTCV label maps need --data.label_map btcv"
        raise LabelRangeError(path, f"label value {value} is outside the class range 0 .. {num_classes - 1}{hint}")
    return rounded.astype(np.int64)


# -- where samples come from --------------------------------------------------------------------


@dataclass(frozen=True)
class NpzSlice:
    """A training slice of TransUNet's ``train_npz`` folder."""

    path: Path

    def load(self) -> tuple[np.ndarray, np.ndarray, Path]:
        arrays = _read_arrays(self.path, ("image", "label"))
        return arrays["image"], arrays["label"], self.path


@dataclass(frozen=True)
class CachedSlice:
    """Slice ``index`` of a NIfTI training volume converted to ``.npy`` (read by memory mapping)."""

    folder: Path
    index: int
    source: Path

    def load(self) -> tuple[np.ndarray, np.ndarray, Path]:
        image = np.load(self.folder / "image.npy", mmap_mode="r")[self.index]
        label = np.load(self.folder / "label.npy", mmap_mode="r")[self.index]
        return np.array(image), np.array(label), self.source


@dataclass(frozen=True)
class H5Volume:
    """A volume of TransUNet's ``test_vol_h5`` folder (no spacing stored: HD95 in voxels)."""

    name: str
    path: Path
    with_label: bool = True

    def load(self) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray], Path]:
        arrays = _read_arrays(self.path, ("image", "label") if self.with_label else ("image",))
        return arrays["image"], arrays.get("label"), None, self.path


@dataclass(frozen=True)
class StackedSlices:
    """A held-out training case rebuilt as a volume from its ``train_npz`` slices, in slice order."""

    name: str
    paths: tuple[Path, ...]

    def load(self) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Path]:
        pairs = [_read_arrays(path, ("image", "label")) for path in self.paths]
        for path, arrays in zip(self.paths, pairs):
            if arrays["image"].shape != pairs[0]["image"].shape:
                raise ShapeMismatchError(path, f"slice shape {arrays['image'].shape} differs from {self.paths[0]}")
        image = np.stack([arrays["image"] for arrays in pairs])
        return image, np.stack([arrays["label"] for arrays in pairs]), None, self.paths[0]


@dataclass(frozen=True)
class NiftiVolume:
    """A NIfTI case as an evaluation volume; its header spacing gives HD95 in millimetres."""

    case: NiftiCase
    use_spacing: bool = True

    @property
    def name(self) -> str:
        return self.case.name

    def load(self) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray], Path]:
        image, label, spacing = self.case.load()
        return image, label, spacing if self.use_spacing else None, self.case.label or self.case.image


VolumeSource = Union[H5Volume, StackedSlices, NiftiVolume]


# -- datasets -----------------------------------------------------------------------------------


class SynapseSlices(Dataset):
    """2D training slices: ``{"image": (1, S, S) float in [0, 1], "mask": (S, S) int64, "name"}``."""

    def __init__(self, slices: list, num_classes: int, transform: A.Compose):
        self.slices = slices
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, key: SampleKey) -> dict:
        index, seed = sample_key(key)
        image, label, path = self.slices[index].load()
        image = check_image(image, path, ndim=2)
        label = check_label(label, image, path, self.num_classes)
        # every flip, affine and deformation of this draw comes from its own seed, so a resumed
        # fit (or another DDP rank layout) augments it exactly as before
        seed_transform(self.transform, seed)
        out = self.transform(image=image, mask=label.astype(np.uint8))
        return {
            "image": torch.from_numpy(np.clip(out["image"], 0.0, 1.0)).float().unsqueeze(0),
            "mask": torch.from_numpy(out["mask"]).long(),
            "name": path.stem,
        }


class SynapseVolumes(Dataset):
    """Whole volumes at their own size: ``{"image": (D, H, W), "mask": (D, H, W) int64,
    "spacing": (3,) (z, y, x; ones when unknown), "index", "name"}``; no mask when unlabelled."""

    def __init__(self, volumes: list[VolumeSource], num_classes: int):
        self.volumes = volumes
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict:
        source = self.volumes[index]
        image, label, spacing, path = source.load()
        image = check_image(image, path, ndim=3)
        item = {
            "image": torch.from_numpy(image),
            "spacing": torch.tensor(spacing if spacing is not None else (1.0, 1.0, 1.0), dtype=torch.float32),
            "index": index,
            "name": source.name,
        }
        if label is not None:
            item["mask"] = torch.from_numpy(check_label(label, image, path, self.num_classes))
        return item


def synapse_augmentation(
    img_size: int,
    flip_p: float = 0.2,
    affine_p: float = 0.5,
    scale: tuple[float, float] = (0.5, 2.0),
    rotate: float = 40.0,
    shear: float = 16.0,
    translate: float = 0.2,
    deform_p: float = 0.2,
    deformation: str = "elastic",
    noise_p: float = 0.2,
    blur_p: float = 0.2,
    contrast_p: float = 0.2,
) -> A.Compose:
    """Resize to ``img_size`` (cubic image, nearest labels), then DAE-Former's augmentations.

    DAE-Former draws 0-4 of ten imgaug transforms per slice; here each has its own probability.
    The affine draws scale, rotation, shear and translation together.
    """
    if deformation not in ("elastic", "piecewise_affine"):
        raise ValueError(f"deformation must be 'elastic' or 'piecewise_affine', got {deformation!r}")
    if deformation == "elastic":
        deform = A.ElasticTransform(alpha=img_size * 0.4, sigma=img_size * 0.06, border_mode=cv2.BORDER_CONSTANT, p=deform_p)
    else:
        deform = A.PiecewiseAffine(scale=(0.008, 0.03), p=deform_p)
    return A.Compose(
        [
            A.Resize(img_size, img_size, interpolation=cv2.INTER_CUBIC),
            A.HorizontalFlip(p=flip_p),
            A.VerticalFlip(p=flip_p),
            A.Affine(
                scale=tuple(scale),
                rotate=(-rotate, rotate),
                shear=(-shear, shear),
                translate_percent=(-translate, translate),
                border_mode=cv2.BORDER_CONSTANT,
                p=affine_p,
            ),
            deform,
            A.GaussNoise(std_range=(0.005, 0.03), p=noise_p),
            A.GaussianBlur(sigma_limit=(0.5, 1.0), p=blur_p),
            A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.5, p=contrast_p),
        ]
    )


# -- layouts -----------------------------------------------------------------------------------


def _child(folder: Path, names: tuple[str, ...]) -> Optional[Path]:
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    return None


def find_list(root: Path, list_dir: Optional[Path], name: str) -> Optional[Path]:
    """``name`` (``train.txt``, ``test_vol.txt``) in ``list_dir``, else in the usual places under root."""
    folders = [list_dir] if list_dir is not None else [root / sub for sub in LIST_DIRS]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    if list_dir is not None:
        raise DatasetNotFoundError(list_dir / name, "list file does not exist")
    return None


def read_list(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise EmptyDatasetError(path, "list is empty")
    return names


SLICE_NAME = re.compile(r"^(?P<case>.+)_slice(?P<index>\d+)$")


def case_of(slice_name: str) -> str:
    """``case0005`` from ``case0005_slice012``."""
    match = SLICE_NAME.match(slice_name)
    return match.group("case") if match else slice_name


def detect_layout(root: Path, layout: str) -> str:
    if layout not in LAYOUTS:
        raise LayoutError(root, f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout != "auto":
        return layout
    if (root / "train_npz").is_dir() or (root / "test_vol_h5").is_dir():
        return "transunet"
    if _nifti_folders(root):
        return "nifti"
    raise LayoutError(root, "no train_npz/ or test_vol_h5/ (TransUNet) and no NIfTI img/ + label/ folders")


def _nifti_folders(root: Path) -> list[tuple[str, Path, Optional[Path]]]:
    """(split hint, image folder, label folder) for every NIfTI folder pair under root."""
    found = []
    for split, parents in (("train", ("Training", "training", "train", ".")), ("test", ("Testing", "testing", "test"))):
        for parent in parents:
            images = _child(root / parent, IMAGE_DIRS)
            if images is not None and any(is_nifti(p) for p in images.iterdir()):
                found.append((split, images, _child(root / parent, LABEL_DIRS)))
                break
    images_ts = _child(root, ("imagesTs",))
    if images_ts is not None and any(is_nifti(p) for p in images_ts.iterdir()):
        found.append(("test", images_ts, _child(root, ("labelsTs",))))
    return found


class SynapseDataModule(BaseDataModule):
    """Synapse in any layout of this module's docstring, or the built-in phantoms.

    Args:
        layout: ``auto``, ``transunet`` or ``nifti``.
        img_size: side of the training slices (DAE-Former: 224); the task predicts at it too.
        num_classes: classes including background (Synapse: 9); larger labels are an error.
        val_cases: training cases held out, whole, for validation (0: no validation).
        split_seed: seed of that hold-out.
        list_dir: folder of ``train.txt`` / ``test_vol.txt`` if not in a usual place.
        hu_window: HU window of NIfTI volumes (TransUNet: -125 .. 275).
        label_map: NIfTI label mapping, ``btcv`` (13 BTCV organs -> 8) or None.
        use_spacing: report HD95 in millimetres where the data has a spacing (NIfTI).
        flip_p, affine_p, scale, rotate, shear, translate, deform_p, deformation, noise_p,
            blur_p, contrast_p: the training augmentation (``synapse_augmentation``).
        builtin_train_cases / builtin_test_cases / builtin_size / builtin_slices: the phantoms.
        **kwargs: ``BaseDataModule`` arguments (root, batch sizes, workers, predict folders).
    """

    def __init__(
        self,
        layout: str = "auto",
        img_size: int = 224,
        num_classes: int = 9,
        val_cases: int = 0,
        split_seed: int = 0,
        list_dir: Optional[str] = None,
        hu_window: tuple[float, float] = (-125.0, 275.0),
        label_map: Optional[str] = None,
        use_spacing: bool = True,
        flip_p: float = 0.2,
        affine_p: float = 0.5,
        scale: tuple[float, float] = (0.5, 2.0),
        rotate: float = 40.0,
        shear: float = 16.0,
        translate: float = 0.2,
        deform_p: float = 0.2,
        deformation: str = "elastic",
        noise_p: float = 0.2,
        blur_p: float = 0.2,
        contrast_p: float = 0.2,
        builtin_train_cases: int = 12,
        builtin_test_cases: int = 4,
        builtin_size: int = 96,
        builtin_slices: int = 40,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if label_map is not None and label_map not in LABEL_MAPS:
            raise ValueError(f"label_map must be one of {sorted(LABEL_MAPS)} or None, got {label_map!r}")
        self.layout = layout
        self.img_size = img_size
        self.num_classes = num_classes
        self.val_cases = val_cases
        self.split_seed = split_seed
        self.list_dir = Path(list_dir) if list_dir else None
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.label_map = label_map
        self.use_spacing = use_spacing
        self.augmentation = dict(
            flip_p=flip_p, affine_p=affine_p, scale=tuple(scale), rotate=rotate, shear=shear, translate=translate,
            deform_p=deform_p, deformation=deformation, noise_p=noise_p, blur_p=blur_p, contrast_p=contrast_p,
        )  # fmt: skip
        synapse_augmentation(img_size, **self.augmentation)  # reject bad arguments now, not in a worker
        self._nifti_cases: dict[str, NiftiCase] = {}  # training cases of a NIfTI root, by name
        self._predict_sources: dict[str, VolumeSource] = {}
        self.builtin_params = dict(
            train_cases=builtin_train_cases, test_cases=builtin_test_cases, size=builtin_size, slices=builtin_slices
        )

    def builtin_root(self) -> Path:
        from data.builtin_abdomen import build_builtin_synapse

        return build_builtin_synapse(**self.builtin_params)

    def prepare_data(self) -> None:
        super().prepare_data()
        if self.root is not None and detect_layout(self.resolved_root(), self.layout) == "nifti":
            for case in self._nifti_split(self.resolved_root())["train"]:
                case.cached()  # one process per node converts the training volumes

    # -- splits ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "predict":
            self.datasets["predict"] = SynapseVolumes(self._predict_volumes(), self.num_classes)
            self.dataset_name = Path(self.predict_dir).name
            return
        root = self.resolved_root()
        layout = detect_layout(root, self.layout)
        self.dataset_name = "built-in phantoms (Synapse layout)" if self.root is None else f"{layout}:{root.name}"
        if layout == "transunet":
            train_slices, test_volumes = self._transunet_split(root, stage)
        else:
            train_slices, test_volumes = self._nifti_sources(root, stage)
        if stage in ("fit", "validate"):
            train, val = self._hold_out(train_slices, root)
            if stage == "validate" and not val:
                raise DatasetNotFoundError(root, "Synapse has no validation split; hold out cases with --data.val_cases")
            transform = synapse_augmentation(self.img_size, **self.augmentation)
            self.datasets["train"] = SynapseSlices([source for _, source in train], self.num_classes, transform)
            if val:
                self.datasets["val"] = SynapseVolumes(val, self.num_classes)
        if stage == "test":
            self.datasets["test"] = SynapseVolumes(test_volumes, self.num_classes)

    def _transunet_split(self, root: Path, stage: str) -> tuple[list[tuple[str, NpzSlice]], list[VolumeSource]]:
        train, test = [], []
        if stage in ("fit", "validate"):
            folder = root / "train_npz"
            if not folder.is_dir():
                raise DatasetNotFoundError(folder, "training folder does not exist")
            listed = find_list(root, self.list_dir, "train.txt")
            names = read_list(listed) if listed else sorted(p.stem for p in folder.glob("*.npz"))
            if not names:
                raise EmptyDatasetError(folder, "holds no .npz slices")
            train = [(name, NpzSlice(folder / f"{name}.npz")) for name in names]
            for _, source in train:
                if not source.path.is_file():
                    raise DatasetNotFoundError(source.path, f"listed in {listed} but does not exist")
        if stage == "test":
            folder = root / "test_vol_h5"
            if not folder.is_dir():
                raise DatasetNotFoundError(folder, "test folder does not exist")
            listed = find_list(root, self.list_dir, "test_vol.txt")
            names = read_list(listed) if listed else sorted(p.name.split(".")[0] for p in folder.glob("*.h5"))
            if not names:
                raise EmptyDatasetError(folder, "holds no .h5 volumes")
            test = [H5Volume(name, _h5_path(folder, name)) for name in names]
            for volume in test:
                if not volume.path.is_file():
                    raise DatasetNotFoundError(volume.path, f"listed in {listed} but does not exist")
        return train, test

    def _nifti_split(self, root: Path) -> dict[str, list[NiftiCase]]:
        """NIfTI cases by split: TransUNet's lists if present, else the folders' own split."""
        by_split: dict[str, dict[str, tuple]] = {"train": {}, "test": {}}
        for split, images, labels in _nifti_folders(root):
            by_split[split].update(pair_cases(images, labels))
        train_list = find_list(root, self.list_dir, "train.txt")
        test_list = find_list(root, self.list_dir, "test_vol.txt")
        if train_list or test_list:
            everything = {**by_split["train"], **by_split["test"]}
            by_split = {"train": {}, "test": {}}
            for split, listed in (("train", train_list), ("test", test_list)):
                for case in dict.fromkeys(case_of(name) for name in (read_list(listed) if listed else [])):
                    if case not in everything:
                        raise DatasetNotFoundError(root, f"{case} is listed in {listed} but has no NIfTI volume")
                    by_split[split][case] = everything[case]
        return {
            split: [NiftiCase(case, image, label, self.hu_window, self.label_map) for case, (image, label) in cases.items()]
            for split, cases in by_split.items()
        }

    def _nifti_sources(self, root: Path, stage: str) -> tuple[list[tuple[str, CachedSlice]], list[VolumeSource]]:
        split = self._nifti_split(root)
        train, test = [], []
        if stage in ("fit", "validate"):
            if not split["train"]:
                raise DatasetNotFoundError(root, "no NIfTI training volumes (Training/img/ + Training/label/ or imagesTr/ + labelsTr/)")
            self._nifti_cases = {case.name: case for case in split["train"]}
            for case in split["train"]:
                folder = case.cached()
                depth = np.load(folder / "image.npy", mmap_mode="r").shape[0]
                train += [(f"{case.name}_slice{z:03d}", CachedSlice(folder, z, case.label)) for z in range(depth)]
        if stage == "test":
            if not split["test"]:
                raise DatasetNotFoundError(root, "no NIfTI test volumes (Testing/img/ + Testing/label/, imagesTs/ + labelsTs/, or test_vol.txt)")
            for case in split["test"]:
                if case.label is None:
                    raise DatasetNotFoundError(case.image, "test volume has no label map to score against")
            test = [NiftiVolume(case, self.use_spacing) for case in split["test"]]
        return train, test

    def _hold_out(self, train: list[tuple[str, object]], root: Path) -> tuple[list, list[VolumeSource]]:
        """Move ``val_cases`` whole training cases into validation volumes."""
        if self.val_cases <= 0:
            return train, []
        cases = sorted(dict.fromkeys(case_of(name) for name, _ in train))
        if len(cases) <= self.val_cases:
            raise EmptyDatasetError(root, f"{len(cases)} training cases are too few to hold out {self.val_cases}")
        order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        held = {cases[i] for i in order[: self.val_cases]}
        kept = [(name, source) for name, source in train if case_of(name) not in held]
        val: list[VolumeSource] = []
        for case in sorted(held):
            if case in self._nifti_cases:
                val.append(NiftiVolume(self._nifti_cases[case], self.use_spacing))
                continue
            members = [(name, source) for name, source in train if case_of(name) == case]
            if any(not SLICE_NAME.match(name) for name, _ in members):
                raise LayoutError(root, f"cannot rebuild case {case} from slices not named <case>_slice<N>")
            members.sort(key=lambda item: int(SLICE_NAME.match(item[0]).group("index")))
            val.append(StackedSlices(case, tuple(source.path for _, source in members)))
        return kept, val

    def _predict_volumes(self) -> list[VolumeSource]:
        if self.predict_dir is None:
            raise DatasetNotFoundError("--data.predict_dir", "predict needs a folder of volumes (.npy.h5 / .h5 / .nii.gz)")
        folder = Path(self.predict_dir)
        if not folder.is_dir():
            raise DatasetNotFoundError(folder, "predict folder does not exist")
        volumes: list[VolumeSource] = []
        for path in sorted(folder.iterdir()):
            if path.name.endswith(".h5"):
                volumes.append(H5Volume(path.name, path, with_label=False))
            elif is_nifti(path):
                volumes.append(NiftiVolume(NiftiCase(path.name, path, None, self.hu_window, self.label_map)))
        if not volumes:
            raise EmptyDatasetError(folder, "holds no volumes (.npy.h5, .h5, .nii, .nii.gz)")
        self.prediction_paths([volume.name for volume in volumes])  # refuse before writing any
        self._predict_sources = {volume.name: volume for volume in volumes}
        return volumes

    # -- loaders and outputs -----------------------------------------------------------------
    def val_dataloader(self) -> Union[DataLoader, list]:
        # With no held-out cases Lightning skips validation (and the last checkpoint is the best).
        return self._loader("val", shuffle=False, batch_size=self.eval_batch_size) if "val" in self.datasets else []

    def write_prediction(self, prediction: torch.Tensor, names: list[str]) -> None:
        """Label volumes under the input's name: NIfTI with the input's affine, or h5 ``label``."""
        for labels, path in zip(prediction, self.prediction_paths(names)):
            path.parent.mkdir(parents=True, exist_ok=True)
            volume = labels.detach().cpu().numpy().astype(np.uint8)
            source = self._predict_sources[path.name]
            if isinstance(source, NiftiVolume):
                nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), source.case.affine()), str(path))
            else:
                with h5py.File(path, "w") as handle:
                    handle.create_dataset("label", data=volume, compression="gzip")


def _h5_path(folder: Path, name: str) -> Path:
    """TransUNet names test volumes ``caseXXXX.npy.h5``; plain ``caseXXXX.h5`` is accepted too."""
    for candidate in (folder / f"{name}.npy.h5", folder / f"{name}.h5", folder / name):
        if candidate.is_file():
            return candidate
    return folder / f"{name}.npy.h5"
