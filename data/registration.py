"""What every registration dataset shares: reading clouds, FPFH correspondences, batches, predict.

A dataset *format* module (``data.threedmatch``, ``data.kitti_odometry``, ``data.registration_pairs``)
only lists ``RegistrationPair`` records: two cloud files and the rigid transform taking the
source onto the target. Everything else happens here, the same way for every format:

* clouds are read from ``.ply`` / ``.pcd`` (open3d), ``.npz`` (key ``pcd``, ``points`` or ``xyz``;
  FCGF's 3DMatch training files) or ``.bin`` (KITTI velodyne, float32 x, y, z, reflectance); an
  empty cloud or one with NaN / inf coordinates raises ``BadPointCloudError`` naming the file, a
  file cut short ``UnreadableFileError`` (open3d itself would only print a warning);
* keypoints, FPFH features and candidate correspondences come from ``data.correspondences``,
  cached on disk;
* training pairs are augmented as VBReg trains: the source is moved by a random rigid motion (the
  ground truth follows), both clouds jittered, and source and target swapped at random;
* batches hold a fixed number K of correspondences per pair (``collate_pairs``).

Batch keys (B pairs, K correspondences, clouds concatenated):

=====================  ===================  ==================================================
``correspondences``    (B, K, 2) int64      rows of ``src`` / ``tgt`` (already offset per pair)
``src``, ``tgt``       (Ns, 3), (Nt, 3)     keypoints (voxel-down-sampled clouds)
``src_features`` ...   (Ns, 33), (Nt, 33)   raw FPFH features of those keypoints
``src_offset`` ...     (B,) int64           cumulative keypoint counts: pair b ends at offset[b]
``transform``          (B, 4, 4) float      ground truth, source -> target (NaN when unknown)
``information``        (B, 6, 6) float      3DMatch gt.info matrix, zeros when absent
``name``               list[str]            pair name (predict writes ``<name>.txt`` / ``.ply``)
=====================  ===================  ==================================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import open3d as o3d
import torch
from torch.utils.data import Dataset

from data.atomic_write import write_atomically
from data.base import BaseDataModule, cache_root
from data.correspondences import FeatureCache, FPFHParams, select_correspondences
from data.errors import BadPointCloudError, DatasetNotFoundError, UnreadableFileError
from data.point_cloud import check_point_file
from data.sampling import SampleKey, sample_key

POINT_CLOUD_SUFFIXES = (".ply", ".pcd", ".npz", ".bin")


def rigid_motion_problem(transform: np.ndarray) -> str | None:
    """Why a 4 x 4 ground-truth matrix is not a rigid motion, or None if it is one.

    Ground-truth files print a handful of digits, so the rotation need only be orthonormal to
    1e-3; a reflection (determinant -1) is orthonormal too, but no motion.
    """
    if not np.allclose(transform[3], [0, 0, 0, 1]):
        return "last row not 0 0 0 1"
    rotation = transform[:3, :3]
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-3):
        return "rotation not orthonormal"
    if np.linalg.det(rotation) < 0:
        return "rotation is a reflection"
    return None


# -- reading clouds -----------------------------------------------------------------------------


def read_point_cloud(path: Path) -> np.ndarray:
    """The (N, 3) float64 coordinates stored at ``path``; every problem names the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(path, "point cloud file does not exist")
    suffix = path.suffix.lower()
    if suffix in (".ply", ".pcd"):
        # open3d reads a cut or unparsable file with only a printed warning: check the data first
        expected = check_point_file(path, non_finite_error=BadPointCloudError)
        cloud = o3d.io.read_point_cloud(str(path), remove_nan_points=False, remove_infinite_points=False)
        points = np.asarray(cloud.points, dtype=np.float64)
        if len(points) == 0:
            raise BadPointCloudError(path, f"holds no points (an empty cloud, or not a readable {suffix[1:].upper()} file)")
        if len(points) != expected:
            raise UnreadableFileError(path, f"open3d read {len(points)} of the {expected} points its header announces")
    elif suffix == ".npz":
        try:
            with np.load(path) as stored:
                key = next((k for k in ("pcd", "points", "xyz") if k in stored.files), None)
                if key is None:
                    raise UnreadableFileError(path, f"has none of the keys pcd, points, xyz (found {', '.join(stored.files)})")
                points = np.asarray(stored[key], dtype=np.float64)
        except (OSError, ValueError, EOFError) as error:
            raise UnreadableFileError(path, f"cannot read npz ({error})") from None
        if points.ndim != 2 or points.shape[1] < 3:
            raise UnreadableFileError(path, f"array {key!r} has shape {points.shape}, expected (N, 3)")
        points = points[:, :3]
    elif suffix == ".bin":
        size = path.stat().st_size
        if size % 16:  # a cut at a whole point cannot be told from a smaller scan: .bin has no header
            raise UnreadableFileError(path, f"{size} bytes is not a whole number of 16-byte points (float32 x, y, z, reflectance)")
        raw = np.fromfile(path, dtype=np.float32)
        points = raw.reshape(-1, 4)[:, :3].astype(np.float64)
    else:
        raise UnreadableFileError(path, f"unsupported point-cloud format; use one of {', '.join(POINT_CLOUD_SUFFIXES)}")
    if len(points) == 0:
        raise BadPointCloudError(path, "holds no points")
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        raise BadPointCloudError(path, f"{int((~finite).sum())} of {len(points)} points have NaN or infinite coordinates")
    return points


