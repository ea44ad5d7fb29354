"""EchoNet-Dynamic (Ouyang et al., Nature 2020): 10,030 apical four-chamber videos, 112 x 112.

Layout under ``root``::

    Videos/0X1A0A263B22CCD966.avi      the videos (grey content in RGB AVI)
    FileList.csv                       FileName, EF, ESV, EDV, FrameHeight, FrameWidth, FPS,
                                       NumberOfFrames, Split (TRAIN / VAL / TEST)
    VolumeTracings.csv                 FileName, X1, Y1, X2, Y2, Frame

The left ventricle is traced on two frames per video (end-diastole and end-systole). Per traced
frame the first row of ``VolumeTracings.csv`` is the long axis and the others are chords across
the ventricle; the outline is the chords' left ends followed by their right ends in reverse, and
is rasterised to a mask (``skimage.draw.polygon``, as the EchoNet loader does). Video names are
matched with or without ``.avi`` (``FileList.csv`` leaves it off in the public release, the
tracings keep it, and GraphEcho's loader assumes the opposite). Videos without tracings are
unlabelled: usable as target-domain training clips, never scored. A listed video that is missing,
an empty ``Videos/``, a ``Split`` other than TRAIN / VAL / TEST (the only values of the public
release, and the only ones the official loader selects), a tracing of a video that does not
exist, a tracing with a NaN or infinite coordinate or one more than a pixel outside the frame, a
traced frame past the video's end, and a video with no frames or fewer frames than its header
announces (cut short) stop the run with an error naming the file (and the CSV line).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import skimage.draw

from data.echo_video import EchoFrames, EchoVideo, check_frames
from data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    InvalidValueError,
    LabelRangeError,
    LayoutError,
    MissingPairError,
    SplitError,
    UnreadableFileError,
)

STRUCTURES = {"LV": 1}
TRACING_HEADER = ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]
SPLITS = {"TRAIN": "train", "VAL": "val", "TEST": "test"}


def read_avi(path: Path) -> np.ndarray:
    """Frames of a video as (T, H, W) uint8 (the first colour channel: the content is grey).

    OpenCV stops quietly at the first frame it cannot decode, so a video cut short keeps its
    first frames; fewer frames than the container announces is an error, as in EchoNet's loader.
    """
    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        announced = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame[..., 0] if frame.ndim == 3 else frame)
    finally:
        capture.release()
    if not frames:
        raise UnreadableFileError(path, "holds no frames (empty, truncated or not a video)")
    if len(frames) < announced:
        raise UnreadableFileError(path, f"truncated or corrupt: decoded {len(frames)} of the {announced} frames its header announces")
    return np.stack(frames)


def trace_mask(chords: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Filled LV mask (H, W) from one frame's (K, 4) rows ``X1, Y1, X2, Y2`` (row 0: long axis)."""
    x = np.concatenate([chords[1:, 0], chords[1:, 2][::-1]])
    y = np.concatenate([chords[1:, 1], chords[1:, 3][::-1]])
    rows, cols = skimage.draw.polygon(np.rint(y).astype(int), np.rint(x).astype(int), shape)
    mask = np.zeros(shape, np.int64)
    mask[rows, cols] = 1
    return mask


