"""Echo videos from any dataset format, as clips for training and whole videos for evaluation.

Each format module (``data.cardiac_uda``, ``data.camus``, ``data.echonet``) lists its videos as
``EchoVideo`` records that know how to read themselves into ``EchoFrames``: grey frames in
[0, 1], the dataset's own label codes, and which frames are annotated (CardiacUDA training
videos have five, EchoNet two, CAMUS two or all). The datasets here turn records into tensors:

* ``EchoClips``: training clips of ``clip_length`` frames, ``clip_stride`` apart. A labelled clip
  is placed around a random annotated frame, so that every source clip carries supervision;
  an unlabelled clip (the target domain) starts anywhere.
* ``PairedClips``: one labelled source clip and one unlabelled target clip per item, so that
  every training step sees both domains.
* ``EchoVideos``: every frame of a video, for validation, test and predict.

Frames are resized to ``resize`` x ``resize`` (bilinear; labels nearest) and cropped to ``crop``
(randomly for training, centred otherwise), as the official loaders do (328 -> 256 for
CardiacUDA, 124 -> 112 for CAMUS/EchoNet). Labels are mapped to the requested ``structures``:
index 1..K in that order, background 0.

Batch keys (``data/__init__.py``): ``video`` (B, T, 1, H, W), ``mask`` (B, T, H, W) int64,
``labelled`` (B, T) bool (which frames have a ground truth), ``name``; training batches are
``{"source": ..., "target": ...}`` of those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from data.errors import InvalidValueError, LabelRangeError, ShapeMismatchError, UnreadableFileError
from data.sampling import SampleKey, sample_key


@dataclass
class EchoFrames:
    """A decoded video: ``images`` (T, H, W) float32 in [0, 1], ``labels`` (T, H, W) int64 with
    the dataset's own codes, ``labelled`` (T,) bool."""

    images: np.ndarray
    labels: np.ndarray
    labelled: np.ndarray


@dataclass
class EchoVideo(ABC):
    """One video of a dataset. Subclasses implement ``read``.

    Attributes:
        name: unique name within its dataset (used for splits and outputs).
        structures: the dataset's label codes by structure name, e.g. ``{"LV": 1, "LA": 2}``.
        has_labels: whether any frame is annotated.
        split: ``train``/``val``/``test`` when the dataset defines its splits, else ``None``.
    """

    name: str
    structures: dict[str, int] = field(default_factory=dict)
    has_labels: bool = True
    split: Optional[str] = None

    @abstractmethod
    def read(self) -> EchoFrames:
        """The frames and labels of this video (each format reads its own files)."""


def check_finite(array: np.ndarray, path: Path) -> np.ndarray:
    """``array`` unchanged if every value is finite, else an error naming ``path`` (scaling to
    [0, 1] would turn an infinite pixel into a plausible 0 or 1, and a NaN into a NaN video)."""
    if array.dtype.kind in "fc":
        finite = np.isfinite(array)
        if not finite.all():
            raise InvalidValueError(path, f"{int(finite.size - finite.sum())} of {array.size} values are NaN or infinite")
    return array


def to_unit_range(array: np.ndarray) -> np.ndarray:
    """Pixel values to float32 [0, 1]: 8-bit data (and any data up to 255) is divided by 255,
    wider integer data by its maximum; float data already in [0, 1] is kept."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    values = array.astype(np.float32)
    top = float(values.max()) if values.size else 0.0
    if np.issubdtype(array.dtype, np.floating) and top <= 1.0:
        return np.clip(values, 0.0, 1.0)
    return np.clip(values / (255.0 if top <= 255 else top), 0.0, 1.0)


def check_frames(frames: EchoFrames, path: Path, label_path: Optional[Path], codes: Sequence[int]) -> EchoFrames:
    """Validate a decoded video: at least one frame, labels of the video's shape, known codes."""
    if frames.images.ndim != 3 or frames.images.shape[0] == 0:
        raise UnreadableFileError(path, f"holds no frames (array shape {frames.images.shape})")
    if frames.labels.shape != frames.images.shape:
        raise ShapeMismatchError(
            label_path or path,
            f"labels have shape {frames.labels.shape} (frames, height, width) but the video {path.name} has {frames.images.shape}",
        )
    unknown = sorted(set(np.unique(frames.labels).tolist()) - {0, *codes})
    if unknown:
        raise LabelRangeError(label_path or path, f"label values {unknown} are not among the known codes {sorted(codes)}")
    return frames


