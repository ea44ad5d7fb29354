"""What the point-cloud datamodules share: scene readers, checks, offset batching, prediction files.

A *scene* (a room, a ScanNet scan, one ``.ply``) is read into a dict of arrays, checked, passed
through the configured transforms (``data.point_transforms``) and returned as

    {"coord": (N, 3) float32, "feat": (N, C) float32, "segment": (N,) int64, "name": str}

where ``feat`` is the scene's ``features`` side by side, in order (``color``: RGB in [0, 1];
``normal``: unit normals). Scenes are batched by concatenation with an ``offset`` vector of
cumulative counts, never padded (``collate_points``). Unlabelled points carry ``IGNORE_INDEX``.

Readers for the layouts more than one dataset uses live here: a folder of ``.npy`` arrays per
scene (Pointcept), a ``torch.save``d dict per scene (Point Transformer V2 / ConDaFormer), and
``.ply`` / ``.pcd`` files with a per-point label file, read with open3d. Every problem raises a
``DatasetError`` naming the file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data.atomic_write import write_atomically
from data.base import BaseDataModule
from data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    InvalidValueError,
    LabelRangeError,
    MissingPairError,
    ShapeMismatchError,
    UnreadableFileError,
)
from data.point_transforms import DEFAULT_EVAL, DEFAULT_TRAIN, Compose
from data.sampling import SampleKey, sample_key

IGNORE_INDEX = -1
FEATURES = ("color", "normal")
POINT_FILE_SUFFIXES = (".ply", ".pcd")
LABEL_SUFFIXES = (".labels", ".txt", ".npy")


# -- readers ---------------------------------------------------------------------------------------


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise UnreadableFileError(path, f"cannot read .npy array ({error})") from None


def _numpy_safe_globals() -> list:
    """What unpickling numpy arrays needs, for ``torch.load(weights_only=True)`` (files written with
    numpy 1 name ``numpy.core``, with numpy 2 ``numpy._core``)."""
    import numpy.dtypes

    from numpy._core.multiarray import _reconstruct

    allowed: list = [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype]
    allowed += [getattr(numpy.dtypes, name) for name in dir(numpy.dtypes) if name.endswith("DType")]
    return allowed


def load_pth(path: Path) -> dict:
    """A scene dict saved with ``torch.save`` (numpy arrays inside), loaded without running code."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - pickle raises many types
        raise UnreadableFileError(path, f"cannot load scene dict ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UnreadableFileError(path, f"holds a {type(data).__name__}, expected a dict with 'coord' and 'color'")
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}


def read_point_file(path: Path) -> dict[str, np.ndarray]:
    """``coord`` and, when the file has them, ``color`` (0-255) and ``normal`` from a .ply / .pcd.

    open3d reports a file it cannot parse only as a printed warning, and reads a truncated
    ASCII file as if it were whole (the missing points become zeros), so the header's point
    count is checked against the data actually present first (``point_file_problem``), and an
    ASCII file's text for NaN and infinity (``ascii_non_finite_lines``).
    """
    import open3d as o3d

    if not path.is_file():
        raise DatasetNotFoundError(path, "point file does not exist")
    expected = check_point_file(path)
    cloud = o3d.io.read_point_cloud(str(path))
    coord = np.asarray(cloud.points, dtype=np.float32)
    if len(coord) != expected:
        raise UnreadableFileError(path, f"open3d read {len(coord)} of the {expected} points its header announces")
    scene: dict[str, np.ndarray] = {"coord": coord}
    if cloud.has_colors():
        scene["color"] = np.asarray(cloud.colors, dtype=np.float32) * 255.0
    if cloud.has_normals():
        scene["normal"] = np.asarray(cloud.normals, dtype=np.float32)
    return scene


_PLY_SIZES = {
    "char": 1, "int8": 1, "uchar": 1, "uint8": 1, "short": 2, "int16": 2, "ushort": 2, "uint16": 2,
    "int": 4, "int32": 4, "uint": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8,
}  # fmt: skip


