"""Scene-classification datasets stored as class folders: AID, NWPU-RESISC45, UC Merced.

Layout: one folder per class holding that class's images (``.jpg``, ``.png``, ``.tif``, ...):

=================  ===========================================  =========  =====================
dataset            folders as published                         classes    papers' train ratios
=================  ===========================================  =========  =====================
AID                ``AID/<Class>/<class>_N.jpg`` (600 x 600)     30         20 %, 50 %
NWPU-RESISC45      ``NWPU-RESISC45/<class>/<class>_NNN.jpg``     45         10 %, 20 %
UC Merced          ``UCMerced_LandUse/Images/<class>/*.tif``     21         50 %, 80 %
=================  ===========================================  =========  =====================

``root`` may be the folder holding the class folders or any folder above it that holds nothing
but a single sub-folder (``UCMerced_LandUse/`` -> ``Images/``, an archive's top folder).

Splits, in order of precedence:

1. ``split_dir`` (or ``root`` itself) holding ``train.txt`` and ``test.txt`` (and optionally
   ``val.txt``): one image per line, as ``<class>/<file>`` relative to the class folders; lines
   starting with ``#`` are comments. These are read as they are.
2. Otherwise a stratified split is drawn: in every class, ``train_ratio`` of the images (the
   papers' protocol) are for training and the rest for testing; ``val_ratio`` of each class's
   training images are held out for validation (model selection), so the test split is exactly
   the protocol's. The draw is seeded by ``split_seed`` and written as the three text files to
   ``split_dir`` (default: under the cache folder, named by dataset, ratios and seed), where
   every later run reads it back: runs are compared on the same split.

An undecodable image, an empty class folder, a class with no image in one of the splits, a
listed file that is missing, or an image listed twice raise an error naming the file or class.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Optional, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from data.atomic_write import write_text_atomically
from data.base import BaseDataModule, cache_root
from data.errors import DatasetNotFoundError, EmptyDatasetError, LayoutError, SplitError
from data.lol import IMAGE_SUFFIXES, list_images, read_rgb, to_tensor
from data.sampling import SampleKey, sample_key, seed_transform

SPLITS = ("train", "val", "test")
PREDICTIONS_FILE = "predictions.csv"


# -- the class folders ---------------------------------------------------------------------


def find_class_root(root: Path) -> Path:
    """The folder whose sub-folders are the classes: ``root``, or the only sub-folder below it."""
    folder = root
    for _ in range(3):
        children = [p for p in folder.iterdir() if not p.name.startswith(".")]
        folders = [p for p in children if p.is_dir()]
        images = [p for p in children if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if len(folders) == 1 and not images and any(q.is_dir() for q in folders[0].iterdir()):
            folder = folders[0]
            continue
        break
    if not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
        raise LayoutError(root, "holds no class folders (expected <root>/<class>/<images>)")
    return folder


def scan_classes(class_root: Path) -> dict[str, list[str]]:
    """``{class: [relative paths "<class>/<file>", sorted]}`` for every class folder, sorted by name."""
    classes = {}
    for folder in sorted(p for p in class_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = list_images(folder)
        if not images:
            raise EmptyDatasetError(folder, f"class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        classes[folder.name] = [f"{folder.name}/{p.name}" for p in images]
    return classes


# -- splits --------------------------------------------------------------------------------


def stratified_split(
    classes: dict[str, list[str]], train_ratio: float, val_ratio: float, seed: int
) -> dict[str, list[str]]:
    """Per class: ``round(train_ratio * n)`` images for training (of which ``round(val_ratio *
    n_train)`` for validation) and the rest for testing, drawn by one seeded generator."""
    if not 0 < train_ratio < 1:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for name, files in classes.items():
        order = rng.permutation(len(files))
        n_train = round(train_ratio * len(files))
        n_val = round(val_ratio * n_train)
        counts = {"train": n_train - n_val, "val": n_val, "test": len(files) - n_train}
        if min(counts.values()) < 1:
            raise SplitError(
                name, f"class has {len(files)} images: too few for train_ratio {train_ratio} and val_ratio {val_ratio} "
                f"(would give train/val/test = {counts['train']}/{counts['val']}/{counts['test']})",
            )  # fmt: skip
        picked = [files[i] for i in order]
        splits["val"] += sorted(picked[:n_val])
        splits["train"] += sorted(picked[n_val:n_train])
        splits["test"] += sorted(picked[n_train:])
    return splits


def write_split_files(folder: Path, splits: dict[str, list[str]], header: str) -> None:
    """``<split>.txt`` per split, each written to a temporary name and renamed (safe under DDP)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, files in splits.items():
        write_text_atomically(folder / f"{split}.txt", f"# {header}\n" + "".join(f"{f}\n" for f in files))


