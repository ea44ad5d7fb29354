"""Your own labelled point clouds: ``.ply`` / ``.pcd`` files read with open3d, one label file each.

Layout under ``root``::

    classes.txt                 one class name per line (optional: else ``class_names``)
    train/ val/ test/           any of them; a missing val split is the test split
        scan_01.ply             coordinates, colours (and normals if ``features`` asks)
        scan_01.labels          one integer class per point, in file order (or .txt / .npy)

Every point file of a split needs its label file, with exactly one label per point; -1 and 255
mean unlabelled. Problems raise an error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from data.errors import DatasetNotFoundError, EmptyDatasetError, LayoutError, MissingPairError, UnreadableFileError
from data.point_cloud import LABEL_SUFFIXES, POINT_FILE_SUFFIXES, PointCloudDataModule, PointFileScene


def labelled_files(folder: Path) -> list[PointFileScene]:
    """Every .ply / .pcd of ``folder`` with its label file (``<stem>.labels``, ``.txt`` or ``.npy``)."""
    scenes = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in POINT_FILE_SUFFIXES):
        labels = [path.with_suffix(s) for s in LABEL_SUFFIXES if path.with_suffix(s).is_file()]
        if not labels:
            raise MissingPairError(path, f"no label file beside it ({', '.join(path.stem + s for s in LABEL_SUFFIXES)})")
        scenes.append(PointFileScene(f"{folder.name}/{path.name}", path, labels[0]))
    return scenes


class PointFileDataModule(PointCloudDataModule):
    """Labelled ``.ply`` / ``.pcd`` files in ``train/``, ``val/``, ``test/`` folders.

    Args:
        class_names: names of the classes, unless ``root/classes.txt`` lists them.
        **kwargs: ``PointCloudDataModule`` arguments (``features`` default: colour).
    """

    def __init__(self, class_names: Optional[list[str]] = None, **kwargs):
        super().__init__(**kwargs)
        self._class_names = tuple(class_names or ())

    @property
    def class_names(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.root is not None:
            listing = Path(self.root) / "classes.txt"
            if listing.is_file():
                names = tuple(line.strip() for line in listing.read_text().splitlines() if line.strip())
                if not names:
                    raise UnreadableFileError(listing, "lists no class names")
                return names
        if not self._class_names:
            raise DatasetNotFoundError(Path(self.root or ".") / "classes.txt", "no class names: write this file or set --data.class_names")
        return self._class_names

    def scenes(self, split: str) -> list:
        root = self.resolved_root()
        folder = root / split
        if split == "val" and not folder.is_dir():
            folder = root / "test"
        if not folder.is_dir():
            raise DatasetNotFoundError(folder, f"no {split} folder of .ply / .pcd files")
        scenes = labelled_files(folder)
        if not scenes and any(folder.iterdir()):
            raise LayoutError(folder, f"holds no {' or '.join(POINT_FILE_SUFFIXES)} files")
        if not scenes:
            raise EmptyDatasetError(folder, f"the {split} split folder is empty")
        self.dataset_name = f"point files:{root.name}"
        return scenes