# -- pairs and samples --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RegistrationPair:
    """Two cloud files and, when known, the transform (4 x 4) taking the source onto the target.

    ``information`` is a 3DMatch gt.info matrix (RMSE protocol). ``refine``, a module-level
    function ``(source points, target points, transform) -> transform``, improves an approximate
    ground truth once (KITTI's ICP); its result is cached with the features.
    """

    name: str
    source: Path
    target: Path
    transform: Optional[np.ndarray] = None
    information: Optional[np.ndarray] = field(default=None, repr=False)
    refine: Optional[Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = field(default=None, repr=False)


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotation about a uniformly random axis by an angle uniform in [0, max_degrees]."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0.0, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


@dataclass
class Augmentation:
    """VBReg's training augmentation (3DMatch: any rotation, 0.5 m, 5 mm jitter, random swap)."""

    rotation_degrees: float = 180.0
    translation: float = 0.5
    jitter: float = 0.005
    swap: bool = True


class RegistrationDataset(Dataset):
    """FPFH correspondences of registration pairs; ``augmentation`` set for training.

    Args:
        pairs: the pairs to serve.
        cache: features and candidates (see ``data.correspondences.FeatureCache``).
        num_correspondences: K, correspondences per pair.
        augmentation: random motions for training, or ``None`` (deterministic evaluation).
        min_keypoints: fewer keypoints than this after down-sampling is an error naming the file.
    """

    def __init__(
        self,
        pairs: list[RegistrationPair],
        cache: FeatureCache,
        num_correspondences: int,
        augmentation: Optional[Augmentation] = None,
        min_keypoints: int = 3,
    ):
        self.pairs, self.cache = pairs, cache
        self.num_correspondences, self.augmentation, self.min_keypoints = num_correspondences, augmentation, min_keypoints

    def __len__(self) -> int:
        return len(self.pairs)

    def _keypoints(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        keypoints, features = self.cache.cloud(path, read_point_cloud)
        if len(keypoints) < self.min_keypoints:
            raise BadPointCloudError(
                path, f"only {len(keypoints)} points remain after {self.cache.params.voxel_size:g} voxel down-sampling"
            )
        return keypoints, features

    def prepared(self, index: int):
        """Keypoints and features of both clouds, the pair's candidates and its ground truth."""
        pair = self.pairs[index]
        src, src_feat = self._keypoints(pair.source)
        tgt, tgt_feat = self._keypoints(pair.target)
        candidates = self.cache.candidates(pair.source, pair.target, src_feat, tgt_feat)
        if pair.transform is None:
            transform = np.full((4, 4), np.nan)
        elif pair.refine is not None:
            transform = self.cache.refined_transform(pair.source, pair.target, pair.transform, pair.refine, read_point_cloud)
        else:
            transform = np.asarray(pair.transform, dtype=np.float64)
        return src, src_feat, tgt, tgt_feat, candidates, transform

    def __getitem__(self, key: SampleKey) -> dict:
        """One pair; a training key ``(index, seed)`` draws the motion, jitter, swap and the K
        correspondences from ``seed`` alone, so a resumed fit replays the same samples."""
        index, seed = sample_key(key)
        pair = self.pairs[index]
        src, src_feat, tgt, tgt_feat, candidates, transform = self.prepared(index)
        rng = None
        if self.augmentation is not None:
            if seed is None:
                raise ValueError("an augmenting dataset needs (index, seed) keys (data.sampling.ResumableSampler)")
            rng = np.random.default_rng(seed)
            src, tgt, src_feat, tgt_feat, candidates, transform = self._augment(
                rng, src, tgt, src_feat, tgt_feat, candidates, transform
            )
        correspondences = select_correspondences(candidates, self.num_correspondences, rng)
        information = pair.information if pair.information is not None else np.zeros((6, 6))
        return {
            "correspondences": torch.from_numpy(correspondences),
            "src": torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32)),
            "tgt": torch.from_numpy(np.ascontiguousarray(tgt, dtype=np.float32)),
            "src_features": torch.from_numpy(np.ascontiguousarray(src_feat, dtype=np.float32)),
            "tgt_features": torch.from_numpy(np.ascontiguousarray(tgt_feat, dtype=np.float32)),
            "transform": torch.from_numpy(transform).float(),
            "information": torch.from_numpy(np.asarray(information, dtype=np.float32)),
            "name": pair.name,
        }

    def _augment(self, rng, src, tgt, src_feat, tgt_feat, candidates, transform):
        aug = self.augmentation
        if aug.swap and rng.random() < 0.5:
            src, tgt, src_feat, tgt_feat = tgt, src, tgt_feat, src_feat
            candidates = candidates[:, ::-1].copy()
            transform = np.linalg.inv(transform)
        motion = np.eye(4)
        motion[:3, :3] = _rotation(rng, aug.rotation_degrees)
        motion[:3, 3] = rng.uniform(0.0, aug.translation, size=3)
        src = src.astype(np.float64) @ motion[:3, :3].T + motion[:3, 3]
        transform = transform @ np.linalg.inv(motion)
        src = src + rng.uniform(0.0, aug.jitter, size=src.shape)
        tgt = tgt + rng.uniform(0.0, aug.jitter, size=tgt.shape)
        return src, tgt, src_feat, tgt_feat, candidates, transform