def read_split_files(folder: Path, class_root: Path, classes: Sequence[str]) -> dict[str, list[str]]:
    """Read ``train.txt``, ``test.txt`` and (if present) ``val.txt``; check every line and that
    every class appears in every split and no image in two splits."""
    splits, seen = {}, {}
    for split in SPLITS:
        path = folder / f"{split}.txt"
        if not path.is_file():
            if split == "val":
                continue
            raise DatasetNotFoundError(path, f"split file missing (a split folder needs {', '.join(s + '.txt' for s in SPLITS)})")
        files = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        for entry in files:
            if not (class_root / entry).is_file():
                raise DatasetNotFoundError(class_root / entry, f"listed in {path} but missing")
            if entry.split("/")[0] not in classes:
                raise SplitError(path, f"{entry!r} is not inside one of the class folders of {class_root}")
            if entry in seen:
                raise SplitError(path, f"{entry!r} is also listed in {seen[entry]}")
            seen[entry] = path.name
        present = {entry.split("/")[0] for entry in files}
        missing = [name for name in classes if name not in present]
        if missing:
            raise SplitError(path, f"class {missing[0]!r} has no image in the {split} split" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
        splits[split] = files
    return splits


def split_cache_dir(class_root: Path, train_ratio: float, val_ratio: float, seed: int) -> Path:
    """Where generated split files of a dataset go by default (one folder per root and protocol)."""
    digest = hashlib.sha1(str(class_root.resolve()).encode()).hexdigest()[:8]
    return cache_root() / "scene_splits" / f"{dataset_label(class_root)}-{digest}" / f"train{train_ratio:g}-val{val_ratio:g}-seed{seed}"


def dataset_label(class_root: Path) -> str:
    """A dataset's name from its class folder root (UC Merced's ``Images/`` is named by its parent)."""
    return class_root.parent.name if class_root.name.lower() == "images" else class_root.name


# -- datasets ------------------------------------------------------------------------------


class SceneImageDataset(Dataset):
    """Images and class indices: ``{"image": (3, S, S) float in [0, 1], "label": int, "name": str}``."""

    def __init__(self, class_root: Path, files: list[str], class_index: dict[str, int], transform: A.Compose):
        self.class_root, self.files, self.transform = class_root, files, transform
        self.labels = [class_index[f.split("/")[0]] for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: SampleKey) -> dict:
        index, seed = sample_key(key)
        seed_transform(self.transform, seed)  # the same flips, rotation and jitter whenever this draw recurs
        image = self.transform(image=read_rgb(self.class_root / self.files[index]))["image"]
        return {"image": to_tensor(image), "label": self.labels[index], "name": self.files[index]}


class ImageListDataset(Dataset):
    """Every image of a folder, resized, for ``predict``: ``{"image", "name"}``."""

    def __init__(self, folder: Path, transform: A.Compose):
        if not folder.is_dir():
            raise DatasetNotFoundError(folder, "predict folder does not exist")
        self.paths, self.transform = list_images(folder), transform
        if not self.paths:
            raise EmptyDatasetError(folder, f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = self.transform(image=read_rgb(self.paths[index]))["image"]
        return {"image": to_tensor(image), "name": self.paths[index].name}


def train_augmentation(size: int) -> A.Compose:
    """The official recipe: resize, flips, rotation up to 30 degrees, colour jitter."""
    return A.Compose(
        [
            A.Resize(size, size, interpolation=cv2.INTER_AREA),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Rotate(limit=30, border_mode=cv2.BORDER_REFLECT_101, p=1.0),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1, p=1.0),
        ]
    )


def eval_transform(size: int) -> A.Compose:
    return A.Compose([A.Resize(size, size, interpolation=cv2.INTER_AREA)])


# -- the datamodule ------------------------------------------------------------------------


class SceneClassificationDataModule(BaseDataModule):
    """Class-folder scene datasets (see the module docstring), or the built-in rendered scenes.

    Args:
        image_size: side images are resized to (224 in the paper).
        train_ratio: share of each class used for training (AID 0.2 / 0.5, NWPU 0.1 / 0.2,
            UC Merced 0.5 / 0.8).
        val_ratio: share of each class's training images held out for validation.
        split_seed: seed of the stratified draw.
        split_dir: folder of ``train.txt`` / ``val.txt`` / ``test.txt``; read if they exist,
            else written there. Default: ``root`` if it holds them, else a cache folder.
        augment: the official training augmentation (flips, rotation, colour jitter).
        builtin_images_per_class / builtin_size: size of the built-in set.
        **kwargs: ``BaseDataModule`` arguments (root, batch sizes, workers, predict folders).
    """

    def __init__(
        self,
        image_size: int = 224,
        train_ratio: float = 0.2,
        val_ratio: float = 0.1,
        split_seed: int = 0,
        split_dir: Optional[str] = None,
        augment: bool = True,
        builtin_images_per_class: int = 100,
        builtin_size: int = 128,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.train_ratio, self.val_ratio, self.split_seed = train_ratio, val_ratio, split_seed
        self.split_dir = split_dir
        self.augment = augment
        self.builtin_params = dict(images_per_class=builtin_images_per_class, size=builtin_size)
        self.class_names: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def builtin_root(self) -> Path:
        from data.builtin_scenes import build_builtin_scenes

        return build_builtin_scenes(**self.builtin_params)

    def _splits(self) -> tuple[Path, dict[str, list[str]]]:
        """Class folder root and the split lists (read, or drawn and written)."""
        root = self.resolved_root()
        class_root = find_class_root(root)
        classes = scan_classes(class_root)
        self.class_names = list(classes)
        name = "built-in (UC Merced layout)" if self.root is None else dataset_label(class_root)
        if self.split_dir is not None:
            folder = Path(self.split_dir)
        elif (root / "train.txt").is_file():
            folder = root
        else:
            folder = split_cache_dir(class_root, self.train_ratio, self.val_ratio, self.split_seed)
        if not (folder / "train.txt").is_file():
            drawn = stratified_split(classes, self.train_ratio, self.val_ratio, self.split_seed)
            header = f"stratified split of {class_root}: train_ratio={self.train_ratio} val_ratio={self.val_ratio} seed={self.split_seed}"
            write_split_files(folder, drawn, header)
        splits = read_split_files(folder, class_root, self.class_names)
        drawn_here = folder == split_cache_dir(class_root, self.train_ratio, self.val_ratio, self.split_seed)
        protocol = f"train {self.train_ratio:.0%}, seed {self.split_seed}" if drawn_here else f"split {folder.name}"
        self.dataset_name = f"{name} ({protocol})"
        if "val" not in splits:
            raise DatasetNotFoundError(folder / "val.txt", "no validation split: add val.txt (checkpoints are chosen on it)")
        self.split_folder = folder
        return class_root, splits

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if self.predict_dir is None:
                raise DatasetNotFoundError("--data.predict_dir", "predict needs a folder of images")
            self.datasets["predict"] = ImageListDataset(Path(self.predict_dir), eval_transform(self.image_size))
            self.prediction_paths([predictions_file()])  # refuse an existing table before predicting
            self.dataset_name = Path(self.predict_dir).name
            return  # the task hands over the class names it was trained on (on_predict_start)
        class_root, splits = self._splits()
        index = {name: i for i, name in enumerate(self.class_names)}
        plain = eval_transform(self.image_size)
        train_transform = train_augmentation(self.image_size) if self.augment else plain
        self.datasets["train"] = SceneImageDataset(class_root, splits["train"], index, train_transform)
        self.datasets["train_plain"] = SceneImageDataset(class_root, splits["train"], index, plain)
        self.datasets["val"] = SceneImageDataset(class_root, splits["val"], index, plain)
        self.datasets["test"] = SceneImageDataset(class_root, splits["test"], index, plain)

    def plain_train_dataloader(self) -> DataLoader:
        """The training split without augmentation, in file order: what classical baselines fit on."""
        if "train_plain" not in self.datasets:
            self.setup("fit")
        return self._loader("train_plain", shuffle=False, batch_size=self.eval_batch_size)

    def write_prediction(self, prediction: torch.Tensor, names: list[str]) -> None:
        """Append ``name,class,probability`` rows (class probabilities in, top class out) to
        ``predictions.csv``, staged and moved into ``predict_output_dir`` when predict succeeds."""
        (path,) = self.prediction_paths([predictions_file()])
        path.parent.mkdir(parents=True, exist_ok=True)
        confidence, top = prediction.detach().float().cpu().max(dim=1)
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["name", "class", "probability"])
            for name, k, p in zip(names, top.tolist(), confidence.tolist()):
                writer.writerow([name, self.class_names[k], f"{p:.6f}"])


def predictions_file() -> str:
    """``predictions.csv``; under DDP each process writes its own share, ``predictions.rank<r>.csv``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"predictions.rank{dist.get_rank()}.csv"
    return PREDICTIONS_FILE
