"""Any point clouds: a list of ``.ply`` / ``.pcd`` (or ``.npz`` / ``.bin``) pairs with ground-truth transforms.

Layout under ``root``: ``train.txt``, ``val.txt`` and ``test.txt`` (a split without its file is
not available), or a single ``pairs.txt`` used as the test split. Each non-empty line that does
not start with ``#`` reads::

    <source cloud> <target cloud> <16 numbers: the 4 x 4 transform taking source onto target, row by row>

(12 numbers, a 3 x 4 matrix, are accepted too.) Paths are relative to the list's folder unless
absolute and may not contain spaces. A missing cloud or a malformed line stops the run with the
list's path and line number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.errors import DatasetNotFoundError, EmptyDatasetError, InvalidValueError, MissingPairError, UnreadableFileError
from data.registration import POINT_CLOUD_SUFFIXES, RegistrationDataModule, RegistrationPair, rigid_motion_problem


def read_pair_list(path: Path) -> list[RegistrationPair]:
    """The pairs of one list file (module docstring)."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) not in (14, 18):
            raise UnreadableFileError(path, f"line {number}: expected two clouds and 16 (or 12) numbers, found {len(fields)} fields")
        try:
            values = np.array([float(v) for v in fields[2:]])
        except ValueError:
            raise UnreadableFileError(path, f"line {number}: the transform must be numbers") from None
        transform = np.eye(4)
        transform[: len(values) // 4] = values.reshape(-1, 4)
        problem = rigid_motion_problem(transform)
        if problem:
            raise InvalidValueError(path, f"line {number}: the transform is not rigid ({problem})")
        clouds = []
        for field in fields[:2]:
            cloud = Path(field) if Path(field).is_absolute() else path.parent / field
            if cloud.suffix.lower() not in POINT_CLOUD_SUFFIXES:
                raise UnreadableFileError(path, f"line {number}: {field} is not a {'/'.join(POINT_CLOUD_SUFFIXES)} file")
            if not cloud.is_file():
                raise MissingPairError(cloud, f"named by {path} line {number} but does not exist")
            clouds.append(cloud)
        pairs.append(RegistrationPair(f"{clouds[0].stem}_to_{clouds[1].stem}", clouds[0], clouds[1], transform))
    if not pairs:
        raise EmptyDatasetError(path, "lists no pairs")
    return pairs


class RegistrationPairsDataModule(RegistrationDataModule):
    """Pairs listed in text files (module docstring). No built-in set: pass ``root``.

    Args:
        **kwargs: ``RegistrationDataModule`` arguments (voxel size in your data's units, ...).
    """

    def split_pairs(self, split: str) -> list[RegistrationPair]:
        root = self.resolved_root()
        self.dataset_name = f"pairs:{root.name}"
        path = root / f"{split}.txt"
        if not path.is_file() and split == "test" and (root / "pairs.txt").is_file():
            path = root / "pairs.txt"
        if not path.is_file():
            raise DatasetNotFoundError(path, f"no {split} split: expected {split}.txt (or pairs.txt for test)")
        return read_pair_list(path)
