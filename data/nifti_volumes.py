"""CT volumes and label maps as NIfTI files (``.nii`` / ``.nii.gz``), read with nibabel.

This is how the Synapse / BTCV data ship before TransUNet's preprocessing (``RawData/Training/
img/img0001.nii.gz`` with ``label/label0001.nii.gz``), and how nnU-Net / the Medical Segmentation
Decathlon lay data out (``imagesTr/BTCV_001_0000.nii.gz`` with ``labelsTr/BTCV_001.nii.gz``).
A volume and its labels are paired by the last run of digits in the file name, after dropping
the extension and nnU-Net's ``_0000`` channel suffix; both become case ``caseNNNN``.

Volumes are turned into TransUNet's form on reading: voxels reordered from nibabel's (x, y, z)
to (z, y, x), as SimpleITK and the preprocessed h5 files have them; intensities clipped to a HU
window (TransUNet: [-125, 275]) and scaled to [0, 1]; labels optionally mapped (BTCV's 13 organs
to Synapse's 8). The voxel spacing from the header is kept, so HD95 can be given in millimetres.
A NaN or infinite voxel is an error naming the file (windowing would hide an infinity as 0 or 1).

Training samples 2D slices at random, and decompressing a whole ``.nii.gz`` for each slice
would be slow, so each training volume is converted once into uncompressed ``.npy`` arrays in
the cache folder (``data.base.build_once``) and its slices are read by memory mapping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from data.base import build_once
from data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    InvalidValueError,
    LabelRangeError,
    MissingPairError,
    ShapeMismatchError,
    UnreadableFileError,
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# BTCV label ids -> TransUNet's Synapse ids (1 aorta, 2 gallbladder, 3 left kidney, 4 right kidney,
# 5 liver, 6 pancreas, 7 spleen, 8 stomach); the other five BTCV structures become background.
LABEL_MAPS = {"btcv": {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}}


def is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def case_key(path: Path) -> Optional[str]:
    """``caseNNNN`` from the last digits of the file name (``img0001.nii.gz`` -> ``case0001``)."""
    stem = path.name
    for suffix in NIFTI_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    stem = re.sub(r"_0000$", "", stem)
    digits = re.findall(r"\d+", stem)
    return f"case{int(digits[-1]):04d}" if digits else None


def list_cases(folder: Path) -> dict[str, Path]:
    """The NIfTI files of ``folder`` by case; two files of one case are an error."""
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not is_nifti(path):
            continue
        key = case_key(path)
        if key is None:
            raise UnreadableFileError(path, "has no case number in its name (expected e.g. img0001.nii.gz)")
        if key in cases:
            raise UnreadableFileError(path, f"is a second file for {key} beside {cases[key].name}")
        cases[key] = path
    return cases


def pair_cases(image_dir: Path, label_dir: Optional[Path]) -> dict[str, tuple[Path, Optional[Path]]]:
    """Match volumes with their label maps by case; every file needs its partner."""
    images = list_cases(image_dir)
    if not images:
        raise EmptyDatasetError(image_dir, "holds no NIfTI volumes (.nii or .nii.gz)")
    if label_dir is None:
        return {case: (path, None) for case, path in images.items()}
    labels = list_cases(label_dir)
    for case, path in images.items():
        if case not in labels:
            raise MissingPairError(path, f"no label map for {case} in {label_dir}")
    for case, path in labels.items():
        if case not in images:
            raise MissingPairError(path, f"no volume for {case} in {image_dir}")
    return {case: (images[case], labels[case]) for case in sorted(images)}


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 3D NIfTI file as a (z, y, x) float32 array, its (z, y, x) voxel spacing and its affine."""
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises several types for truncated or foreign files
        raise UnreadableFileError(path, f"cannot read NIfTI ({type(error).__name__}: {error})") from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UnreadableFileError(path, f"is not a 3D volume (shape {data.shape})")
    finite = np.isfinite(data)
    if not finite.all():  # windowing would turn inf into a valid 0 or 1 and carry NaN into training
        raise InvalidValueError(path, f"{int(finite.size - finite.sum())} of {data.size} voxels are NaN or infinite")
    spacing = np.asarray(image.header.get_zooms()[:3], dtype=np.float32)[::-1].copy()
    return np.ascontiguousarray(data.transpose(2, 1, 0)), spacing, image.affine


def window_hu(volume: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to the HU ``window`` and scale to [0, 1] (TransUNet's preprocessing)."""
    low, high = window
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


def map_labels(label: np.ndarray, label_map: Optional[str], path: Path) -> np.ndarray:
    """Apply a named label mapping (``"btcv"``), or return the labels unchanged."""
    if label_map is None:
        return label
    if label_map not in LABEL_MAPS:
        raise ValueError(f"unknown label_map {label_map!r}; choose one of {sorted(LABEL_MAPS)}")
    mapped = np.zeros_like(label)
    for source, target in LABEL_MAPS[label_map].items():
        mapped[label == source] = target
    return mapped


@dataclass(frozen=True)
class NiftiCase:
    """One CT volume and (optionally) its label map, read into TransUNet's form."""

    name: str
    image: Path
    label: Optional[Path]
    window: tuple[float, float] = (-125.0, 275.0)
    label_map: Optional[str] = None

    def load(self) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
        """Windowed image in [0, 1] (z, y, x), labels (same shape, or None) and spacing (z, y, x)."""
        volume, spacing, _ = read_nifti(self.image)
        label = None
        if self.label is not None:
            label, _, _ = read_nifti(self.label)
            if label.shape != volume.shape:
                raise ShapeMismatchError(self.label, f"shape {label.shape} differs from its volume {self.image} {volume.shape}")
            label = map_labels(label, self.label_map, self.label)
        return window_hu(volume, self.window), label, spacing

    def affine(self) -> np.ndarray:
        return read_nifti(self.image)[2]

    def cached(self) -> Path:
        """Convert once to ``image.npy`` / ``label.npy`` under the cache folder; returns the folder."""
        if not self.image.is_file():
            raise DatasetNotFoundError(self.image, "volume does not exist")
        stat = self.image.stat()
        label_stat = self.label.stat() if self.label is not None else None
        params = dict(
            image=str(self.image.resolve()),
            image_size=stat.st_size,
            image_mtime=stat.st_mtime_ns,
            label=str(self.label.resolve()) if self.label is not None else None,
            label_mtime=label_stat.st_mtime_ns if label_stat else None,
            window=list(self.window),
            label_map=self.label_map,
        )

        def write(folder: Path) -> None:
            image, label, spacing = self.load()
            if label is None:
                raise MissingPairError(self.image, "a training volume needs its label map")
            if not np.array_equal(label, np.round(label)) or label.min() < 0 or label.max() > np.iinfo(np.int16).max:
                raise LabelRangeError(self.label, f"label values must be non-negative integers (found {label.min():g} .. {label.max():g})")
            np.save(folder / "image.npy", image)
            np.save(folder / "label.npy", label.astype(np.int16))
            np.save(folder / "spacing.npy", spacing)

        return build_once(f"nifti_{self.name}", params, write)
