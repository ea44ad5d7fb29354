"""CardiacUDA (Yang et al., ICCV 2023): echo videos from two hospitals, as NIfTI volumes.

Layout under ``root`` (the Kaggle release; one folder per site, possibly nested)::

    Site_G_100/patient1-4_image.nii.gz     H x W x T video (uint8)
    Site_G_100/patient1-4_label.nii.gz     H x W x T labels, same shape
    Site_R_126/...

The number after the last ``-`` is the view: 1 parasternal long axis (LV, RV), 2 pulmonary artery
(PA), 3 parasternal short axis (LV, RV), 4 apical four-chamber (LV 1, LA 2, RA 3, RV 4). Only view
4 is public. A site is chosen by folder name or glob (``Site_G*`` takes ``Site_G_100`` and
``Site_G_20``). A video without a ``_label`` file is unlabelled (the release has no labels for
``Site_R_73``): usable as target-domain training data, never for scoring.

Training videos are annotated on five frames, the others are zero; validation and test videos on
every frame. Frames whose label is non-zero count as annotated. The release stores some labels as
polygon outlines rather than filled regions; with ``fill_contours`` each structure's outline is
filled (a filled region is left as it is). The official code's ``infos.npy`` (a pickle with the
authors' absolute paths) is not needed and not read. Volumes are read as stored (H, W, T), as the
official loader does.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from data.echo_video import EchoFrames, EchoVideo, check_finite, check_frames, to_unit_range
from data.errors import DatasetNotFoundError, EmptyDatasetError, UnreadableFileError

#: label codes per view, as in the official loader
VIEW_STRUCTURES = {
    "1": {"LV": 1, "RV": 2},
    "2": {"PA": 1},
    "3": {"LV": 1, "RV": 2},
    "4": {"LV": 1, "LA": 2, "RA": 3, "RV": 4},
}
SUFFIXES = (".nii.gz", ".nii")


def read_nifti(path: Path) -> np.ndarray:
    """The voxel array of a NIfTI file as stored, or an error naming the file."""
    import nibabel as nib

    try:
        volume = np.asarray(nib.load(str(path)).dataobj)
    except Exception as error:  # nibabel raises several types for truncated or foreign files
        raise UnreadableFileError(path, f"cannot read NIfTI ({type(error).__name__}: {error})") from None
    return check_finite(volume, path)


def as_frames_first(volume: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, T) or (H, W) -> (T, H, W); trailing singleton axes are dropped."""
    if volume.size == 0:
        raise UnreadableFileError(path, f"holds no frames (array shape {volume.shape})")
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim == 2:
        volume = volume[..., None]
    if volume.ndim != 3:
        raise UnreadableFileError(path, f"expected an H x W x T video, got an array of shape {volume.shape}")
    return np.moveaxis(volume, -1, 0)


def fill_outlines(labels: np.ndarray) -> np.ndarray:
    """Fill each structure's closed outline in every frame (T, H, W); filled regions are unchanged."""
    filled = labels.copy()
    for t in np.flatnonzero(labels.reshape(len(labels), -1).any(1)):
        frame = np.zeros_like(labels[t])
        for code in np.unique(labels[t]):
            if code:
                frame[ndimage.binary_fill_holes(labels[t] == code) & (frame == 0)] = code
        filled[t] = frame
    return filled


@dataclass
class CardiacUDAVideo(EchoVideo):
    image_path: Path = Path()
    label_path: Optional[Path] = None
    fill_contours: bool = True

    def read(self) -> EchoFrames:
        images = as_frames_first(read_nifti(self.image_path), self.image_path)
        if self.label_path is None:
            labels = np.zeros(images.shape, np.int64)
        else:
            labels = as_frames_first(read_nifti(self.label_path), self.label_path)
            labels = np.rint(labels).astype(np.int64) if labels.dtype.kind == "f" else labels.astype(np.int64)
        frames = EchoFrames(to_unit_range(images), labels, labels.reshape(len(labels), -1).any(1) if labels.size else np.zeros(0, bool))
        check_frames(frames, self.image_path, self.label_path, list(self.structures.values()))
        if self.fill_contours and self.label_path is not None:
            frames.labels = fill_outlines(frames.labels)
        return frames


def _strip_suffix(name: str, tail: str) -> Optional[str]:
    for suffix in SUFFIXES:
        if name.endswith(tail + suffix):
            return name[: -len(tail + suffix)]
    return None


def discover_cardiac_uda(root: Path, site: str, view: Optional[str] = "4", fill_contours: bool = True) -> list[CardiacUDAVideo]:
    """Every video of ``view`` in the site folders under ``root`` matching ``site``."""
    if view is not None and view not in VIEW_STRUCTURES:
        raise DatasetNotFoundError(root, f"CardiacUDA has views {', '.join(VIEW_STRUCTURES)}, not {view!r}")
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and fnmatch.fnmatch(p.name, site)]
    if not folders:
        found = ", ".join(p.name for p in sorted(root.iterdir()) if p.is_dir()) or "none"
        raise DatasetNotFoundError(root / site, f"no site folder matches {site!r} (folders: {found})")
    videos = []
    for folder in folders:
        for image in sorted(p for p in folder.rglob("*_image.nii*") if _strip_suffix(p.name, "_image")):
            stem = _strip_suffix(image.name, "_image")
            match = re.search(r"-(\d+)$", stem)
            video_view = match.group(1) if match else view
            if view is not None and video_view != view:
                continue
            label = next((image.with_name(stem + "_label" + s) for s in SUFFIXES if image.with_name(stem + "_label" + s).is_file()), None)
            name = str(Path(folder.name) / image.relative_to(folder).parent / stem)
            videos.append(
                CardiacUDAVideo(
                    name=name,
                    structures=VIEW_STRUCTURES[video_view or "4"],
                    has_labels=label is not None,
                    image_path=image,
                    label_path=label,
                    fill_contours=fill_contours,
                )
            )
    if not videos:
        raise EmptyDatasetError(root / site, f"holds no *_image.nii.gz videos of view {view}")
    return videos