def _point_file_header(path: Path) -> tuple[list[str], int, str] | None:
    """Header lines, the byte where the data starts, and the format word; None if not found."""
    with path.open("rb") as handle:
        head = handle.read(1 << 16)
    if path.suffix.lower() == ".ply":
        end = head.find(b"end_header")
        if not head.startswith(b"ply") or end < 0:
            return None
        start = head.index(b"\n", end) + 1 if b"\n" in head[end:] else len(head)
        lines = head[:start].decode("ascii", errors="replace").splitlines()
        fmt = next((line.split()[1] for line in lines if line.startswith("format ")), "")
        return lines, start, fmt
    lines, position = [], 0
    for raw in head.split(b"\n"):
        position += len(raw) + 1
        line = raw.decode("ascii", errors="replace").strip()
        lines.append(line)
        if line.upper().startswith("DATA"):
            return lines, position, line.split()[1].lower() if len(line.split()) > 1 else ""
    return None


def point_file_count(path: Path) -> int | None:
    """Points announced by a .ply / .pcd header (None when there is no readable header)."""
    header = _point_file_header(path)
    if header is None:
        return None
    for line in header[0]:
        words = line.split()
        if path.suffix.lower() == ".ply" and words[:2] == ["element", "vertex"] and len(words) == 3:
            return int(words[2])
        if path.suffix.lower() == ".pcd" and words[:1] == ["POINTS"] and len(words) == 2:
            return int(words[1])
    return None


def point_file_problem(path: Path) -> str | None:
    """Why a .ply / .pcd cannot be read whole (no header, or less data than the header
    announces), or None. Compressed PCD data is left to open3d's own checks."""
    if path.stat().st_size == 0:
        return "file is empty"
    header = _point_file_header(path)
    if header is None:
        return "no .ply / .pcd header (not a point cloud, or the file is cut short)"
    lines, start, fmt = header
    count = point_file_count(path)
    if count is None:
        return "header does not say how many points the file holds"
    size = path.stat().st_size - start
    if fmt.startswith("ascii"):
        with path.open("rb") as handle:
            handle.seek(start)
            rows = sum(1 for line in handle if line.strip())
        return None if rows >= count else f"truncated: {rows} data lines for the {count} points its header announces"
    if path.suffix.lower() == ".ply":
        in_vertex, width = False, 0
        for line in lines:
            words = line.split()
            if words[:1] == ["element"]:
                in_vertex = words[1:2] == ["vertex"]
            elif words[:1] == ["property"] and in_vertex:
                if words[1] == "list" or words[1] not in _PLY_SIZES:
                    return None  # variable or unknown width: open3d decides
                width += _PLY_SIZES[words[1]]
    elif fmt == "binary":
        fields = {w[0]: w[1:] for w in (line.split() for line in lines) if w and w[0] in ("SIZE", "COUNT")}
        sizes = [int(v) for v in fields.get("SIZE", [])]
        counts = [int(v) for v in fields.get("COUNT", [])] or [1] * len(sizes)
        width = sum(a * b for a, b in zip(sizes, counts))
    else:
        return None
    needed = count * width
    return None if size >= needed else f"truncated: {size} bytes of point data, {needed} needed for the {count} points its header announces"


def ascii_non_finite_lines(path: Path) -> int:
    """Data lines of an ASCII .ply / .pcd that spell NaN or infinity (0 for binary files).

    open3d reads ``nan`` but not ``inf`` in an ASCII PLY: it prints a warning and returns
    uninitialised points, so the text itself is checked.
    """
    header = _point_file_header(path)
    if header is None or not header[2].startswith("ascii"):
        return 0
    with path.open("rb") as handle:
        handle.seek(header[1])
        return sum(1 for line in handle if b"nan" in line.lower() or b"inf" in line.lower())


