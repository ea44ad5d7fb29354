"""KITTI odometry as a registration benchmark (the FCGF / PointDSC / VBReg protocol).

Layout under ``root`` (the odometry benchmark's ``dataset/`` folder)::

    sequences/<NN>/velodyne/<NNNNNN>.bin    scans: float32 x, y, z, reflectance
    sequences/<NN>/calib.txt                optional; its ``Tr:`` line is the velodyne-to-camera motion
    poses/<NN>.txt                          camera poses, one 3 x 4 matrix (12 numbers) per scan

Pairs (``misc/cal_fpfh.py::process_kitti``): walking through a sequence from its first scan, a
scan is paired with the last scan before the camera has moved more than 10 m (looking at most
100 scans ahead); the walk resumes after that partner. Pair (8, 15, 58) is dropped, as in the
reference lists. The ground truth takes scan ``t0`` into scan ``t1``'s frame,
``T = Tr^-1 P_t1^-1 P_t0 Tr`` (``Tr`` from ``calib.txt``, else KITTI's published constant), refined
by point-to-point ICP (0.2 m, 200 iterations) on 5 cm down-sampled scans, because odometry
poses alone are off by decimetres. (The reference code composes the ICP correction on the wrong
side, ``T @ T_icp``; here it is ``T_icp @ T``.) The refinement is cached with the features.

Splits: sequences 0-5 train, 6-7 validation, 8-10 test (555 pairs in the standard test set).
Thresholds: RE < 5 degrees, TE < 0.60 m; VBReg uses tau = sigma_d = 1.2 m and 0.30 m voxels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import open3d as o3d

from data.errors import DatasetNotFoundError, EmptyDatasetError, InvalidValueError, UnreadableFileError
from data.registration import RegistrationDataModule, RegistrationPair

MIN_DISTANCE = 10.0
LOOKAHEAD = 100
EXCLUDED_PAIRS = {(8, 15, 58)}
#: KITTI's velodyne-to-camera-0 calibration (FCGF's constant) when a sequence has no calib.txt
VELODYNE_TO_CAMERA = np.array(
    [
        [7.533745e-03, -9.999714e-01, -6.166020e-04, -4.069766e-03],
        [1.480249e-02, 7.280733e-04, -9.998902e-01, -7.631618e-02],
        [9.998621e-01, 7.523790e-03, 1.480755e-02, -2.717806e-01],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def read_poses(path: Path) -> np.ndarray:
    """(T, 4, 4) camera-to-world poses from a KITTI poses file."""
    if not path.is_file():
        raise DatasetNotFoundError(path, "poses file does not exist")
    try:
        values = np.loadtxt(path, ndmin=2)
    except ValueError as error:
        raise UnreadableFileError(path, f"cannot parse poses ({error})") from None
    if values.shape[1] != 12:
        raise UnreadableFileError(path, f"expected 12 numbers per line (a 3 x 4 pose), found {values.shape[1]}")
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        raise InvalidValueError(path, f"line {int(np.argmin(finite)) + 1}: the pose holds NaN or infinite values")
    poses = np.tile(np.eye(4), (len(values), 1, 1))
    poses[:, :3, :] = values.reshape(-1, 3, 4)
    return poses


def read_velodyne_to_camera(calib: Path) -> np.ndarray:
    """The ``Tr:`` line of a sequence's calib.txt as 4 x 4, or the published constant without one."""
    if not calib.is_file():
        return VELODYNE_TO_CAMERA
    for line in calib.read_text().splitlines():
        if line.startswith("Tr:"):
            try:
                values = [float(v) for v in line.split()[1:]]
            except ValueError:
                values = []
            if len(values) != 12:
                raise UnreadableFileError(calib, "the Tr: line needs 12 numbers")
            if not np.isfinite(values).all():
                raise InvalidValueError(calib, "the Tr: line holds NaN or infinite values")
            matrix = np.eye(4)
            matrix[:3, :] = np.reshape(values, (3, 4))
            return matrix
    raise UnreadableFileError(calib, "has no Tr: line (velodyne to camera)")


