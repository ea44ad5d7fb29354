"""S3DIS (Stanford Large-Scale 3D Indoor Spaces): 13 classes, six areas, Area 5 for testing.

Supported layouts under ``root`` (an ``Area_N`` folder may also sit one level down, e.g. inside
``Stanford3dDataset_v1.2_Aligned_Version/``):

=========  =========================================================  ==========================
layout     files                                                      produced by
=========  =========================================================  ==========================
``raw``    ``Area_N/<room>/Annotations/<class>_<i>.txt``              the Stanford release
           (``x y z r g b`` per line)
``npy``    ``Area_N/<room>/{coord,color,segment}.npy`` [``normal.npy``]  Pointcept's preprocessing
``pth``    ``Area_N/<room>.pth`` (dict: ``coord``, ``color``,          Point Transformer V2's
           ``semantic_gt``)                                           preprocessing (ConDaFormer)
=========  =========================================================  ==========================

The raw layout is converted once into the ``npy`` layout under the cache directory (parsing
text is slow; this is what Pointcept's ``preprocess_s3dis.py`` does), and re-converted when the
raw files change. Class ``stairs`` counts as ``clutter``, as in the official preprocessing. The
raw release has a known defect (a stray character in
``Area_5/office_19/Annotations/ceiling_1.txt``, line 323474): the conversion stops with an error
naming that file and line; delete the character and run again.

Splits: the ``test_area`` tests; ``val_area`` validates (default: the test area, as the official
code and the field do); every other area trains. An empty area, a room folder without its
``Annotations/`` (raw) or ``coord.npy`` (npy), a NaN or infinite raw value and a raw colour that
is not an integer in 0..255 are errors naming the folder or file (and the line).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
from rich.progress import Progress

from data.base import build_once
from data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    InvalidValueError,
    LabelRangeError,
    LayoutError,
    UnreadableFileError,
)
from data.point_cloud import NpyScene, PointCloudDataModule, PthScene

S3DIS_CLASSES = (
    "ceiling", "floor", "wall", "beam", "column", "window", "door",
    "table", "chair", "sofa", "bookcase", "board", "clutter",
)  # fmt: skip
RAW_ALIASES = {"stairs": "clutter"}
LAYOUTS = ("auto", "raw", "npy", "pth")
_AREA = re.compile(r"^Area_(\d+)$")


def find_areas(root: Path) -> dict[int, Path]:
    """``{n: folder}`` for every ``Area_n`` folder in ``root`` or one level below it."""
    for base in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        areas = {int(m.group(1)): p for p in sorted(base.iterdir()) if p.is_dir() and (m := _AREA.match(p.name))}
        if areas:
            return areas
    raise LayoutError(root, "no Area_<n> folders (in it or one level below)")


def detect_layout(areas: dict[int, Path]) -> str:
    """``raw``, ``npy`` or ``pth`` from what the first non-empty area holds."""
    for folder in areas.values():
        if any(folder.glob("*.pth")):
            return "pth"
        for room in sorted(p for p in folder.iterdir() if p.is_dir()):
            if (room / "Annotations").is_dir():
                return "raw"
            if (room / "coord.npy").is_file():
                return "npy"
    raise LayoutError(next(iter(areas.values())).parent, "Area folders hold neither <room>/Annotations/, <room>/coord.npy nor <room>.pth")


# -- the raw layout ------------------------------------------------------------------------------


def parse_xyzrgb(path: Path) -> np.ndarray:
    """An ``x y z r g b`` text file as an (N, 6) float array; a bad line raises with its number."""
    try:
        text = path.read_bytes()
    except OSError as error:
        raise UnreadableFileError(path, f"cannot read ({error})") from None
    lines = text.split(b"\n")
    if lines and not lines[-1].strip():
        lines = lines[:-1]
    try:
        values = np.array(text.split(), dtype=np.float64)  # fast path: whitespace-separated numbers
    except ValueError:
        values = None
    if values is None or values.size != 6 * len(lines):
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            try:
                ok = len([float(f) for f in fields]) == 6
            except ValueError:
                ok = False
            if not ok:
                shown = line[:60].decode("utf-8", errors="backslashreplace")
                raise UnreadableFileError(path, f"line {number} is not six numbers (x y z r g b): {shown!r}")
        raise UnreadableFileError(path, "cannot parse as x y z r g b lines")
    points = values.reshape(-1, 6)
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():  # the fast path read one point per line, so row k is line k + 1
        raise InvalidValueError(path, f"line {int(np.argmin(finite)) + 1} holds a NaN or infinite value")
    colour = points[:, 3:]
    bad = ((colour < 0) | (colour > 255) | (colour != np.round(colour))).any(axis=1)
    if bad.any():  # stored as uint8: anything else would wrap (256 -> 0) or truncate silently
        number = int(np.argmax(bad)) + 1
        shown = " ".join(f"{v:g}" for v in colour[number - 1])
        raise InvalidValueError(path, f"line {number}: colour {shown} is not three integers in 0..255")
    return points


def read_raw_room(room: Path) -> dict[str, np.ndarray]:
    """All annotation files of one room: coordinates, colours, class and instance per point."""
    annotations = room / "Annotations"
    files = sorted(p for p in annotations.iterdir() if p.suffix == ".txt")
    if not files:
        raise EmptyDatasetError(annotations, "holds no <class>_<i>.txt files")
    parts, labels, instances = [], [], []
    for instance, path in enumerate(files):
        name = RAW_ALIASES.get(path.stem.rsplit("_", 1)[0], path.stem.rsplit("_", 1)[0])
        if name not in S3DIS_CLASSES:
            raise LabelRangeError(path, f"class {name!r} is not an S3DIS class ({', '.join(S3DIS_CLASSES)})")
        points = parse_xyzrgb(path)
        parts.append(points)
        labels.append(np.full(len(points), S3DIS_CLASSES.index(name), dtype=np.int16))
        instances.append(np.full(len(points), instance, dtype=np.int32))
    points = np.concatenate(parts)
    return {
        "coord": points[:, :3].astype(np.float32),
        "color": points[:, 3:].astype(np.uint8),
        "segment": np.concatenate(labels),
        "instance": np.concatenate(instances),
    }


def room_folders(area: Path) -> list[Path]:
    """The room folders of an area (hidden ones aside); an area without rooms is an error."""
    rooms = [p for p in sorted(area.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if not rooms:
        raise EmptyDatasetError(area, "holds no room folders")
    return rooms


def convert_raw(root: Path, areas: dict[int, Path]) -> Path:
    """The raw layout converted once to the ``npy`` layout in the cache; returns that folder."""
    rooms = [room for _, folder in sorted(areas.items()) for room in room_folders(folder)]
    for room in rooms:
        if not (room / "Annotations").is_dir():
            raise DatasetNotFoundError(room / "Annotations", "room folder has no Annotations/ (<class>_<i>.txt files)")
    if not rooms:
        raise EmptyDatasetError(root, "no <room>/Annotations folders in the Area folders")
    stamps = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for room in rooms for p in sorted((room / "Annotations").glob("*.txt"))]
    params = {"root": str(root.resolve()), "files": len(stamps), "signature": hash_stamps(stamps)}

    def write(folder: Path) -> None:
        with Progress(transient=True) as progress:
            task = progress.add_task(f"converting raw S3DIS rooms in {root}", total=len(rooms))
            for room in rooms:
                arrays = read_raw_room(room)
                out = folder / room.parent.name / room.name
                out.mkdir(parents=True)
                for key, value in arrays.items():
                    np.save(out / f"{key}.npy", value)
                progress.advance(task)

    return build_once("s3dis_from_raw", params, write)


def hash_stamps(stamps: list) -> str:
    import hashlib

    return hashlib.sha1(repr(stamps).encode()).hexdigest()


# -- the datamodule --------------------------------------------------------------------------------


class S3DISDataModule(PointCloudDataModule):
    """S3DIS in any layout of this module's table, or the built-in rooms (raw layout).

    Args:
        layout: ``auto``, ``raw``, ``npy`` or ``pth``.
        test_area: the area tested (5 in every S3DIS benchmark).
        val_area: the area validated; ``None`` uses the test area (the official protocol).
        builtin_rooms: rooms per area of the built-in set, e.g. ``{1: 8, ..., 6: 4}``.
        builtin_rays: laser rays per scan of the built-in set.
        **kwargs: ``PointCloudDataModule`` arguments.
    """

    class_names = S3DIS_CLASSES
    default_features = ("color",)

    def __init__(
        self,
        layout: str = "auto",
        test_area: int = 5,
        val_area: Optional[int] = None,
        builtin_rooms: Optional[dict[int, int]] = None,
        builtin_rays: int = 30000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout, self.test_area, self.val_area = layout, test_area, val_area
        self.builtin_rooms, self.builtin_rays = builtin_rooms, builtin_rays
        self._areas: Optional[dict[int, list]] = None
        self._area_folders: dict[int, Path] = {}  # the Area_N folders under root, for messages

    def builtin_root(self) -> Path:
        from data.builtin_rooms import build_builtin_s3dis

        return build_builtin_s3dis(self.builtin_rooms, self.builtin_rays)

    def areas(self) -> dict[int, list]:
        """Scene readers of every area (the raw layout converted first)."""
        if self._areas is not None:
            return self._areas
        root = self.resolved_root()
        areas = self._area_folders = find_areas(root)
        layout = detect_layout(areas) if self.layout == "auto" else self.layout
        if layout == "raw":
            areas = find_areas(convert_raw(root, areas))
            layout = "npy"
        scenes: dict[int, list] = {}
        for number, folder in areas.items():
            if layout == "pth":
                scenes[number] = [PthScene(f"{folder.name}/{p.stem}", p, ("semantic_gt", "segment")) for p in sorted(folder.glob("*.pth"))]
            else:
                rooms = room_folders(folder)
                for room in rooms:
                    if not (room / "coord.npy").is_file():
                        raise DatasetNotFoundError(room / "coord.npy", "room folder has no coord.npy")
                scenes[number] = [NpyScene(f"{folder.name}/{room.name}", room) for room in rooms]
        self.dataset_name = "built-in rooms (S3DIS raw layout)" if self.root is None else f"S3DIS-{layout}:{root.name}"
        self._areas = scenes
        return scenes

    def scenes(self, split: str) -> list:
        areas = self.areas()
        held_out = {self.test_area, self.val_area if self.val_area is not None else self.test_area}
        if split == "train":
            chosen = [n for n in areas if n not in held_out]
        else:
            chosen = [self.test_area if split == "test" or self.val_area is None else self.val_area]
        missing = [n for n in chosen if n not in areas]
        if missing or not chosen:
            raise DatasetNotFoundError(self.resolved_root(), f"no Area_{missing[0] if missing else '?'} for the {split} split (areas: {sorted(areas)})")
        for n in chosen:
            if not areas[n]:  # a pth-layout area without .pth files
                raise EmptyDatasetError(self._area_folders[n], f"holds no rooms for the {split} split")
        return [scene for n in chosen for scene in areas[n]]