def structure_lookup(video: EchoVideo, structures: Sequence[str], where: Path | str) -> dict[int, int]:
    """Dataset code -> structure index (1..K) for the requested ``structures``."""
    missing = [s for s in structures if s not in video.structures]
    if missing:
        from data.errors import LayoutError

        raise LayoutError(
            where,
            f"has no {', '.join(missing)} labels (it labels {', '.join(video.structures)}); "
            "choose --data.structures among those",
        )
    return {video.structures[name]: index + 1 for index, name in enumerate(structures)}


def resize_frames(images: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W) frames to (T, size, size): area/bilinear for images, nearest for labels."""
    if images.shape[1:] == (size, size):
        return images, labels
    shrink = size < min(images.shape[1:])
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    out_images = np.stack([cv2.resize(f, (size, size), interpolation=interpolation) for f in images])
    out_labels = np.stack([cv2.resize(f.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) for f in labels])
    return out_images, out_labels.astype(np.int64)


class _VideoSource:
    """Reads, relabels and resizes videos; keeps them in memory when ``cache`` is set."""

    def __init__(self, videos: Sequence[EchoVideo], structures: Sequence[str], resize: int, cache: bool, where: Path | str):
        self.videos = list(videos)
        self.lookups = [structure_lookup(v, structures, where) if v.has_labels else {} for v in self.videos]
        self.resize = resize
        self.cache = {} if cache else None

    def load(self, index: int) -> EchoFrames:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        frames = self.videos[index].read()
        labels = np.zeros(frames.labels.shape, np.int64)
        for code, structure in self.lookups[index].items():
            labels[frames.labels == code] = structure
        images, labels = resize_frames(frames.images, labels, self.resize)
        frames = EchoFrames(images.astype(np.float32), labels, frames.labelled.astype(bool))
        if self.cache is not None:
            self.cache[index] = frames
        return frames


def _crop_box(size: int, crop: int, rng: Optional[np.random.Generator]) -> tuple[int, int]:
    """Top-left corner of the crop: random when training (``rng``), centred otherwise."""
    if crop >= size:
        return 0, 0
    if rng is not None:
        return int(rng.integers(0, size - crop + 1)), int(rng.integers(0, size - crop + 1))
    return (size - crop) // 2, (size - crop) // 2


def _to_sample(frames: EchoFrames, indices: np.ndarray, crop: int, rng: Optional[np.random.Generator], with_labels: bool) -> dict:
    top, left = _crop_box(frames.images.shape[1], crop, rng)
    window = (indices, slice(top, top + crop), slice(left, left + crop))
    video = torch.from_numpy(np.ascontiguousarray(frames.images[window]))[:, None]
    if with_labels:
        mask = torch.from_numpy(np.ascontiguousarray(frames.labels[window]))
        labelled = torch.from_numpy(frames.labelled[indices].copy())
    else:
        mask = torch.zeros(video.shape[0], *video.shape[-2:], dtype=torch.long)
        labelled = torch.zeros(video.shape[0], dtype=torch.bool)
    return {"video": video, "mask": mask, "labelled": labelled}


def clip_indices(
    length: int, clip_length: int, stride: int, rng: np.random.Generator, anchor: Optional[int] = None
) -> np.ndarray:
    """Frame indices of a random clip: ``clip_length`` frames ``stride`` apart (the stride shrinks
    for short videos; a video shorter than the clip repeats its last frame). With ``anchor`` the
    clip contains that frame, at a random position. Every choice is drawn from ``rng``."""
    stride = max(1, min(stride, (length - 1) // max(1, clip_length - 1))) if length > 1 else 1
    span = (clip_length - 1) * stride + 1
    if span > length:  # fewer frames than the clip: all of them, last one repeated
        return np.minimum(np.arange(clip_length), length - 1)
    if anchor is None:
        start = int(rng.integers(0, length - span + 1))
    else:
        offsets = [k for k in range(clip_length) if 0 <= anchor - k * stride <= length - span]
        start = anchor - int(rng.choice(offsets)) * stride
    return start + stride * np.arange(clip_length)


class EchoClips(Dataset):
    """Random clips of each video (one per video per pass); see the module docstring.

    Args:
        videos: the records.
        structures: structure names to segment, in output-channel order.
        clip_length, clip_stride: frames per clip and their spacing.
        resize, crop: frame size after resizing, and of the random crop.
        with_labels: give masks (source) or hide them (target: all frames unlabelled).
        cache: keep decoded, resized videos in memory.
        where: the dataset root, for error messages.
    """

    def __init__(
        self,
        videos: Sequence[EchoVideo],
        structures: Sequence[str],
        clip_length: int,
        clip_stride: int,
        resize: int,
        crop: int,
        with_labels: bool,
        cache: bool = False,
        where: Path | str = "",
    ):
        if with_labels:
            videos = [v for v in videos if v.has_labels]
        self.source = _VideoSource(videos, structures if with_labels else [], resize, cache, where)
        self.clip_length, self.clip_stride = clip_length, clip_stride
        self.crop, self.with_labels = crop, with_labels

    def __len__(self) -> int:
        return len(self.source.videos)

    def __getitem__(self, key: SampleKey) -> dict:
        """A clip of video ``index``; the anchor frame, the clip's start and the crop are drawn
        from the key's seed (a plain index seeds them with itself, so they repeat)."""
        index, seed = sample_key(key)
        rng = np.random.default_rng(index if seed is None else seed)
        frames = self.source.load(index)
        anchor = None
        if self.with_labels:
            annotated = np.flatnonzero(frames.labelled)
            if len(annotated) == 0:
                raise LabelRangeError(self.source.videos[index].name, "is listed as labelled but no frame has labels")
            anchor = int(rng.choice(annotated))
        indices = clip_indices(len(frames.images), self.clip_length, self.clip_stride, rng, anchor)
        return _to_sample(frames, indices, self.crop, rng, with_labels=self.with_labels)


