"""Paired low-light datasets: LOL-v1, LOL-v2 (real and synthetic), and plain folders of pairs.

Supported layouts under ``root`` (folder names are matched case-insensitively):

=====================  ==========================================  ====================
layout                 splits                                      pair folders
=====================  ==========================================  ====================
``lol_v1``             ``our485/`` (train), ``eval15/`` (test)     ``low/``, ``high/``
``lol_v2_real``        ``Real_captured/{Train,Test}/``             ``Low/``, ``Normal/``
``lol_v2_synthetic``   ``Synthetic/{Train,Test}/``                 ``Low/``, ``Normal/``
``retinexformer``      ``{Train,Test}/`` (Retinexformer's tree)     ``input/``, ``target/``
``pairs``              ``{train,val,test}/`` or none (all = test)  ``low/``, ``high/``
=====================  ==========================================  ====================

A pair is matched by file stem after dropping a leading ``low``/``high``/``normal`` (LOL-v2-real
names its files ``low00690.png`` / ``normal00690.png``). A file without its partner, a pair of
different sizes, or an undecodable image raises an error naming the file: nothing is skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from data.base import BaseDataModule
from data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    LayoutError,
    MissingPairError,
    ShapeMismatchError,
    UnreadableFileError,
)
from data.sampling import SampleKey, sample_key, seed_transform

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
SPLIT_NAMES = {"train": ("our485", "train"), "val": ("val",), "test": ("eval15", "test")}
LOW_NAMES = ("low", "input")
HIGH_NAMES = ("high", "normal", "target", "gt")
LOL_V2_SUBSETS = {"lol_v2_real": "real_captured", "lol_v2_synthetic": "synthetic"}
LAYOUTS = ("auto", "lol_v1", "lol_v2_real", "lol_v2_synthetic", "retinexformer", "pairs")


def _child(folder: Path, names: tuple[str, ...]) -> Optional[Path]:
    """The first sub-folder of ``folder`` whose lower-cased name is in ``names``."""
    if not folder.is_dir():
        return None
    children = {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}
    for name in names:
        if name in children:
            return children[name]
    return None


def _pair_key(path: Path) -> str:
    return re.sub(r"^(low|high|normal)[_-]?", "", path.stem, flags=re.IGNORECASE)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 array, or raise an error naming the file."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UnreadableFileError(path, f"cannot decode image ({error})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UnreadableFileError(path, f"cannot read image header ({error})") from None


def find_pairs(split_dir: Path) -> list[tuple[Path, Path]]:
    """Match the low and high images of one split folder; every file must have its partner."""
    low_dir, high_dir = _child(split_dir, LOW_NAMES), _child(split_dir, HIGH_NAMES)
    if low_dir is None or high_dir is None:
        raise LayoutError(split_dir, f"expected sub-folders {'/'.join(LOW_NAMES)} and {'/'.join(HIGH_NAMES)}")
    lows = {_pair_key(p): p for p in list_images(low_dir)}
    highs = {_pair_key(p): p for p in list_images(high_dir)}
    if not lows:
        raise EmptyDatasetError(low_dir, "holds no images")
    for key, path in lows.items():
        if key not in highs:
            raise MissingPairError(path, f"no reference image for it in {high_dir}")
    for key, path in highs.items():
        if key not in lows:
            raise MissingPairError(path, f"no low-light image for it in {low_dir}")
    pairs = [(lows[key], highs[key]) for key in sorted(lows)]
    for low, high in pairs:
        low_size, high_size = image_size(low), image_size(high)
        if low_size != high_size:
            raise ShapeMismatchError(low, f"size {low_size} differs from its reference {high} {high_size}")
    return pairs


def discover_splits(root: Path, layout: str = "auto") -> tuple[str, dict[str, Path]]:
    """Find the layout of ``root`` and the folder of each split it has.

    Returns the layout name and ``{split: folder}``; a folder of bare pairs (``low/`` and
    ``high/`` directly under ``root``) is a single test split.
    """
    if layout not in LAYOUTS:
        raise LayoutError(root, f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    base = root
    subsets = {name: _child(root, (folder,)) for name, folder in LOL_V2_SUBSETS.items()}
    if layout in LOL_V2_SUBSETS:
        base = subsets[layout] or root
    elif layout == "auto" and any(subsets.values()):
        present = [name for name, folder in subsets.items() if folder is not None]
        if len(present) > 1:
            raise LayoutError(root, f"holds both LOL-v2 subsets; set --data.layout to {' or '.join(present)}")
        layout, base = present[0], subsets[present[0]]

    if _child(base, LOW_NAMES) and _child(base, HIGH_NAMES):
        return ("pairs" if layout == "auto" else layout), {"test": base}
    splits = {split: folder for split, names in SPLIT_NAMES.items() if (folder := _child(base, names))}
    if not splits:
        raise LayoutError(
            root,
            "no LOL-v1 (our485/, eval15/), LOL-v2 (Real_captured/, Synthetic/), Train/Test or low/+high/ folders",
        )
    if layout == "auto":
        names = {p.name.lower() for p in splits.values()}
        layout = "lol_v1" if "our485" in names or "eval15" in names else "pairs"
        if _child(next(iter(splits.values())), ("input",)):
            layout = "retinexformer"
    return layout, splits


class PairedImageDataset(Dataset):
    """(low, high) image pairs as ``{"image", "target", "name"}`` float tensors in [0, 1].

    Args:
        pairs: (low path, high path) for each sample.
        transform: an albumentations transform applied identically to both images, or ``None``.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], transform: Optional[A.BasicTransform] = None):
        self.pairs = pairs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: SampleKey) -> dict:
        index, seed = sample_key(key)
        low_path, high_path = self.pairs[index]
        low, high = read_rgb(low_path), read_rgb(high_path)
        if low.shape != high.shape:  # header and pixels disagree: a broken file
            raise ShapeMismatchError(low_path, f"decoded size {low.shape} differs from {high_path} {high.shape}")
        if self.transform is not None:
            seed_transform(self.transform, seed)  # the same crop and flips whenever this draw recurs
            out = self.transform(image=low, target=high)
            low, high = out["image"], out["target"]
        return {"image": to_tensor(low), "target": to_tensor(high), "name": low_path.name}


