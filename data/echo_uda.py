"""Unsupervised domain adaptation between two echo datasets: labelled source, unlabelled target.

Either side is CardiacUDA (one or more site folders), CAMUS (NIfTI or MetaImage release) or
EchoNet-Dynamic, so any two can be paired (CardiacUDA site G -> site R as in the paper, CAMUS ->
EchoNet, EchoNet -> CardiacUDA, ...). With no root at all the built-in two-site synthetic set is
generated (``data.builtin_echo``) and read by the CardiacUDA loader.

* **fit**: each training item is a labelled source clip and an unlabelled target clip
  (``data.echo_video.PairedClips``), so every step sees both domains; ``samples_per_epoch``
  items per epoch. Validation scores held-out *source* videos: the target's labels are used
  only by ``test``, so choosing a checkpoint never peeks at the target.
* **test**: every annotated frame of the target's test videos.
* **predict**: every video (``.avi``, ``.nii``, ``.nii.gz``, ``.mhd``) in ``predict_dir``; one
  label volume per video, ``<name>_label.nii.gz`` (H x W x T, structure indices, at the video's
  own size) in ``predict_output_dir``.

Splits: EchoNet's ``FileList.csv`` and CAMUS's ``database_split/`` are used as given; otherwise
the labelled videos of a side are shuffled with ``split_seed`` and ``test_fraction`` and
``val_fraction`` of them held out (CardiacUDA has no official split; the paper uses 8:1:1).
Unlabelled videos always train. When source and target are the same data, this is supervised
training on the target (the upper bound of the paper's tables).

The ``structures`` to segment must be labelled in both datasets: LV, LA, RA, RV for CardiacUDA's
view 4; LV, MYO, LA for CAMUS; LV for EchoNet (so CAMUS <-> EchoNet segments the LV, as the
official code does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.base import BaseDataModule
from data.camus import discover_camus, read_mhd
from data.cardiac_uda import as_frames_first, discover_cardiac_uda, read_nifti
from data.echo_video import EchoClips, EchoVideo, EchoVideos, PairedClips, resize_frames, to_unit_range
from data.echonet import discover_echonet, read_avi
from data.errors import DatasetNotFoundError, EmptyDatasetError, LayoutError

FORMATS = ("cardiac_uda", "camus", "echonet")
VIDEO_SUFFIXES = (".avi", ".nii.gz", ".nii", ".mhd")


def discover(fmt: str, root: Path, site: str, view: str, fill_contours: bool) -> list[EchoVideo]:
    """The videos of one side of the adaptation."""
    if fmt == "cardiac_uda":
        return discover_cardiac_uda(root, site, view, fill_contours)
    if fmt == "camus":
        return discover_camus(root, view)
    if fmt == "echonet":
        return discover_echonet(root)
    raise LayoutError(root, f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")


def assign_splits(videos: list[EchoVideo], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[EchoVideo]]:
    """Videos per split: the dataset's own split where it has one, else a seeded hold-out of the
    labelled videos (unlabelled ones train)."""
    splits = {"train": [], "val": [], "test": []}
    free = [v for v in videos if v.split is None and v.has_labels]
    order = np.random.default_rng(seed).permutation(len(free))
    def held_out(fraction: float) -> int:  # at least one video when there is a fraction and room
        return max(1, round(len(free) * fraction)) if fraction > 0 and len(free) >= 3 else round(len(free) * fraction)

    n_test, n_val = held_out(test_fraction), held_out(val_fraction)
    chosen = {}
    for rank, index in enumerate(order):
        chosen[free[index].name] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    for video in videos:
        split = video.split or chosen.get(video.name, "train")
        if split != "train" and not video.has_labels:
            split = "train"  # an unlabelled video can only be target training data
        splits[split].append(video)
    return splits


class EchoPredictVideos(Dataset):
    """Every video in a folder, for ``predict``: ``{"video", "name"}`` at the network's size."""

    def __init__(self, folder: Path, resize: int):
        if not folder.is_dir():
            raise DatasetNotFoundError(folder, "predict folder does not exist")
        self.paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VIDEO_SUFFIXES))
        if not self.paths:
            raise EmptyDatasetError(folder, f"holds no videos ({', '.join(VIDEO_SUFFIXES)})")
        self.resize = resize

    def __len__(self) -> int:
        return len(self.paths)

    @staticmethod
    def output_name(path: Path) -> str:
        stem = path.name
        for suffix in VIDEO_SUFFIXES:
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        return stem.removesuffix("_image") + "_label.nii.gz"

    @staticmethod
    def read(path: Path) -> np.ndarray:
        """(T, H, W) frames of a video file."""
        if path.name.lower().endswith(".avi"):
            frames = read_avi(path)
        elif path.name.lower().endswith(".mhd"):
            frames = read_mhd(path)
            frames = frames[None] if frames.ndim == 2 else frames
        else:
            frames = as_frames_first(read_nifti(path), path)
        return frames

    def frame_size(self, path: Path) -> tuple[int, int]:
        """(height, width) of a video's frames, for writing labels at that size."""
        return tuple(self.read(path).shape[1:])

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        images = to_unit_range(self.read(path))
        resized, _ = resize_frames(images, np.zeros(images.shape, np.int64), self.resize)
        return {"video": torch.from_numpy(np.ascontiguousarray(resized))[:, None], "name": self.output_name(path)}