class PairedClips(Dataset):
    """``{"source": labelled clip, "target": unlabelled clip}``, ``length`` items per epoch.

    Item ``i`` takes source video ``i mod n_source`` (the training sampler shuffles the items,
    so each epoch visits the source videos evenly in a fresh order) and a target video drawn
    from the item's seed, so the target order is independent of the source order. The seed is
    split into independent streams for the target choice and each clip's augmentation, which
    makes an item a function of its ``(index, seed)`` key alone: a resumed or multi-process fit
    draws exactly the clips an uninterrupted single-process fit would.
    """

    def __init__(self, source: EchoClips, target: EchoClips, length: int):
        self.source, self.target, self.length = source, target, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: SampleKey) -> dict:
        index, seed = sample_key(key)
        choice, source_seed, target_seed = np.random.SeedSequence(index if seed is None else seed).generate_state(3)
        target_index = int(np.random.default_rng(choice).integers(len(self.target)))
        return {
            "source": self.source[(index % len(self.source), int(source_seed))],
            "target": self.target[(target_index, int(target_seed))],
        }


class EchoVideos(Dataset):
    """Whole videos, resized and centre-cropped, with their labels (when ``with_labels``)."""

    def __init__(
        self,
        videos: Sequence[EchoVideo],
        structures: Sequence[str],
        resize: int,
        crop: int,
        with_labels: bool = True,
        cache: bool = False,
        where: Path | str = "",
    ):
        self.source = _VideoSource(videos, structures if with_labels else [], resize, cache, where)
        self.crop, self.with_labels = crop, with_labels

    def __len__(self) -> int:
        return len(self.source.videos)

    def __getitem__(self, index: int) -> dict:
        frames = self.source.load(index)
        sample = _to_sample(frames, np.arange(len(frames.images)), self.crop, rng=None, with_labels=self.with_labels)
        return {**sample, "name": self.source.videos[index].name}