def outside_frame(chords: np.ndarray, shape: tuple[int, int]) -> int | None:
    """Row of the first chord with an end outside a (H, W) frame, or None.

    EchoNet's tracers drew up to the edge of the image, so some ends lie just past the last
    pixel and the official loader lets ``skimage.draw.polygon`` clip them; up to one pixel
    beyond the pixel grid (-1 .. W, -1 .. H) is therefore accepted. Anything farther is a
    tracing made for another frame size, which clipping would silently turn into a wrong mask.
    """
    height, width = shape
    x, y = chords[:, [0, 2]], chords[:, [1, 3]]
    bad = ((x < -1) | (x > width) | (y < -1) | (y > height)).any(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


@dataclass
class Tracing:
    """One traced frame: (K, 4) chords ``X1, Y1, X2, Y2`` (row 0: the long axis) and the
    ``VolumeTracings.csv`` line each came from (for error messages)."""

    chords: np.ndarray
    lines: list[int]


@dataclass
class EchoNetVideo(EchoVideo):
    path: Path = Path()
    tracings: dict[int, Tracing] = field(default_factory=dict)  # by frame
    tracing_file: Path = Path()

    def read(self) -> EchoFrames:
        images = read_avi(self.path)
        labels = np.zeros(images.shape, np.int64)
        labelled = np.zeros(len(images), bool)
        for frame, tracing in self.tracings.items():
            if not 0 <= frame < len(images):
                problem = f"traces frame {frame} of {self.path.name}, which has {len(images)} frames"
                raise LabelRangeError(self.tracing_file, f"line {tracing.lines[0]} {problem}")
            row = outside_frame(tracing.chords, images.shape[1:])
            if row is not None:
                chord = " ".join(f"{v:g}" for v in tracing.chords[row])
                frame_size = f"{images.shape[2]} x {images.shape[1]}"
                raise LabelRangeError(self.tracing_file, f"line {tracing.lines[row]}: chord {chord} lies outside the {frame_size} frames of {self.path.name}")
            labels[frame] = trace_mask(tracing.chords, images.shape[1:])
            labelled[frame] = True
        return check_frames(EchoFrames(images.astype(np.float32) / 255.0, labels, labelled), self.path, None, [1])


def _stem(name: str) -> str:
    return name[:-4] if name.lower().endswith(".avi") else name


def read_tracings(path: Path) -> dict[str, dict[int, Tracing]]:
    """``VolumeTracings.csv`` as ``{video stem: {frame: its tracing}}``."""
    tracings: dict[str, dict[int, list]] = {}
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != TRACING_HEADER:
            raise LayoutError(path, f"header must be {','.join(TRACING_HEADER)}, got {header}")
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                name, x1, y1, x2, y2, frame = row
                chord = [float(x1), float(y1), float(x2), float(y2)]
                if not np.isfinite(chord).all():
                    raise InvalidValueError(path, f"line {line_number} has a NaN or infinite coordinate: {row}")
                tracings.setdefault(_stem(name.strip()), {}).setdefault(int(frame), []).append((chord, line_number))
            except ValueError:
                raise LayoutError(path, f"line {line_number} is not FileName,X1,Y1,X2,Y2,Frame: {row}") from None
    return {
        name: {f: Tracing(np.asarray([c for c, _ in rows], np.float64), [n for _, n in rows]) for f, rows in frames.items()}
        for name, frames in tracings.items()
    }


def discover_echonet(root: Path) -> list[EchoNetVideo]:
    """Every video of ``FileList.csv`` with its split and LV tracings."""
    videos_dir, file_list, tracing_file = root / "Videos", root / "FileList.csv", root / "VolumeTracings.csv"
    for required in (videos_dir, file_list, tracing_file):
        if not required.exists():
            raise DatasetNotFoundError(required, "EchoNet-Dynamic needs Videos/, FileList.csv and VolumeTracings.csv")
    on_disk = {_stem(p.name): p for p in videos_dir.iterdir() if p.suffix.lower() == ".avi"}
    if not on_disk:
        raise EmptyDatasetError(videos_dir, "holds no .avi videos")
    tracings = read_tracings(tracing_file)
    for name in sorted(tracings):
        if name not in on_disk:
            raise MissingPairError(tracing_file, f"has tracings for {name}.avi, which is not in {videos_dir}")
    videos = []
    with file_list.open(newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if "FileName" not in row or "Split" not in row:
                raise LayoutError(file_list, "needs FileName and Split columns")
            name = _stem(row["FileName"].strip())
            if name not in on_disk:
                raise DatasetNotFoundError(videos_dir / f"{name}.avi", "listed in FileList.csv but missing")
            value = (row["Split"] or "").strip()
            if value.upper() not in SPLITS:  # the official loader selects exactly these: others are in no split
                raise SplitError(file_list, f"line {reader.line_num}: Split {value!r} of {name} is not one of {', '.join(SPLITS)}")
            split = SPLITS[value.upper()]
            traced = tracings.get(name, {})
            videos.append(
                EchoNetVideo(
                    name=name, structures=dict(STRUCTURES), has_labels=bool(traced), split=split,
                    path=on_disk[name], tracings=traced, tracing_file=tracing_file,
                )  # fmt: skip
            )
    if not videos:
        raise LayoutError(file_list, "lists no videos")
    return videos