def check_point_file(path: Path, non_finite_error: type = InvalidValueError) -> int:
    """Refuse a .ply / .pcd that open3d would read wrongly without an error: cut short, without
    a usable header, or with NaN / infinity spelled in ASCII text. Returns the announced count.

    open3d only prints a warning for these and returns garbage points, so both point-file
    readers (segmentation scenes and registration fragments) check the file first.
    """
    problem = point_file_problem(path)
    if problem:
        raise UnreadableFileError(path, problem)
    count = point_file_count(path)
    non_finite = ascii_non_finite_lines(path)
    if non_finite:
        raise non_finite_error(path, f"{non_finite} of {count} points have NaN or infinite values")
    return count


def read_labels(path: Path) -> np.ndarray:
    """Per-point class indices: ``.npy``, or text with one integer per line (``.labels``, ``.txt``).

    Text is read as numbers first and checked for integers after, so a ``1.5`` or a ``nan`` is
    named with its line instead of failing inside numpy (``.npy`` labels are checked, by point,
    in ``check_scene``). Blank lines and lines starting with ``#`` are skipped.
    """
    if path.suffix == ".npy":
        return load_npy(path).reshape(-1)
    try:
        text = path.read_bytes()
    except OSError as error:
        raise UnreadableFileError(path, f"cannot read ({error})") from None
    numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith(b"#")]
    try:
        labels = np.array([line for _, line in numbered], dtype=np.float64)
    except ValueError:  # line by line, to name the line that is not one number
        values = []
        for number, line in numbered:
            try:
                values.append(float(line))
            except ValueError:
                shown = line[:40].decode("utf-8", errors="backslashreplace")
                raise UnreadableFileError(path, f"line {number} is not one integer label: {shown!r}") from None
        labels = np.array(values, dtype=np.float64)
    bad = not_integer(labels)
    if bad is not None:
        raise LabelRangeError(path, f"line {numbered[bad][0]}: label {labels[bad]:g} is not an integer class")
    return labels.astype(np.int64)


def not_integer(labels: np.ndarray) -> int | None:
    """Index of the first label that is not a finite whole number (NaN, inf, 1.5), or None.

    Casting such a label to int64 would truncate it silently (1.5 becomes class 1) or turn it
    into -9223372036854775808 (NaN), so labels are checked before any cast.
    """
    if labels.dtype.kind in "biu":
        return None
    values = labels.astype(np.float64)
    bad = values != np.round(values)  # NaN too (it equals nothing); infinity is whole to round()
    bad |= np.isinf(values)
    return int(np.argmax(bad)) if bad.any() else None


def write_point_file(path: Path, coord: np.ndarray, colour: np.ndarray) -> None:
    """A coloured point cloud (.ply or .pcd by suffix), colours in [0, 1], via a temporary file."""
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(coord.astype(np.float64)))
    cloud.colors = o3d.utility.Vector3dVector(np.clip(colour, 0, 1).astype(np.float64))

    def write(tmp: Path) -> None:
        if not o3d.io.write_point_cloud(str(tmp), cloud):
            raise UnreadableFileError(path, "open3d could not write the point cloud")

    write_atomically(path, write)


# -- scenes ----------------------------------------------------------------------------------------


@dataclass
class NpyScene:
    """Pointcept's layout: a folder with ``coord.npy``, ``color.npy`` [``normal.npy``] and a
    label array (``segment_file``), each with one row per point."""

    name: str
    path: Path
    segment_file: Optional[str] = "segment.npy"

    def load(self) -> dict[str, np.ndarray]:
        scene = {}
        for key in ("coord", "color", "normal"):
            file = self.path / f"{key}.npy"
            if file.is_file():
                scene[key] = load_npy(file)
                scene[f"{key}_path"] = file  # a bad colour is named by color.npy, not coord.npy
            elif key == "coord":
                raise DatasetNotFoundError(file, "scene folder has no coord.npy")
        if self.segment_file is not None:
            file = self.path / self.segment_file
            if not file.is_file():
                raise MissingPairError(self.path / "coord.npy", f"no label file {self.segment_file} beside it")
            scene["segment"] = load_npy(file).reshape(-1)
            scene["segment_path"] = file
        scene["path"] = self.path / "coord.npy"
        return scene