class ImageFolderDataset(Dataset):
    """Every image in a folder, for ``predict``: ``{"image", "name"}``."""

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise DatasetNotFoundError(folder, "predict folder does not exist")
        self.paths = list_images(folder)
        if not self.paths:
            raise EmptyDatasetError(folder, f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        return {"image": to_tensor(read_rgb(path)), "name": path.name}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def paired_augmentation(patch_size: int) -> A.Compose:
    """The same random crop, flips and 90-degree turns on the dark image and its reference."""
    return A.Compose(
        [
            A.PadIfNeeded(min_height=patch_size, min_width=patch_size, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(height=patch_size, width=patch_size),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
        ],
        additional_targets={"target": "image"},
    )


class LowLightDataModule(BaseDataModule):
    """Low-light enhancement data in any layout of this module's table, or the built-in default.

    Args:
        layout: one of ``auto``, ``lol_v1``, ``lol_v2_real``, ``lol_v2_synthetic``,
            ``retinexformer``, ``pairs``; ``auto`` detects it from the folder names.
        patch_size: side of the random training crop.
        val_fraction: share of the training pairs held out for validation when the layout has
            no validation split (LOL has none); chosen with ``split_seed``.
        split_seed: seed of that hold-out.
        builtin_train_images / builtin_test_images / builtin_size: size of the built-in set.
        **kwargs: ``BaseDataModule`` arguments (root, batch sizes, workers, predict folders).
    """

    def __init__(
        self,
        layout: str = "auto",
        patch_size: int = 128,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        builtin_train_images: int = 240,
        builtin_test_variants: int = 4,
        builtin_crop: int = 192,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.layout = layout
        self.patch_size = patch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.builtin_params = dict(
            train_images=builtin_train_images, test_variants=builtin_test_variants, crop=builtin_crop
        )

    def builtin_root(self) -> Path:
        from data.builtin_low_light import build_builtin_lol

        return build_builtin_lol(**self.builtin_params)

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if self.predict_dir is None:
                raise DatasetNotFoundError("--data.predict_dir", "predict needs a folder of images")
            dataset = ImageFolderDataset(Path(self.predict_dir))
            self.prediction_paths([path.name for path in dataset.paths])  # refuse before writing any
            self.datasets["predict"] = dataset
            self.dataset_name = Path(self.predict_dir).name
            return
        root = self.resolved_root()
        layout, splits = discover_splits(root, self.layout)
        self.dataset_name = "built-in (LOL-v1 layout)" if self.root is None else f"{layout}:{root.name}"
        needed = {"fit": ("train",), "validate": ("train",), "test": ("test",)}[stage]
        if stage == "validate" and "val" in splits:
            needed = ("val",)
        for split in needed:
            if split not in splits:
                raise DatasetNotFoundError(root, f"layout {layout} has no {split} split")
        if "train" in needed:
            train_pairs = find_pairs(splits["train"])
            if "val" in splits:
                val_pairs = find_pairs(splits["val"])
            else:
                train_pairs, val_pairs = self._hold_out(train_pairs, splits["train"])
            self.datasets["train"] = PairedImageDataset(train_pairs, paired_augmentation(self.patch_size))
            self.datasets["val"] = PairedImageDataset(val_pairs)
        if "test" in needed:
            self.datasets["test"] = PairedImageDataset(find_pairs(splits["test"]))

    def _hold_out(self, pairs: list, folder: Path) -> tuple[list, list]:
        n_val = max(1, round(len(pairs) * self.val_fraction))
        if len(pairs) <= n_val:
            raise EmptyDatasetError(folder, f"{len(pairs)} pairs are too few to hold out {n_val} for validation")
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        val = sorted(order[:n_val])
        train = sorted(order[n_val:])
        return [pairs[i] for i in train], [pairs[i] for i in val]

    def write_prediction(self, prediction: torch.Tensor, names: list[str]) -> None:
        for image, path in zip(prediction, self.prediction_paths(names)):
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            Image.fromarray(pixels).save(path)
