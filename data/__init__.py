"""Datamodules: one module per dataset *format*, plus the built-in default generators.

Batches are dicts with fixed keys. Shapes (B = batch, C = channels, T = frames, N = points):

=================  ============================  =============================================
key                shape / type                  meaning
=================  ============================  =============================================
``image``          (B, C, H, W) float in [0, 1]  network input (for low light: the dark image; CT volumes: (B, D, H, W))
``target``         (B, C, H, W) float in [0, 1]  image-to-image reference (the well-lit image)
``mask``           (B, H, W) int64               per-pixel class index ((B, T, H, W) for clips)
``labelled``       (B, T) bool                   which frames of a clip have a ``mask``
``label``          (B,) int64                    per-image class index
``video``          (B, T, C, H, W) float         a clip (echo: C = 1, grey in [0, 1])
``domain``         (B,) int64                    0 = source, 1 = target (domain adaptation)
``coord``          (N, 3) float                  point coordinates, clouds concatenated
``feat``           (N, C) float                  point features
``offset``         (B,) int64                    cumulative point counts: cloud b ends at offset[b]
``segment``        (N,) int64                    per-point class index
``src``, ``tgt``   (N, 3) float                  registration source / target keypoints, concatenated
                                                 (per-pair ends in ``src_offset`` / ``tgt_offset``;
                                                 all registration keys: ``data/registration.py``)
``correspondences`` (B, K, 2) int64              index pairs into src / tgt
``transform``      (B, 4, 4) float               rigid transform taking src onto tgt
``name``           list[str]                     file name of each sample (for writing outputs)
``spacing``        (B, 3) float                  voxel size (z, y, x) of a volume; ones when unknown
``index``          (B,) int64                    a sample's position in its split (de-duplicates DDP padding)
=================  ============================  =============================================
"""

import os

# albumentations asks PyPI for updates on import; this suite never reaches the network at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from data.base import BaseDataModule  # noqa: E402
from data.echo_uda import EchoUDADataModule  # noqa: E402
from data.errors import DatasetError  # noqa: E402
from data.kitti_odometry import KittiOdometryDataModule  # noqa: E402
from data.lol import LowLightDataModule  # noqa: E402
from data.point_files import PointFileDataModule  # noqa: E402
from data.registration import RegistrationDataModule  # noqa: E402
from data.registration_pairs import RegistrationPairsDataModule  # noqa: E402
from data.s3dis import S3DISDataModule  # noqa: E402
from data.scannet import ScanNetDataModule  # noqa: E402
from data.scene_folders import SceneClassificationDataModule  # noqa: E402
from data.synapse import SynapseDataModule  # noqa: E402
from data.threedmatch import ThreeDMatchDataModule  # noqa: E402

__all__ = [
    "BaseDataModule",
    "DatasetError",
    "EchoUDADataModule",
    "KittiOdometryDataModule",
    "LowLightDataModule",
    "PointFileDataModule",
    "RegistrationDataModule",
    "RegistrationPairsDataModule",
    "S3DISDataModule",
    "ScanNetDataModule",
    "SceneClassificationDataModule",
    "SynapseDataModule",
    "ThreeDMatchDataModule",
]
