"""Tiny Synapse datasets written by the tests: TransUNet's npz / h5 layout and NIfTI folders."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np


def organ_volume(rng: np.random.Generator, depth: int, height: int, width: int, organs: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A volume in [0, 1] with one bright box per organ (each a distinct intensity) and its labels."""
    label = np.zeros((depth, height, width), np.float32)
    for organ in range(1, organs + 1):
        z, y, x = rng.integers(0, depth), rng.integers(0, height - 4), rng.integers(0, width - 4)
        label[z : z + 2, y : y + 4, x : x + 4] = organ
    image = (0.1 + 0.1 * label + rng.normal(0, 0.01, label.shape)).clip(0, 1).astype(np.float32)
    return image, label


def write_transunet(
    root: Path,
    train_cases: dict[str, int] | None = None,
    test_cases: tuple[str, ...] = ("case0001", "case0002"),
    size: tuple[int, int] = (24, 20),
    lists: bool = True,
    seed: int = 0,
) -> Path:
    """``train_npz/<case>_sliceNNN.npz``, ``test_vol_h5/<case>.npy.h5`` and the two lists."""
    rng = np.random.default_rng(seed)
    train_cases = train_cases or {"case0005": 4, "case0006": 3, "case0007": 3}
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir(parents=True)
    names = []
    for case, depth in train_cases.items():
        image, label = organ_volume(rng, depth, *size)
        for z in range(depth):
            name = f"{case}_slice{z:03d}"
            np.savez(root / "train_npz" / f"{name}.npz", image=image[z], label=label[z])
            names.append(name)
    for case in test_cases:
        image, label = organ_volume(rng, 5, *size)
        with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as handle:
            handle.create_dataset("image", data=image)
            handle.create_dataset("label", data=label)
    if lists:
        (root / "lists_Synapse").mkdir()
        (root / "lists_Synapse" / "train.txt").write_text("\n".join(names) + "\n")
        (root / "lists_Synapse" / "test_vol.txt").write_text("\n".join(test_cases) + "\n")
    return root


def write_nifti_case(image_path: Path, label_path: Path | None, rng: np.random.Generator, shape=(20, 16, 6), spacing=(0.8, 0.7, 2.5), labels=None):
    """A CT volume in HU (nibabel's x, y, z order) with boxes of organ labels."""
    hu = rng.normal(-500, 50, shape).astype(np.float32)
    label = np.zeros(shape, np.int16)
    for organ in labels or range(1, 9):
        x, y, z = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3), rng.integers(0, shape[2])
        label[x : x + 3, y : y + 3, z] = organ
        hu[x : x + 3, y : y + 3, z] = 20 * organ
    affine = np.diag([*spacing, 1.0])
    image_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, affine), str(image_path))
    if label_path is not None:
        label_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(label, affine), str(label_path))
    return hu, label


def write_raw_synapse(root: Path, train=(1, 2, 3), test=(4,), seed: int = 0) -> Path:
    """The raw download's tree: ``Training/img/imgNNNN.nii.gz`` + ``Training/label/labelNNNN.nii.gz``,
    and a labelled ``Testing`` folder."""
    rng = np.random.default_rng(seed)
    for split, numbers in (("Training", train), ("Testing", test)):
        for n in numbers:
            write_nifti_case(root / split / "img" / f"img{n:04d}.nii.gz", root / split / "label" / f"label{n:04d}.nii.gz", rng)
    return root