@dataclass
class PthScene:
    """Point Transformer V2 / ConDaFormer layout: one ``torch.save``d dict per scene with
    ``coord``, ``color`` [``normal``] and a label key (``semantic_gt``, ``semantic_gt20``...)."""

    name: str
    path: Path
    segment_keys: tuple[str, ...] = ("segment", "semantic_gt")

    def load(self) -> dict[str, Any]:
        data = load_pth(self.path)
        if "coord" not in data:
            raise UnreadableFileError(self.path, f"has no 'coord' key (keys: {', '.join(map(str, data))})")
        scene = {k: np.asarray(data[k]) for k in ("coord", "color", "normal") if k in data}
        for key in self.segment_keys:
            if key in data:
                scene["segment"] = np.asarray(data[key]).reshape(-1)
                break
        scene["path"] = scene["segment_path"] = self.path
        return scene


@dataclass
class PointFileScene:
    """A ``.ply`` / ``.pcd`` file read with open3d and, for labelled splits, its label file."""

    name: str
    path: Path
    label_path: Optional[Path] = None

    def load(self) -> dict[str, Any]:
        scene: dict[str, Any] = read_point_file(self.path)
        if self.label_path is not None:
            scene["segment"] = read_labels(self.label_path)
            scene["segment_path"] = self.label_path
        scene["path"] = self.path
        return scene


def check_scene(scene: dict[str, Any], features: Sequence[str], num_classes: int, ignore_labels: Sequence[int] = (-1, 255)) -> dict[str, torch.Tensor]:
    """Validate a loaded scene and convert it to tensors (colours to [0, 1], labels to int64 with
    every ignore label mapped to ``IGNORE_INDEX``)."""
    path = scene["path"]
    coord = np.asarray(scene["coord"])
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise ShapeMismatchError(path, f"coordinates have shape {coord.shape}, expected (N, 3)")
    if len(coord) == 0:
        raise EmptyDatasetError(path, "scene has no points")
    if not np.isfinite(coord).all():
        bad = int((~np.isfinite(coord)).any(1).sum())
        raise InvalidValueError(path, f"{bad} of {len(coord)} points have NaN or infinite coordinates")
    out = {"coord": torch.from_numpy(coord.astype(np.float32))}
    for key in features:
        if key not in scene:
            raise MissingPairError(path, f"has no {key} but the datamodule's features include it")
        value = np.asarray(scene[key], dtype=np.float32)
        feature_path = scene.get(f"{key}_path", path)
        if value.shape != coord.shape:
            raise ShapeMismatchError(feature_path, f"{key} has shape {value.shape}, coordinates {coord.shape}")
        if not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).any(1).sum())
            raise InvalidValueError(feature_path, f"{bad} of {len(coord)} points have NaN or infinite {key} values")
        if key == "color":
            outside = ((value < 0) | (value > 255)).any(1)
            if outside.any():  # 16-bit colours, or colours scaled by 255 twice: never wrapped or clipped quietly
                row = int(np.argmax(outside))
                problem = f"{int(outside.sum())} of {len(coord)} points have colour values outside 0..255"
                raise InvalidValueError(feature_path, f"{problem} (point {row}: {value[row].tolist()})")
            value = value / 255.0
        out[key] = torch.from_numpy(value)
    if "segment" in scene:
        label_path = scene.get("segment_path", path)
        segment = np.asarray(scene["segment"]).reshape(-1)
        if segment.dtype.kind not in "biuf":
            raise UnreadableFileError(label_path, f"labels have type {segment.dtype}, expected integers")
        bad = not_integer(segment)
        if bad is not None:
            raise LabelRangeError(label_path, f"label {float(segment[bad]):g} of point {bad} is not an integer class")
        segment = segment.astype(np.int64)
        if len(segment) != len(coord):
            raise ShapeMismatchError(label_path, f"has {len(segment)} labels for {len(coord)} points")
        segment = np.where(np.isin(segment, ignore_labels), IGNORE_INDEX, segment)
        bad = (segment != IGNORE_INDEX) & ((segment < 0) | (segment >= num_classes))
        if bad.any():
            raise LabelRangeError(label_path, f"label {int(segment[bad][0])} outside 0..{num_classes - 1} (ignore: {list(ignore_labels)})")
        out["segment"] = torch.from_numpy(segment)
    return out


