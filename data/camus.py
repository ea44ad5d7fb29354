"""CAMUS (Leclerc et al., IEEE TMI 2019): apical two- and four-chamber echo of 500 patients.

Two public releases are read, detected from the folder names:

=============  ==============================================================================
release        layout under ``root``
=============  ==============================================================================
NIfTI (2023)   ``database_nifti/patientXXXX/patientXXXX_4CH_half_sequence.nii.gz`` with
               ``..._half_sequence_gt.nii.gz`` (every frame labelled), ``Info_4CH.cfg``, and
               ``database_split/subgroup_{training,validation,testing}.txt`` (patient names)
MetaImage      ``training/patientXXXX/patientXXXX_4CH_sequence.mhd`` (+ ``.raw``), the labelled
(2019)         end-diastole / end-systole frames ``..._4CH_ED.mhd``, ``..._4CH_ED_gt.mhd``,
               ``..._4CH_ES*.mhd``, and ``Info_4CH.cfg`` (``ED: 1``, ``ES: 18``, ``NbFrame: 18``)
=============  ==============================================================================

A half sequence runs from end-diastole to end-systole. Without a sequence ground truth the ED and
ES labels are placed on the frames that ``Info_<view>.cfg`` names (first and last by default);
without a sequence file at all, the ED and ES images form a two-frame video. Labels: 1 LV
(endocardium), 2 myocardium, 3 LA. The MetaImage files are read by ``read_mhd`` (no SimpleITK);
only ``training/`` is read (the challenge's ``testing/`` has no public labels). Patients without
a split file are split by the datamodule's seed; a ``database_split/`` folder must hold all three
files, and a patient they list must exist. A patient folder without the view's images, like a
NaN or infinite pixel, stops the run with an error naming the folder or file. NIfTI arrays are stored (x, y, t) and
transposed to frames of (height, width), as SimpleITK would give them.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from data.cardiac_uda import read_nifti
from data.echo_video import EchoFrames, EchoVideo, check_finite, check_frames, to_unit_range
from data.errors import DatasetNotFoundError, EmptyDatasetError, LayoutError, UnreadableFileError

STRUCTURES = {"LV": 1, "MYO": 2, "LA": 3}
VIEWS = {"2": "2CH", "4": "4CH", "2CH": "2CH", "4CH": "4CH"}
SPLIT_FILES = {"train": "subgroup_training.txt", "val": "subgroup_validation.txt", "test": "subgroup_testing.txt"}

# -- MetaImage (.mhd + .raw) ---------------------------------------------------------------------

MET_TYPES = {
    "MET_UCHAR": np.uint8, "MET_CHAR": np.int8, "MET_USHORT": np.uint16, "MET_SHORT": np.int16,
    "MET_UINT": np.uint32, "MET_INT": np.int32, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
}  # fmt: skip


def read_mhd(path: Path) -> np.ndarray:
    """Pixels of a MetaImage header and its data file, as (z, y, x) (or (y, x)).

    Reads ``DimSize``, ``ElementType``, ``ElementDataFile`` (a file beside the header, or
    ``LOCAL`` for data after the header), ``ElementNumberOfChannels`` = 1, the byte order and
    ``CompressedData`` (zlib).
    """
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UnreadableFileError(path, f"cannot read MetaImage header ({error})") from None
    header, offset = {}, 0
    for line in raw.splitlines(keepends=True):
        offset += len(line)
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            raise UnreadableFileError(path, f"not a MetaImage header (line {line[:40]!r})")
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        dtype = np.dtype(MET_TYPES[header["ElementType"]])
        data_file = header["ElementDataFile"]
    except KeyError as error:
        raise UnreadableFileError(path, f"MetaImage header lacks or misstates {error}") from None
    if int(header.get("ElementNumberOfChannels", "1")) != 1:
        raise UnreadableFileError(path, "multi-channel MetaImage is not supported")
    msb = header.get("BinaryDataByteOrderMSB", header.get("ElementByteOrderMSB", "False")).lower() == "true"
    dtype = dtype.newbyteorder(">" if msb else "<")
    if data_file == "LOCAL":
        data, data_path = raw[offset:], path
    else:
        data_path = path.parent / data_file
        if not data_path.is_file():
            raise DatasetNotFoundError(data_path, f"data file named by {path.name} does not exist")
        data = data_path.read_bytes()
    if header.get("CompressedData", "False").lower() == "true":
        try:
            data = zlib.decompress(data)
        except zlib.error as error:
            raise UnreadableFileError(data_path, f"corrupt compressed data ({error})") from None
    count = int(np.prod(dims))
    if len(data) < count * dtype.itemsize:
        raise UnreadableFileError(data_path, f"holds {len(data)} bytes; DimSize {dims} of {dtype} needs {count * dtype.itemsize}")
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(dims[::-1]).astype(dtype.newbyteorder("="))
    return check_finite(array, data_path)


# -- records --------------------------------------------------------------------------------------


def read_info(path: Path) -> dict[str, str]:
    """``Info_<view>.cfg``: ``Key: value`` lines."""
    if not path.is_file():
        return {}
    info = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


@dataclass
class CamusVideo(EchoVideo):
    folder: Path = Path()
    view: str = "4CH"
    release: str = "nifti"  # or "mhd"

    def _path(self, part: str) -> Optional[Path]:
        suffixes = (".nii.gz", ".nii") if self.release == "nifti" else (".mhd",)
        for suffix in suffixes:
            candidate = self.folder / f"{self.folder.name}_{self.view}_{part}{suffix}"
            if candidate.is_file():
                return candidate
        return None

    def _read(self, path: Path) -> np.ndarray:
        """(T, H, W) from a sequence file, or (1, H, W) from a single image."""
        if self.release == "mhd":
            array = read_mhd(path)
            return array[None] if array.ndim == 2 else array
        array = read_nifti(path)
        while array.ndim > 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            raise UnreadableFileError(path, f"expected an x, y(, t) volume, got shape {array.shape}")
        return np.transpose(array, (2, 1, 0))

    def read(self) -> EchoFrames:
        sequence_name = "half_sequence" if self.release == "nifti" else "sequence"
        sequence, sequence_gt = self._path(sequence_name), self._path(sequence_name + "_gt")
        ed, es = self._path("ED"), self._path("ES")
        ed_gt, es_gt = self._path("ED_gt"), self._path("ES_gt")
        if sequence is not None:
            images = self._read(sequence)
            if sequence_gt is not None:
                labels, label_path = self._read(sequence_gt), sequence_gt
                labelled = np.ones(len(images), bool)
            else:
                labels, labelled, label_path = np.zeros(images.shape, np.int64), np.zeros(len(images), bool), ed_gt or es_gt
                info = read_info(self.folder / f"Info_{self.view}.cfg")
                for key, gt, default in (("ED", ed_gt, 1), ("ES", es_gt, len(images))):
                    if gt is None:
                        continue
                    frame = int(info.get(key, default)) - 1
                    if not 0 <= frame < len(images):
                        raise LayoutError(self.folder / f"Info_{self.view}.cfg", f"{key} frame {frame + 1} is outside the {len(images)}-frame sequence")
                    single = self._read(gt)
                    if single.shape[1:] != images.shape[1:]:
                        labels = single  # reported as a shape mismatch below
                        label_path = gt
                        break
                    labels[frame], labelled[frame] = single[0], True
        elif ed is not None and es is not None:
            images = np.concatenate([self._read(ed), self._read(es)])
            label_path = ed_gt
            if ed_gt is None or es_gt is None:
                labels, labelled = np.zeros(images.shape, np.int64), np.zeros(2, bool)
            else:
                labels, labelled = np.concatenate([self._read(ed_gt), self._read(es_gt)]), np.ones(2, bool)
        else:
            raise EmptyDatasetError(self.folder, f"holds no {self.view} sequence or ED/ES images")
        frames = EchoFrames(to_unit_range(images), np.rint(labels).astype(np.int64), labelled)
        return check_frames(frames, sequence or ed, label_path, list(STRUCTURES.values()))


def _read_splits(root: Path, patients_dir: Path) -> dict[str, str]:
    """Patient -> split from ``database_split/`` (NIfTI release), if present; then all three split
    files must be there and every patient they list must exist (nothing is re-split silently)."""
    folder = root / "database_split"
    if not folder.is_dir():
        return {}
    splits = {}
    for split, name in SPLIT_FILES.items():
        path = folder / name
        if not path.is_file():
            raise DatasetNotFoundError(path, f"split file missing ({folder.name}/ needs {', '.join(SPLIT_FILES.values())})")
        for patient in path.read_text().split():
            if not (patients_dir / patient).is_dir():
                raise DatasetNotFoundError(patients_dir / patient, f"listed in {path} but missing")
            splits[patient] = split
    return splits


def discover_camus(root: Path, view: str = "4") -> list[CamusVideo]:
    """Every patient's ``view`` sequence under ``root`` (either release; see the module docstring)."""
    if view not in VIEWS:
        raise LayoutError(root, f"CAMUS has views 2CH and 4CH, not {view!r}")
    view = VIEWS[view]
    if (root / "database_nifti").is_dir():
        release, patients_dir = "nifti", root / "database_nifti"
    elif (root / "training").is_dir():
        release, patients_dir = "mhd", root / "training"
    elif any(p.is_dir() and re.fullmatch(r"patient\d+", p.name) for p in root.iterdir()):
        release, patients_dir = "nifti", root
        if next(root.glob("patient*/*.mhd"), None) is not None:
            release = "mhd"
    else:
        raise LayoutError(root, "not a CAMUS folder: expected database_nifti/ (NIfTI release) or training/ (MetaImage release)")
    splits = _read_splits(root, patients_dir)
    videos = []
    for folder in sorted(p for p in patients_dir.iterdir() if p.is_dir() and re.fullmatch(r"patient\d+", p.name)):
        video = CamusVideo(name=folder.name, structures=dict(STRUCTURES), split=splits.get(folder.name), folder=folder, view=view, release=release)
        gt_parts = ("half_sequence_gt", "ED_gt", "ES_gt") if release == "nifti" else ("sequence_gt", "ED_gt", "ES_gt")
        video.has_labels = any(video._path(part) for part in gt_parts)
        if not (video._path("half_sequence" if release == "nifti" else "sequence") or video._path("ED")):
            raise EmptyDatasetError(folder, f"holds no {view} sequence or ED/ES images")
        videos.append(video)
    if not videos:
        raise EmptyDatasetError(patients_dir, f"holds no patientXXXX folders with {view} images")
    return videos
