"""ScanNet v2 semantic segmentation (20 classes), in the preprocessed layouts the field uses.

Supported layouts under ``root``:

=========  ===============================================================  =========================
layout     files                                                            produced by
=========  ===============================================================  =========================
``npy``    ``{train,val,test}/scene*/{coord,color,normal,segment20}.npy``   Pointcept's preprocessing
``pth``    ``{train,val,test}/scene*.pth`` (dict: ``coord``, ``color``,      Point Transformer V2's
           ``normal``, ``semantic_gt20``)                                   preprocessing (ConDaFormer)
=========  ===============================================================  =========================

Labels are the 20 NYU40-derived benchmark classes; unlabelled points are -1 (Pointcept) or 255
(PTv2) and are ignored. The benchmark's ``test`` scans have no public labels, so the ``val``
split is the test split unless ``test_split`` says otherwise (results in the paper's table are
on val, or on the hidden test set through the online server). Inputs: colour and normals
(``features``), plus the coordinates the task adds, 9 channels as in the official config.
"""

from __future__ import annotations

from pathlib import Path

from data.errors import DatasetNotFoundError, EmptyDatasetError, LayoutError
from data.point_cloud import NpyScene, PointCloudDataModule, PthScene

SCANNET_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub", "otherfurniture",
)  # fmt: skip
LAYOUTS = ("auto", "npy", "pth")


class ScanNetDataModule(PointCloudDataModule):
    """ScanNet v2 (20 classes) in Pointcept's ``npy`` or PTv2's ``pth`` layout.

    Args:
        layout: ``auto``, ``npy`` or ``pth``.
        test_split: folder scored by ``test`` (``val``: the labelled benchmark split).
        segment_file: label array of the ``npy`` layout (``segment20.npy``; older exports
            name it ``segment.npy``).
        **kwargs: ``PointCloudDataModule`` arguments (``features`` default: colour and normals).
    """

    class_names = SCANNET_CLASSES
    default_features = ("color", "normal")

    def __init__(self, layout: str = "auto", test_split: str = "val", segment_file: str = "segment20.npy", **kwargs):
        super().__init__(**kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout, self.test_split, self.segment_file = layout, test_split, segment_file

    def split_folder(self, split: str) -> Path:
        root = self.resolved_root()
        folder = root / {"train": "train", "val": "val", "test": self.test_split}[split]
        if not folder.is_dir():
            raise DatasetNotFoundError(folder, f"ScanNet {split} split folder does not exist")
        return folder

    def scenes(self, split: str) -> list:
        folder = self.split_folder(split)
        layout = self.layout
        if layout == "auto":
            layout = "pth" if any(folder.glob("*.pth")) else "npy"
        if layout == "pth":
            scenes = [PthScene(f"{folder.name}/{p.stem}", p, ("semantic_gt20", "segment20", "segment")) for p in sorted(folder.glob("*.pth"))]
        else:
            scans = [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
            if not scans and any(folder.iterdir()):
                raise LayoutError(folder, "holds neither scene*/coord.npy folders nor scene*.pth files")
            for scan in scans:
                if not (scan / "coord.npy").is_file():
                    raise DatasetNotFoundError(scan / "coord.npy", "scan folder has no coord.npy")
            scenes = [NpyScene(f"{folder.name}/{p.name}", p, self.segment_file) for p in scans]
        if not scenes:
            raise EmptyDatasetError(folder, f"the {split} split folder holds no scans")
        self.dataset_name = f"ScanNet-{layout}:{self.resolved_root().name}"
        return scenes