class PointCloudDataset(Dataset):
    """Scenes through a transform pipeline, as ``{"coord", "feat", "segment", "name"}``.

    Args:
        scenes: scene readers (``NpyScene``, ``PthScene``, ``PointFileScene``...).
        transform: the pipeline (``data.point_transforms.Compose``).
        features: keys concatenated into ``feat``.
        num_classes: labels must lie in ``0..num_classes - 1`` (or be ignored).
        loop: the dataset repeats this many times per epoch (short epochs waste validation).
    """

    def __init__(self, scenes: Sequence, transform: Compose, features: Sequence[str], num_classes: int, loop: int = 1):
        self.scenes, self.transform = list(scenes), transform
        self.features, self.num_classes, self.loop = tuple(features), num_classes, loop

    def __len__(self) -> int:
        return len(self.scenes) * self.loop

    def class_counts(self) -> torch.Tensor:
        """Labelled points per class over the scenes (each read and checked once), (num_classes,)."""
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        for source in self.scenes:
            segment = check_scene(source.load(), self.features, self.num_classes).get("segment")
            if segment is not None:
                counts += torch.bincount(segment[segment != IGNORE_INDEX], minlength=self.num_classes)
        return counts

    def __getitem__(self, key: SampleKey) -> dict:
        # training keys are (index, augmentation seed) pairs from the resumable sampler; every
        # random choice for this sample is drawn from that seed, so a resumed fit replays it.
        # Evaluation passes plain indices: its pipeline then draws from a seed fixed per scene.
        index, seed = sample_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"scene {index} of a dataset of {len(self)}")  # also ends iteration
        source = self.scenes[index % len(self.scenes)]
        scene = check_scene(source.load(), self.features, self.num_classes)
        generator = torch.Generator().manual_seed(seed if seed is not None else index)
        scene = self.transform(scene, generator)
        feat = [scene[key] for key in self.features]
        sample = {
            "coord": scene["coord"].float(),
            "feat": torch.cat(feat, 1).float() if feat else scene["coord"].new_zeros(len(scene["coord"]), 0),
            "name": source.name,
        }
        if "segment" in scene:
            sample["segment"] = scene["segment"]
        return sample


def collate_points(samples: list[dict]) -> dict:
    """Concatenate scenes; ``offset`` holds the cumulative point counts (no padding)."""
    batch = {
        "coord": torch.cat([s["coord"] for s in samples]),
        "feat": torch.cat([s["feat"] for s in samples]),
        "offset": torch.cumsum(torch.tensor([len(s["coord"]) for s in samples]), 0),
        "name": [s["name"] for s in samples],
    }
    if all("segment" in s for s in samples):
        batch["segment"] = torch.cat([s["segment"] for s in samples])
    return batch


def class_palette(num_classes: int) -> torch.Tensor:
    """A fixed colour per class, (K, 3) in [0, 1]: S3DIS's usual colours for its 13 classes,
    evenly spaced hues beyond."""
    s3dis = [
        [0, 255, 0], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 255], [100, 100, 255], [200, 200, 100],
        [170, 120, 200], [255, 0, 0], [200, 100, 100], [10, 200, 100], [200, 200, 200], [50, 50, 50],
    ]  # fmt: skip
    colours = [torch.tensor(c, dtype=torch.float32) / 255 for c in s3dis[:num_classes]]
    for k in range(len(colours), num_classes):
        hue = (k * 0.618034) % 1.0
        colours.append(torch.tensor(_hsv_to_rgb(hue, 0.75, 0.9)))
    return torch.stack(colours)


def _hsv_to_rgb(h: float, s: float, v: float) -> list[float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i]


# -- the shared datamodule -----------------------------------------------------------------------