class EchoUDADataModule(BaseDataModule):
    """Source/target echo datasets for GraphEcho (see the module docstring).

    Args:
        source_format, target_format: ``cardiac_uda``, ``camus`` or ``echonet``.
        source_root, target_root: dataset folders (default: ``root`` for both, e.g. a
            CardiacUDA folder holding both sites; neither: the built-in set).
        source_site, target_site: CardiacUDA site folder names or globs (ignored by the others).
        view: CardiacUDA view (``4`` = apical four-chamber) or CAMUS view (``4``/``2``).
        structures: structures to segment, in output-channel order (channel 0 is background).
        clip_length, clip_stride: frames per training clip and their spacing.
        resize, crop: frames are resized to ``resize`` and cropped to ``crop``.
        samples_per_epoch: (source clip, target clip) pairs per training epoch.
        val_fraction, test_fraction, split_seed: the seeded split where a dataset has none.
        cache_videos: keep decoded, resized videos in memory (small datasets).
        fill_contours: fill CardiacUDA labels stored as outlines.
        builtin_videos_per_site, builtin_frames, builtin_size: size of the built-in set.
        **kwargs: ``BaseDataModule`` arguments (root, batch sizes, workers, predict folders).
    """

    def __init__(
        self,
        source_format: str = "cardiac_uda",
        target_format: str = "cardiac_uda",
        source_root: Optional[str] = None,
        target_root: Optional[str] = None,
        source_site: str = "Site_A",
        target_site: str = "Site_B",
        view: str = "4",
        structures: Sequence[str] = ("LV", "LA", "RA", "RV"),
        clip_length: int = 16,
        clip_stride: int = 1,
        resize: int = 64,
        crop: int = 64,
        samples_per_epoch: int = 256,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        cache_videos: bool = False,
        fill_contours: bool = True,
        builtin_videos_per_site: int = 40,
        builtin_frames: int = 32,
        builtin_size: int = 64,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for fmt in (source_format, target_format):
            if fmt not in FORMATS:
                raise ValueError(f"dataset format must be one of {FORMATS}, got {fmt!r}")
        if crop > resize:
            raise ValueError(f"crop {crop} is larger than resize {resize}")
        self.formats = {"source": source_format, "target": target_format}
        self.roots = {"source": source_root, "target": target_root}
        self.sites = {"source": source_site, "target": target_site}
        self.view = view
        self.structures = list(structures)
        self.clip_length, self.clip_stride = clip_length, clip_stride
        self.resize, self.crop = resize, crop
        self.samples_per_epoch = samples_per_epoch
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.cache_videos, self.fill_contours = cache_videos, fill_contours
        self.builtin_params = dict(videos_per_site=builtin_videos_per_site, frames=builtin_frames, size=builtin_size)

    # -- roots -----------------------------------------------------------------------------------
    @property
    def uses_builtin(self) -> bool:
        return self.root is None and self.roots["source"] is None and self.roots["target"] is None

    def builtin_root(self) -> Path:
        from data.builtin_echo import build_builtin_echo

        return build_builtin_echo(**self.builtin_params)

    def prepare_data(self) -> None:
        if self.uses_builtin:
            self.builtin_root()

    def side_root(self, side: str) -> Path:
        if self.uses_builtin:
            if self.formats[side] != "cardiac_uda":
                raise DatasetNotFoundError(f"--data.{side}_root", f"the built-in set is in CardiacUDA layout; pass a root for {self.formats[side]}")
            return self.builtin_root()
        given = self.roots[side] or self.root
        if given is None:
            raise DatasetNotFoundError(f"--data.{side}_root", f"no root for the {side} dataset (set it or --data.root)")
        root = Path(given).expanduser()
        if not root.is_dir():
            raise DatasetNotFoundError(root, "dataset root does not exist")
        return root

    def describe(self, side: str) -> str:
        if self.uses_builtin:
            return f"built-in A4C {self.sites[side]}"
        fmt, root = self.formats[side], Path(self.roots[side] or self.root)
        return f"{fmt}:{root.name}" + (f"/{self.sites[side]}" if fmt == "cardiac_uda" else "")

    def side_splits(self, side: str) -> tuple[Path, dict[str, list[EchoVideo]]]:
        root = self.side_root(side)
        videos = discover(self.formats[side], root, self.sites[side], self.view, self.fill_contours)
        return root, assign_splits(videos, self.val_fraction, self.test_fraction, self.split_seed)

    # -- datasets ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.dataset_name = f"{self.describe('target')} (test)"
        if stage == "predict":
            if self.predict_dir is None:
                raise DatasetNotFoundError("--data.predict_dir", "predict needs a folder of videos")
            dataset = EchoPredictVideos(Path(self.predict_dir), self.resize)
            self.prediction_paths([dataset.output_name(p) for p in dataset.paths])  # refuse before writing any
            self.datasets["predict"] = dataset
            return
        common = dict(structures=self.structures, resize=self.resize, crop=self.crop, cache=self.cache_videos)
        if stage in ("fit", "validate"):
            source_root, source = self.side_splits("source")
            for split in ("train", "val"):
                if not any(v.has_labels for v in source[split]):
                    raise EmptyDatasetError(source_root, f"the source ({self.describe('source')}) has no labelled {split} videos")
            self.datasets["val"] = EchoVideos(source["val"], where=source_root, **common)
            if stage == "fit":
                target_root, target = self.side_splits("target")
                if not target["train"]:
                    raise EmptyDatasetError(target_root, f"the target ({self.describe('target')}) has no training videos")
                clips = dict(clip_length=self.clip_length, clip_stride=self.clip_stride, **common)
                self.datasets["train"] = PairedClips(
                    EchoClips(source["train"], with_labels=True, where=source_root, **clips),
                    EchoClips(target["train"], with_labels=False, where=target_root, **clips),
                    self.samples_per_epoch,
                )
        if stage == "test":
            target_root, target = self.side_splits("target")
            if not target["test"]:
                raise EmptyDatasetError(target_root, f"the target ({self.describe('target')}) has no labelled test videos")
            self.datasets["test"] = EchoVideos(target["test"], where=target_root, **common)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split != "train" and batch_size != 1:
            raise ValueError("evaluation batches are whole videos of different lengths: keep eval_batch_size at 1")
        return super()._loader(split, shuffle, batch_size)

    # -- prediction output ---------------------------------------------------------------------
    def write_prediction(self, prediction: torch.Tensor, names: list[str]) -> None:
        """Write (B, T, h, w) structure indices as ``<name>_label.nii.gz`` (H x W x T) at each
        video's own frame size."""
        import cv2
        import nibabel as nib

        dataset = self.datasets["predict"]
        sources = {dataset.output_name(p): p for p in dataset.paths}
        for labels, path in zip(prediction, self.prediction_paths(names)):
            height, width = dataset.frame_size(sources[path.name])
            frames = labels.detach().cpu().numpy().astype(np.uint8)
            frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_NEAREST) for f in frames], axis=-1)
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(frames, np.eye(4)), str(path))