def collate_pairs(samples: list[dict]) -> dict:
    """Stack K correspondences per pair and concatenate the clouds (indices offset per pair)."""
    src_sizes = torch.tensor([len(s["src"]) for s in samples])
    tgt_sizes = torch.tensor([len(s["tgt"]) for s in samples])
    src_start = torch.cumsum(src_sizes, 0) - src_sizes
    tgt_start = torch.cumsum(tgt_sizes, 0) - tgt_sizes
    shift = torch.stack([src_start, tgt_start], dim=1).unsqueeze(1)
    return {
        "correspondences": torch.stack([s["correspondences"] for s in samples]) + shift,
        "src": torch.cat([s["src"] for s in samples]),
        "tgt": torch.cat([s["tgt"] for s in samples]),
        "src_features": torch.cat([s["src_features"] for s in samples]),
        "tgt_features": torch.cat([s["tgt_features"] for s in samples]),
        "src_offset": torch.cumsum(src_sizes, 0),
        "tgt_offset": torch.cumsum(tgt_sizes, 0),
        "transform": torch.stack([s["transform"] for s in samples]),
        "information": torch.stack([s["information"] for s in samples]),
        "name": [s["name"] for s in samples],
    }


def precompute_features(pairs: list[RegistrationPair], cache: FeatureCache) -> None:
    """Fill ``cache`` with every cloud's features, every pair's candidates and refined ground truth."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    dataset = RegistrationDataset(pairs, cache, num_correspondences=1)
    columns = (TextColumn("FPFH correspondences"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        for index in progress.track(range(len(dataset))):
            dataset.prepared(index)


def aligned_suffix(source: Path) -> str:
    """The aligned cloud keeps a ``.ply`` / ``.pcd`` source's format; other inputs become ``.ply``."""
    return ".pcd" if source.suffix.lower() == ".pcd" else ".ply"


# -- the datamodule -----------------------------------------------------------------------------