def select_pairs(positions: np.ndarray, scans: list[int]) -> list[tuple[int, int]]:
    """The reference pair selection (module docstring) over the scans that exist."""
    available = set(scans)
    pairs = []
    current = scans[0] if scans else 0
    while current in available:
        window = positions[current : current + LOOKAHEAD]
        far = np.nonzero(np.linalg.norm(window - positions[current], axis=1) > MIN_DISTANCE)[0]
        if len(far) == 0:
            current += 1
            continue
        partner = current + far[0] - 1
        if partner in available:
            pairs.append((current, partner))
            current = partner + 1
        else:
            current += 1
    return pairs


def refine_with_icp(source: np.ndarray, target: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """Point-to-point ICP (0.2 m, 200 iterations) on 5 cm down-sampled scans, from ``initial``."""
    def cloud(points: np.ndarray) -> o3d.geometry.PointCloud:
        return o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points)).voxel_down_sample(0.05)

    moved = cloud(source).transform(initial)
    result = o3d.pipelines.registration.registration_icp(
        moved,
        cloud(target),
        0.2,
        np.eye(4),
        o3d.pipelines.registration.TransformationEstimationPointToPoint(),
        o3d.pipelines.registration.ICPConvergenceCriteria(max_iteration=200),
    )
    return np.asarray(result.transformation) @ initial


def kitti_pairs(root: Path, sequences: list[int], icp: bool) -> list[RegistrationPair]:
    """Registration pairs of the given sequences (see the module docstring)."""
    pairs = []
    for sequence in sequences:
        folder = root / "sequences" / f"{sequence:02d}"
        velodyne = folder / "velodyne"
        if not velodyne.is_dir():
            raise DatasetNotFoundError(velodyne, f"sequence {sequence:02d} has no velodyne scans")
        scans = sorted(int(p.stem) for p in velodyne.glob("*.bin"))
        if not scans:
            raise EmptyDatasetError(velodyne, "holds no .bin scans")
        poses_path = root / "poses" / f"{sequence:02d}.txt"
        poses = read_poses(poses_path)
        if len(poses) <= scans[-1]:
            raise UnreadableFileError(poses_path, f"has {len(poses)} poses but scan {scans[-1]:06d}.bin exists")
        tr = read_velodyne_to_camera(folder / "calib.txt")
        for t0, t1 in select_pairs(poses[:, :3, 3], scans):
            if (sequence, t0, t1) in EXCLUDED_PAIRS:
                continue
            transform = np.linalg.inv(tr) @ np.linalg.inv(poses[t1]) @ poses[t0] @ tr
            pairs.append(
                RegistrationPair(
                    f"{sequence:02d}/{t0:06d}_{t1:06d}",
                    velodyne / f"{t0:06d}.bin",
                    velodyne / f"{t1:06d}.bin",
                    transform,
                    refine=refine_with_icp if icp else None,
                )
            )
    return pairs


class KittiOdometryDataModule(RegistrationDataModule):
    """KITTI odometry pairs (module docstring). There is no built-in KITTI set; pass ``root``.

    Args:
        train_sequences / val_sequences / test_sequences: sequence numbers per split.
        icp_refinement: refine the odometry ground truth by ICP (the reference protocol).
        **kwargs: ``RegistrationDataModule`` arguments (use ``voxel_size: 0.30`` for KITTI).
    """

    def __init__(
        self,
        train_sequences: list[int] = [0, 1, 2, 3, 4, 5],  # noqa: B006
        val_sequences: list[int] = [6, 7],  # noqa: B006
        test_sequences: list[int] = [8, 9, 10],  # noqa: B006
        icp_refinement: bool = True,
        **kwargs,
    ):
        kwargs.setdefault("voxel_size", 0.30)
        super().__init__(**kwargs)
        self.sequences = {"train": list(train_sequences), "val": list(val_sequences), "test": list(test_sequences)}
        self.icp_refinement = icp_refinement

    def split_pairs(self, split: str) -> list[RegistrationPair]:
        root = self.resolved_root()
        self.dataset_name = f"KITTI:{root.name}"
        pairs = kitti_pairs(root, self.sequences[split], self.icp_refinement)
        if not pairs:
            raise EmptyDatasetError(root / "sequences", f"sequences {self.sequences[split]} give no pairs 10 m apart")
        return pairs
