"""3DMatch and 3DLoMatch: the benchmark layout (fragments + gt.log / gt.info) and the training fragments.

Benchmark layout (test, or any split laid out the same way); under a split folder, each scene's
fragments ``<scene>/cloud_bin_<i>.ply`` and its ``gt.log`` are found in any of the published
arrangements:

======================================================  ===========================================
fragments                                               ground truth (``gt.log``, ``gt.info``)
======================================================  ===========================================
``<scene>/cloud_bin_<i>.ply``                           ``<scene>/`` (files side by side)
``<scene>/cloud_bin_<i>.ply``                           ``<scene>-evaluation/`` (3DMatch website zips)
``fragments/<scene>/cloud_bin_<i>.ply``                 ``gt_result/<scene>-evaluation/`` (PointDSC)
======================================================  ===========================================

``gt.log`` holds blocks of five lines: ``i j n`` and a 4 x 4 matrix that takes fragment ``j``
into fragment ``i``'s frame; the pair's source is ``cloud_bin_i``, its target ``cloud_bin_j`` and
its transform the matrix's inverse (as PointDSC/VBReg read it). ``gt.info`` holds ``i j n`` and a
6 x 6 information matrix per pair, used by the RMSE protocol for non-consecutive pairs
(``j > i + 1``). **3DLoMatch** (Predator's low-overlap pairs, 10-30 % overlap) uses the same
fragments with its own ``gt.log`` per scene, read from ``3DLoMatch/<scene>/`` inside the split
folder (Predator's ``configs/benchmarks/3DLoMatch``) or from ``lomatch_gt_dir``.

Training fragments (FCGF's ``threedmatch.tgz``, which PointDSC and VBReg train on):
``threedmatch/<scene>@seq-XX_YYY.npz`` (key ``pcd``; every fragment of a scene in one common frame,
so the ground truth of a pair is the identity) and pair lists ``threedmatch/<scene>@seq-XX-0.30.txt``
(``src.npz tgt.npz overlap`` per line). The six validation scenes are the official split's.

A split folder ``train/``, ``val/`` or ``test/`` under ``root`` in benchmark layout takes
precedence (the built-in set is written that way); otherwise train and val come from
``threedmatch/`` and test from ``root`` itself. A gt.log that names a missing fragment stops the run
with the fragment's path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    InvalidValueError,
    LayoutError,
    MissingPairError,
    UnreadableFileError,
)
from data.registration import RegistrationDataModule, RegistrationPair, rigid_motion_problem

BENCHMARKS = ("3DMatch", "3DLoMatch")
#: PointDSC/VBReg ``misc/split/val_3dmatch.txt``
VALIDATION_SCENES = (
    "sun3d-brown_bm_4-brown_bm_4",
    "sun3d-harvard_c11-hv_c11_2",
    "7-scenes-heads",
    "rgbd-scenes-v2-scene_10",
    "bundlefusion-office0",
    "analysis-by-synthesis-apt2-kitchen",
)
FRAGMENT = re.compile(r"^cloud_bin_(\d+)\.ply$")


def _read_blocks(path: Path, rows: int, columns: int, rigid: bool = False) -> dict[tuple[int, int], np.ndarray]:
    """Parse a gt.log (4 x 4) or gt.info (6 x 6) file: ``i j n`` then ``rows`` lines of ``columns``
    (with ``rigid``, each matrix must be a rigid motion)."""
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if len(lines) % (rows + 1):
        raise UnreadableFileError(path, f"{len(lines)} non-empty lines is not a multiple of {rows + 1} (header + {rows} rows)")
    blocks = {}
    for start in range(0, len(lines), rows + 1):
        header, body = lines[start], lines[start + 1 : start + rows + 1]
        try:
            i, j = int(header[0]), int(header[1])
            matrix = np.array([[float(v) for v in row] for row in body])
        except (ValueError, IndexError):
            raise UnreadableFileError(path, f"line {start + 1}: expected 'i j n' and {rows} rows of {columns} numbers") from None
        if len(header) != 3 or matrix.shape != (rows, columns):
            raise UnreadableFileError(path, f"line {start + 1}: expected 'i j n' and {rows} rows of {columns} numbers")
        if not np.isfinite(matrix).all():  # a NaN transform would read as "ground truth unknown"
            raise InvalidValueError(path, f"line {start + 1}: the matrix of pair {i} {j} holds NaN or infinite values")
        reason = rigid_motion_problem(matrix) if rigid else None
        if reason:
            raise InvalidValueError(path, f"line {start + 1}: the matrix of pair {i} {j} is not rigid ({reason})")
        blocks[(i, j)] = matrix
    return blocks


def read_gt_log(path: Path) -> dict[tuple[int, int], np.ndarray]:
    """``{(i, j): T}`` with T (4 x 4) taking fragment j into fragment i's frame; a T that is not a
    rigid motion is an error (inverting a scaled or sheared matrix gives no ground truth)."""
    return _read_blocks(path, 4, 4, rigid=True)


def read_gt_info(path: Path) -> dict[tuple[int, int], np.ndarray]:
    """``{(i, j): information}`` (6 x 6) from a gt.info file."""
    return _read_blocks(path, 6, 6)


def _write_blocks(path: Path, matrices: dict[tuple[int, int], np.ndarray], fragments: int) -> None:
    lines = []
    for (i, j), matrix in sorted(matrices.items()):
        lines.append(f"{i}\t{j}\t{fragments}")
        lines += ["  ".join(f"{v:.12e}" for v in row) for row in matrix]
    path.write_text("\n".join(lines) + "\n")


def write_gt_log(path: Path, transforms: dict[tuple[int, int], np.ndarray], fragments: int) -> None:
    """Write ``{(i, j): T}`` (fragment j into fragment i's frame) in gt.log format."""
    _write_blocks(path, transforms, fragments)


def write_gt_info(path: Path, information: dict[tuple[int, int], np.ndarray], fragments: int) -> None:
    """Write ``{(i, j): 6 x 6 information}`` in gt.info format."""
    _write_blocks(path, information, fragments)


def _scene_folders(fragments_root: Path) -> list[Path]:
    return sorted(
        p for p in fragments_root.iterdir() if p.is_dir() and any(FRAGMENT.match(f.name) for f in p.iterdir())
    )


def benchmark_pairs(folder: Path, benchmark: str = "3DMatch", lomatch_gt_dir: Optional[Path] = None) -> list[RegistrationPair]:
    """Every pair listed by the scenes' gt.log files under ``folder`` (see the module docstring)."""
    if benchmark not in BENCHMARKS:
        raise LayoutError(folder, f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    fragments_root = folder / "fragments" if (folder / "fragments").is_dir() else folder
    scenes = _scene_folders(fragments_root)
    if not scenes:
        raise EmptyDatasetError(fragments_root, "holds no scene folders with cloud_bin_<i>.ply fragments")
    pairs = []
    for scene in scenes:
        if benchmark == "3DMatch":
            candidates = [scene, folder / f"{scene.name}-evaluation", folder / "gt_result" / f"{scene.name}-evaluation"]
        else:
            candidates = [folder / "3DLoMatch" / scene.name] + ([lomatch_gt_dir / scene.name] if lomatch_gt_dir else [])
        gt_dir = next((c for c in candidates if (c / "gt.log").is_file()), None)
        if gt_dir is None:
            raise DatasetNotFoundError(scene, f"no {benchmark} gt.log for this scene (looked in {', '.join(str(c) for c in candidates)})")
        log_path = gt_dir / "gt.log"
        transforms = read_gt_log(log_path)
        information = read_gt_info(gt_dir / "gt.info") if (gt_dir / "gt.info").is_file() else {}
        for (i, j), matrix in sorted(transforms.items()):
            source, target = scene / f"cloud_bin_{i}.ply", scene / f"cloud_bin_{j}.ply"
            for fragment in (source, target):
                if not fragment.is_file():
                    raise MissingPairError(fragment, f"fragment named by {log_path} (pair {i} {j}) does not exist")
            info = information.get((i, j)) if j > i + 1 else None
            name = f"{scene.name}/{i}_{j}" + ("" if benchmark == "3DMatch" else "_lo")
            pairs.append(RegistrationPair(name, source, target, np.linalg.inv(matrix), info))
    return pairs


def fcgf_training_pairs(folder: Path, scenes: Optional[set[str]], exclude: set[str], overlap: float) -> list[RegistrationPair]:
    """Pairs of FCGF's 3DMatch training fragments (``<scene>@seq-XX-<overlap>.txt`` lists)."""
    lists = sorted(folder.glob(f"*-{overlap:.2f}.txt"))
    if not lists:
        raise EmptyDatasetError(folder, f"holds no pair lists *-{overlap:.2f}.txt")
    pairs = []
    for pair_list in lists:
        scene = pair_list.name.split("@")[0]
        if (scenes is not None and scene not in scenes) or scene in exclude:
            continue
        for number, line in enumerate(pair_list.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise UnreadableFileError(pair_list, f"line {number}: expected 'source.npz target.npz overlap'")
            source, target = folder / fields[0], folder / fields[1]
            for fragment in (source, target):
                if not fragment.is_file():
                    raise MissingPairError(fragment, f"fragment named by {pair_list} line {number} does not exist")
            pairs.append(RegistrationPair(f"{source.stem}-{target.stem}", source, target, np.eye(4)))
    return pairs


class ThreeDMatchDataModule(RegistrationDataModule):
    """3DMatch / 3DLoMatch (benchmark layout and FCGF training fragments), or the built-in rooms.

    Args:
        benchmarks: which gt.log files list the pairs of a benchmark-layout validation or test
            split: ``3DMatch`` (overlap > 30 %), ``3DLoMatch`` (10-30 %) or both.
        train_benchmarks: the same for a benchmark-layout training split; the paper trains on
            pairs above 30 % overlap only (``3DMatch``) and tests that model on 3DLoMatch too.
        lomatch_gt_dir: folder of ``<scene>/gt.log`` for 3DLoMatch when not under ``3DLoMatch/``.
        train_overlap: which FCGF pair lists to train on (``*-0.30.txt``).
        val_scenes: FCGF scenes held out for validation (default: the official six).
        builtin_*: size of the built-in set (``data.builtin_fragments``): scenes per split,
            fragments per scene, and the simulated camera's width in pixels.
        **kwargs: ``RegistrationDataModule`` arguments (voxel, correspondences, augmentation, predict).
    """

    def __init__(
        self,
        benchmarks: list[str] = ["3DMatch"],  # noqa: B006  (LightningCLI needs a plain default)
        train_benchmarks: list[str] = ["3DMatch"],  # noqa: B006
        lomatch_gt_dir: Optional[str] = None,
        train_overlap: float = 0.30,
        val_scenes: Optional[list[str]] = None,
        builtin_train_scenes: int = 16,
        builtin_val_scenes: int = 2,
        builtin_test_scenes: int = 4,
        builtin_fragments_per_scene: int = 8,
        builtin_camera_width: int = 128,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for chosen in (benchmarks, train_benchmarks):
            if not chosen or any(b not in BENCHMARKS for b in chosen):
                raise ValueError(f"benchmarks must be a non-empty subset of {BENCHMARKS}, got {chosen}")
        self.benchmarks, self.train_benchmarks = list(benchmarks), list(train_benchmarks)
        self.lomatch_gt_dir = Path(lomatch_gt_dir) if lomatch_gt_dir else None
        self.train_overlap = train_overlap
        self.val_scenes = set(val_scenes) if val_scenes is not None else set(VALIDATION_SCENES)
        self.builtin_params = dict(
            train_scenes=builtin_train_scenes,
            val_scenes=builtin_val_scenes,
            test_scenes=builtin_test_scenes,
            fragments_per_scene=builtin_fragments_per_scene,
            width=builtin_camera_width,
        )

    def builtin_root(self) -> Path:
        from data.builtin_fragments import build_builtin_fragments

        return build_builtin_fragments(**self.builtin_params)

    def _benchmark_split(self, folder: Path, benchmarks: list[str]) -> list[RegistrationPair]:
        pairs = [p for b in benchmarks for p in benchmark_pairs(folder, b, self.lomatch_gt_dir)]
        if not pairs:
            raise EmptyDatasetError(folder, f"the {' and '.join(benchmarks)} gt.log files list no pairs")
        return pairs

    def split_pairs(self, split: str) -> list[RegistrationPair]:
        root = self.resolved_root()
        benchmark = "+".join(self.benchmarks)
        self.dataset_name = f"built-in rooms ({benchmark} layout)" if self.root is None else f"{benchmark}:{root.name}"
        if (root / split).is_dir():
            return self._benchmark_split(root / split, self.train_benchmarks if split == "train" else self.benchmarks)
        if split in ("train", "val") and (root / "threedmatch").is_dir():
            folder = root / "threedmatch"
            if split == "train":
                pairs = fcgf_training_pairs(folder, None, self.val_scenes, self.train_overlap)
            else:
                pairs = fcgf_training_pairs(folder, self.val_scenes, set(), self.train_overlap)
            if not pairs:
                raise EmptyDatasetError(folder, f"no {split} pairs (validation scenes: {', '.join(sorted(self.val_scenes))})")
            return pairs
        if split == "test":
            return self._benchmark_split(root, self.benchmarks)
        raise DatasetNotFoundError(root, f"has no {split} split: expected {split}/ in benchmark layout or threedmatch/ (FCGF training fragments)")