class RegistrationDataModule(BaseDataModule, ABC):
    """Shared arguments of the registration datamodules, and ``predict`` on two cloud files.

    Args:
        voxel_size: FPFH down-sampling voxel in data units (0.05 m for 3DMatch, 0.30 m for KITTI).
        num_correspondences: K per training pair (1000 in the paper).
        eval_num_correspondences: K per validation / test / predict pair (the paper uses all
            mutual matches, 5000 on 3DLoMatch; the N x N maps make this the memory knob).
        feature_cache: folder for cached keypoints, features and candidates (default
            ``<cache dir>/registration_features``; ``$GLOCAL_CACHE`` moves the cache dir).
        augment_rotation_degrees / augment_translation / augment_jitter / augment_swap: training
            augmentation (``Augmentation``).
        predict_source / predict_target: the two clouds (``.ply`` / ``.pcd`` / ``.npz`` / ``.bin``)
            that ``predict`` registers; it writes ``<source>_to_<target>.txt`` (the 4 x 4
            transform) and ``<source>_to_<target>.ply`` (the source cloud moved onto the target;
            ``.pcd`` for a ``.pcd`` source) into ``predict_output_dir``.
        **kwargs: ``BaseDataModule`` arguments (root, batch sizes, workers, predict_output_dir).
    """

    def __init__(
        self,
        voxel_size: float = 0.05,
        num_correspondences: int = 1000,
        eval_num_correspondences: int = 5000,
        feature_cache: Optional[str] = None,
        augment_rotation_degrees: float = 180.0,
        augment_translation: float = 0.5,
        augment_jitter: float = 0.005,
        augment_swap: bool = True,
        predict_source: Optional[str] = None,
        predict_target: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.fpfh = FPFHParams(voxel_size=voxel_size)
        self.num_correspondences = num_correspondences
        self.eval_num_correspondences = eval_num_correspondences
        self.feature_cache = feature_cache
        self.augmentation = Augmentation(augment_rotation_degrees, augment_translation, augment_jitter, augment_swap)
        self.predict_source, self.predict_target = predict_source, predict_target
        self._predict_pairs: dict[str, RegistrationPair] = {}

    collate_fn = staticmethod(collate_pairs)

    def cache(self) -> FeatureCache:
        folder = Path(self.feature_cache) if self.feature_cache else cache_root() / "registration_features"
        return FeatureCache(folder, self.fpfh)

    @abstractmethod
    def split_pairs(self, split: str) -> list[RegistrationPair]:
        """The pairs of ``train``, ``val`` or ``test``; each format implements it."""

    def prepare_data(self) -> None:
        """Write the built-in set if needed, then compute (once, with a progress bar) the features
        and candidates of every pair the coming stage reads, so that loader workers and DDP
        ranks only ever read the cache."""
        super().prepare_data()
        trainer = getattr(self, "trainer", None)
        stage = trainer.state.fn.value if trainer is not None and trainer.state.fn is not None else None
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        pairs = [pair for split in splits for pair in self.split_pairs(split)]
        if pairs:
            precompute_features(pairs, self.cache())

    def setup(self, stage: str) -> None:
        if stage == "predict":
            self._setup_predict()
            return
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}[stage]
        for split in splits:
            pairs = self.split_pairs(split)
            training = split == "train"
            self.datasets[split] = RegistrationDataset(
                pairs,
                self.cache(),
                self.num_correspondences if training else self.eval_num_correspondences,
                self.augmentation if training else None,
            )

    def _setup_predict(self) -> None:
        if self.predict_source is None or self.predict_target is None:
            raise DatasetNotFoundError(
                "--data.predict_source/--data.predict_target", "predict needs the two point clouds to register"
            )
        source, target = Path(self.predict_source), Path(self.predict_target)
        for path in (source, target):
            read_point_cloud(path)  # fail now, with the file's name, not inside the loader
        name = f"{source.stem}_to_{target.stem}"
        self.prediction_paths([f"{name}.txt", f"{name}{aligned_suffix(source)}"])  # refuse before computing anything
        pair = RegistrationPair(name, source, target)
        self._predict_pairs = {name: pair}
        self.datasets["predict"] = RegistrationDataset([pair], FeatureCache(None, self.fpfh), self.eval_num_correspondences)
        self.dataset_name = name

    def write_prediction(self, prediction: dict, names: list[str]) -> None:
        """``<name>.txt``: the 4 x 4 transform; ``<name>.ply`` (``.pcd`` for a ``.pcd`` source): the
        full source cloud, colours and normals kept, moved by it."""
        for transform, name in zip(prediction["transform"], names):
            matrix = transform.detach().double().cpu().numpy()
            source = self._predict_pairs[name].source
            text_path, cloud_path = self.prediction_paths([f"{name}.txt", f"{name}{aligned_suffix(source)}"])
            write_atomically(text_path, lambda tmp: np.savetxt(tmp, matrix, fmt="%.9f"))
            if source.suffix.lower() in (".ply", ".pcd"):
                cloud = o3d.io.read_point_cloud(str(source))
            else:
                cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(read_point_cloud(source)))
            cloud.transform(matrix)

            def write_cloud(tmp: Path) -> None:
                if not o3d.io.write_point_cloud(str(tmp), cloud):
                    raise UnreadableFileError(cloud_path, "open3d could not write the aligned cloud")

            write_atomically(cloud_path, write_cloud)