class PointCloudDataModule(BaseDataModule, ABC):
    """Offset batching, transforms from the config, predict on a folder of .ply / .pcd files.

    Subclasses set ``class_names`` and implement ``scenes(split)`` for ``train``, ``val`` and
    ``test``.

    Args:
        features: per-point inputs besides the coordinates, in order (``color``, ``normal``); the
            network's input width is ``3 + 3 * len(features)`` (coordinates are always given).
        train_transforms: training pipeline (``data.point_transforms``); default: ConDaFormer's.
        eval_transforms: validation / test / predict pipeline; default: centre only (the task
            voxelizes whole scenes itself, for voting).
        loop: passes over the training scenes per epoch.
        **kwargs: ``BaseDataModule`` arguments (root, batch sizes, workers, predict folders).
    """

    class_names: tuple[str, ...] = ()
    default_features: tuple[str, ...] = ("color",)
    collate_fn = staticmethod(collate_points)

    def __init__(
        self,
        features: Optional[list[str]] = None,
        train_transforms: Optional[list[dict]] = None,
        eval_transforms: Optional[list[dict]] = None,
        loop: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.features = tuple(features if features is not None else self.default_features)
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; choose from {FEATURES}")
        self.train_transform = Compose(train_transforms if train_transforms is not None else DEFAULT_TRAIN)
        self.eval_transform = Compose(eval_transforms if eval_transforms is not None else DEFAULT_EVAL)
        self.loop = loop

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def scenes(self, split: str) -> list:
        """Scene readers of ``split`` (``train``, ``val`` or ``test``); each format lists its own."""

    def _dataset(self, split: str, scenes: list) -> PointCloudDataset:
        if not scenes:
            raise EmptyDatasetError(self.resolved_root(), f"the {split} split holds no scenes")
        transform = self.train_transform if split == "train" else self.eval_transform
        return PointCloudDataset(scenes, transform, self.features, self.num_classes, self.loop if split == "train" else 1)

    def setup(self, stage: str) -> None:
        if stage == "predict":
            self.datasets["predict"] = self.predict_dataset()
            return
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}[stage]
        for split in needed:
            self.datasets[split] = self._dataset(split, self.scenes(split))

    # -- predict -------------------------------------------------------------------------------
    def predict_dataset(self) -> PointCloudDataset:
        if self.predict_dir is None:
            raise DatasetNotFoundError("--data.predict_dir", "predict needs a folder of .ply / .pcd files")
        folder = Path(self.predict_dir)
        if not folder.is_dir():
            raise DatasetNotFoundError(folder, "predict folder does not exist")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in POINT_FILE_SUFFIXES)
        if not files:
            raise EmptyDatasetError(folder, f"holds no {' or '.join(POINT_FILE_SUFFIXES)} files")
        self.prediction_paths([p.name for p in files])  # refuse before writing anything
        self.dataset_name = folder.name
        return PointCloudDataset([PointFileScene(p.name, p) for p in files], self.eval_transform, self.features, self.num_classes)

    def prediction_paths(self, names: list[str]) -> list[Path]:
        paths = super().prediction_paths(names)
        for path in paths:
            super().prediction_paths([path.with_suffix(".labels").name])
        return paths

    def write_prediction(self, prediction: torch.Tensor, names: list[str]) -> None:
        """``<name>`` coloured by predicted class (same format) and ``<stem>.labels`` (one class per line)."""
        if self.predict_dir is None:
            raise DatasetNotFoundError("--data.predict_dir", "predict needs a folder of .ply / .pcd files")
        labels = prediction.argmax(1).cpu() if prediction.ndim == 2 else prediction.cpu()
        palette = class_palette(max(self.num_classes, int(labels.max()) + 1 if len(labels) else 1))
        start = 0
        for name, path in zip(names, self.prediction_paths(names)):
            coord = read_point_file(Path(self.predict_dir) / name)["coord"]
            part = labels[start : start + len(coord)]
            start += len(coord)
            if len(part) != len(coord):
                raise ShapeMismatchError(path, f"{len(part)} predictions for {len(coord)} points")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_point_file(path, coord, palette[part].numpy())
            write_atomically(path.with_suffix(".labels"), lambda tmp: np.savetxt(tmp, part.numpy(), fmt="%d"))
