"""Registration data: reading clouds, FPFH correspondences and their cache, batches, and every loader."""

import numpy as np
import open3d as o3d
import pytest
import torch
from scipy.spatial.transform import Rotation

from data.correspondences import FeatureCache, FPFHParams, _mutual_nearest, match_features, select_correspondences
from data.errors import BadPointCloudError, DatasetNotFoundError, InvalidValueError, MissingPairError, UnreadableFileError
from data.kitti_odometry import KittiOdometryDataModule, select_pairs
from data.registration import Augmentation, RegistrationDataset, RegistrationPair, collate_pairs, read_point_cloud, rigid_motion_problem
from data.registration_pairs import RegistrationPairsDataModule, read_pair_list
from data.threedmatch import ThreeDMatchDataModule, benchmark_pairs, read_gt_log, write_gt_info, write_gt_log


def room_points(seed: int, count: int = 6000) -> np.ndarray:
    """Points on a floor, two walls and a few boxes: enough structure for FPFH to match."""
    rng = np.random.default_rng(seed)
    parts = [
        np.c_[rng.uniform(0, 3, count // 4), rng.uniform(0, 3, count // 4), np.zeros(count // 4)],
        np.c_[np.zeros(count // 8), rng.uniform(0, 3, count // 8), rng.uniform(0, 2, count // 8)],
        np.c_[rng.uniform(0, 3, count // 8), np.zeros(count // 8), rng.uniform(0, 2, count // 8)],
    ]
    box_rng = np.random.default_rng(0)  # the same boxes in every fragment of the room
    for _ in range(6):
        low, size = box_rng.uniform(0.2, 2.2, 3) * [1, 1, 0], box_rng.uniform(0.2, 0.6, 3)
        faces = rng.uniform(0, 1, (count // 12, 3))
        axis = rng.integers(0, 3, len(faces))
        faces[np.arange(len(faces)), axis] = rng.integers(0, 2, len(faces))
        parts.append(low + faces * size)
    return np.concatenate(parts)


def write_ply(path, points: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert o3d.io.write_point_cloud(str(path), o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points)))


def random_motion(seed: int) -> np.ndarray:
    motion = np.eye(4)
    motion[:3, :3] = Rotation.random(random_state=seed).as_matrix()
    motion[:3, 3] = np.random.default_rng(seed).uniform(-1, 1, 3)
    return motion


def moved(points: np.ndarray, motion: np.ndarray) -> np.ndarray:
    return points @ motion[:3, :3].T + motion[:3, 3]


def write_benchmark_scene(folder, scene="scene-a", fragments=3, arrangement="side_by_side", with_info=True):
    """Fragments of one room, each in its own frame; gt.log/gt.info in one of the published arrangements."""
    room = room_points(1)
    poses = [random_motion(10 + i) for i in range(fragments)]  # fragment frame -> room frame
    fragments_dir = folder / ("fragments" if arrangement == "pointdsc" else "") / scene
    for i, pose in enumerate(poses):
        keep = np.random.default_rng(i).random(len(room)) < 0.8
        write_ply(fragments_dir / f"cloud_bin_{i}.ply", moved(room[keep], np.linalg.inv(pose)))
    log = {(i, j): np.linalg.inv(poses[i]) @ poses[j] for i in range(fragments) for j in range(i + 1, fragments)}
    gt_dir = {"side_by_side": fragments_dir, "website": folder / f"{scene}-evaluation",
              "pointdsc": folder / "gt_result" / f"{scene}-evaluation"}[arrangement]  # fmt: skip
    gt_dir.mkdir(parents=True, exist_ok=True)
    write_gt_log(gt_dir / "gt.log", log, fragments)
    if with_info:
        write_gt_info(gt_dir / "gt.info", {key: np.eye(6) * (k + 1) for k, key in enumerate(log)}, fragments)
    return poses


# -- reading clouds ----------------------------------------------------------------------------


def test_an_empty_cloud_raises_an_error_naming_the_file(tmp_path):
    path = tmp_path / "empty.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\nproperty float z\nend_header\n")
    with pytest.raises(BadPointCloudError, match="empty.ply: holds no points"):
        read_point_cloud(path)


def test_a_cloud_with_nans_raises_an_error_naming_the_file(tmp_path):
    path = tmp_path / "holes.pcd"
    path.write_text(
        "VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 3\nHEIGHT 1\n"
        "VIEWPOINT 0 0 0 1 0 0 0\nPOINTS 3\nDATA ascii\n0 0 0\nnan nan nan\n1 1 1\n"
    )
    with pytest.raises(BadPointCloudError, match=r"holes.pcd: 1 of 3 points have NaN"):
        read_point_cloud(path)


def test_other_cloud_formats_and_their_errors(tmp_path):
    points = np.random.default_rng(0).random((10, 3))
    np.c_[points, np.ones(10)].astype(np.float32).tofile(tmp_path / "scan.bin")
    assert np.allclose(read_point_cloud(tmp_path / "scan.bin"), points, atol=1e-6)
    np.savez(tmp_path / "fragment.npz", pcd=points)
    assert np.allclose(read_point_cloud(tmp_path / "fragment.npz"), points)
    np.savez(tmp_path / "wrong.npz", colours=points)
    with pytest.raises(UnreadableFileError, match="wrong.npz: has none of the keys"):
        read_point_cloud(tmp_path / "wrong.npz")
    np.zeros(5, dtype=np.float32).tofile(tmp_path / "short.bin")
    with pytest.raises(UnreadableFileError, match="short.bin"):
        read_point_cloud(tmp_path / "short.bin")
    with pytest.raises(DatasetNotFoundError, match="missing.ply"):
        read_point_cloud(tmp_path / "missing.ply")


# -- correspondences ---------------------------------------------------------------------------


def test_one_product_nearest_neighbours_match_brute_force_both_ways_with_ties_to_the_lowest_index():
    rng = np.random.default_rng(3)
    source = torch.nn.functional.normalize(torch.from_numpy(rng.random((70, 33), dtype=np.float32)), dim=1)
    target = torch.nn.functional.normalize(torch.from_numpy(rng.random((50, 33), dtype=np.float32)), dim=1)
    target[40] = target[10]  # a duplicate target row: a source row's tie goes to 10
    source[65] = source[5]  # and a duplicate source row, in another block: a target row's tie goes to 5
    source[0], target[0] = target[10], source[5]  # rows whose best match is one of the tied pair
    s2t, s2t_dist, t2s, t2s_dist = _mutual_nearest(source, target, chunk=16)
    similarity = source.double() @ target.double().T
    best_target = similarity.max(dim=1).values
    best_source = similarity.max(dim=0).values
    torch.testing.assert_close(similarity[torch.arange(70), s2t], best_target, atol=1e-6, rtol=0)
    torch.testing.assert_close(similarity[t2s, torch.arange(50)], best_source, atol=1e-6, rtol=0)
    torch.testing.assert_close(s2t_dist, (2 - 2 * best_target).clamp_min(0).sqrt(), atol=1e-3, rtol=0)
    torch.testing.assert_close(t2s_dist, (2 - 2 * best_source).clamp_min(0).sqrt(), atol=1e-3, rtol=0)
    assert s2t[0] == 10 and t2s[0] == 5
    assert 40 not in s2t.tolist() and 65 not in t2s.tolist()


def test_mutual_matches_come_first_and_selection_has_a_fixed_size():
    features = np.random.default_rng(0).random((20, 33)).astype(np.float32)
    candidates, mutual = match_features(features, features[::-1].copy())
    assert mutual == 20 and len(candidates) == 20  # every point is its own mutual match
    assert sorted(map(tuple, candidates)) == [(i, 19 - i) for i in range(20)]
    again, _ = match_features(features, features[::-1].copy())
    assert np.array_equal(candidates, again)  # deterministic
    assert select_correspondences(candidates, 8).shape == (8, 2)
    repeated = select_correspondences(candidates, 50)
    assert repeated.shape == (50, 2) and np.array_equal(repeated[20:40], candidates)
    sampled = select_correspondences(candidates, 8, np.random.default_rng(1))
    assert len({tuple(row) for row in sampled}) == 8


def test_feature_cache_writes_once_and_reads_back(tmp_path, monkeypatch):
    import data.correspondences as correspondences

    path = tmp_path / "room.ply"
    write_ply(path, room_points(0))
    calls = []
    original = correspondences.describe
    monkeypatch.setattr(correspondences, "describe", lambda *a: calls.append(1) or original(*a))
    first = FeatureCache(tmp_path / "cache", FPFHParams()).cloud(path, read_point_cloud)
    second = FeatureCache(tmp_path / "cache", FPFHParams()).cloud(path, read_point_cloud)  # a new process, say
    assert len(calls) == 1 and np.array_equal(first[1], second[1]) and first[1].shape[1] == 33
    assert not [p for p in (tmp_path / "cache").rglob(".*")]  # no temporary files left
    FeatureCache(tmp_path / "cache", FPFHParams(voxel_size=0.08)).cloud(path, read_point_cloud)
    assert len(calls) == 2  # other parameters, another entry


def test_samples_batch_into_k_correspondences_with_offsets_and_consistent_ground_truth(tmp_path):
    room = room_points(2)
    motion = random_motion(3)
    write_ply(tmp_path / "a.ply", room)
    write_ply(tmp_path / "b.ply", moved(room, motion))
    pairs = [RegistrationPair("ab", tmp_path / "a.ply", tmp_path / "b.ply", motion), RegistrationPair("ba", tmp_path / "b.ply", tmp_path / "a.ply", np.linalg.inv(motion))]
    cache = FeatureCache(None, FPFHParams())
    plain = RegistrationDataset(pairs, cache, 64)
    batch = collate_pairs([plain[0], plain[1]])
    assert batch["correspondences"].shape == (2, 64, 2) and batch["name"] == ["ab", "ba"]
    assert batch["src_offset"].tolist() == [len(plain[0]["src"]), len(plain[0]["src"]) + len(plain[1]["src"])]
    first = plain[0]
    assert torch.equal(batch["src"][batch["correspondences"][0, :, 0]], first["src"][first["correspondences"][:, 0]])
    second = plain[1]
    assert torch.equal(batch["tgt"][batch["correspondences"][1, :, 1]], second["tgt"][second["correspondences"][:, 1]])

    def residuals(sample):
        src = sample["src"][sample["correspondences"][:, 0]].double()
        tgt = sample["tgt"][sample["correspondences"][:, 1]].double()
        t = sample["transform"].double()
        return (src @ t[:3, :3].T + t[:3, 3] - tgt).norm(dim=-1)

    inliers = residuals(first) < 0.1
    assert inliers.float().mean() > 0.3  # identical clouds: FPFH finds many right matches
    augmented = RegistrationDataset(pairs, cache, 64, Augmentation(jitter=0.0))
    for seed in range(3):  # random motions and swaps keep the ground truth consistent with the points
        sample = augmented[(0, seed)]
        assert (residuals(sample) < 0.1).float().mean() == pytest.approx(inliers.float().mean().item(), abs=0.15)


def test_training_samples_are_drawn_from_their_key_seed_alone(tmp_path):
    room = room_points(4)
    motion = random_motion(6)
    write_ply(tmp_path / "a.ply", room)
    write_ply(tmp_path / "b.ply", moved(room, motion))
    pairs = [RegistrationPair("ab", tmp_path / "a.ply", tmp_path / "b.ply", motion)]
    augmented = RegistrationDataset(pairs, FeatureCache(None, FPFHParams()), 32, Augmentation())
    torch.manual_seed(0)
    np.random.seed(0)
    first = augmented[(0, 11)]
    torch.manual_seed(1)  # global random state plays no part
    np.random.seed(1)
    again, other = augmented[(0, 11)], augmented[(0, 12)]
    for key in ("correspondences", "src", "tgt", "transform"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["transform"], other["transform"])
    with pytest.raises(ValueError, match=r"\(index, seed\) keys"):
        augmented[0]


# -- 3DMatch / 3DLoMatch -----------------------------------------------------------------------


@pytest.mark.parametrize("arrangement", ["side_by_side", "website", "pointdsc"])
def test_3dmatch_benchmark_layouts_give_source_to_target_transforms(tmp_path, arrangement):
    poses = write_benchmark_scene(tmp_path, arrangement=arrangement)
    pairs = benchmark_pairs(tmp_path)
    assert [p.name for p in pairs] == ["scene-a/0_1", "scene-a/0_2", "scene-a/1_2"]
    for pair in pairs:
        i, j = (int(v) for v in pair.name.split("/")[1].split("_"))
        # source = cloud_bin_i, target = cloud_bin_j: the transform takes i's frame into j's
        assert np.allclose(pair.transform, np.linalg.inv(poses[j]) @ poses[i], atol=1e-9)
        assert (pair.information is not None) == (j > i + 1)  # the RMSE protocol skips consecutive pairs


def test_3dlomatch_reads_its_own_gt_log_for_the_same_fragments(tmp_path):
    write_benchmark_scene(tmp_path)
    lo = tmp_path / "3DLoMatch" / "scene-a"
    lo.mkdir(parents=True)
    write_gt_log(lo / "gt.log", {(0, 2): np.eye(4)}, 3)
    module = ThreeDMatchDataModule(root=str(tmp_path), benchmarks=["3DMatch", "3DLoMatch"])
    names = [p.name for p in module.split_pairs("test")]
    assert names == ["scene-a/0_1", "scene-a/0_2", "scene-a/1_2", "scene-a/0_2_lo"]


def test_a_gt_log_naming_a_missing_fragment_raises_an_error_naming_the_fragment(tmp_path):
    write_benchmark_scene(tmp_path)
    (tmp_path / "scene-a" / "cloud_bin_2.ply").unlink()
    with pytest.raises(MissingPairError, match=r"cloud_bin_2.ply: fragment named by .*gt.log \(pair 0 2\)"):
        benchmark_pairs(tmp_path)


def test_a_malformed_gt_log_names_the_file_and_line(tmp_path):
    write_benchmark_scene(tmp_path)
    log = tmp_path / "scene-a" / "gt.log"
    log.write_text(log.read_text().replace("0\t2\t3", "0\tx\t3"))
    with pytest.raises(UnreadableFileError, match=r"gt.log: line 6"):
        read_gt_log(log)


def test_rigid_motion_check_refuses_scalings_reflections_and_bad_last_rows():
    motion = random_motion(1)
    assert rigid_motion_problem(motion) is None
    rounded = np.round(motion, 5)  # ground-truth files print a handful of digits
    assert rigid_motion_problem(rounded) is None
    mirrored, scaled, projective = motion.copy(), motion.copy(), motion.copy()
    mirrored[:3, 2] *= -1
    scaled[:3, :3] *= 1.01
    projective[3, 0] = 0.1
    assert rigid_motion_problem(mirrored) == "rotation is a reflection"
    assert rigid_motion_problem(scaled) == "rotation not orthonormal"
    assert rigid_motion_problem(projective) == "last row not 0 0 0 1"


def test_fcgf_training_fragments_pair_lists_and_validation_scenes(tmp_path):
    folder = tmp_path / "threedmatch"
    folder.mkdir()
    room = room_points(4, 800)
    for scene in ("7-scenes-chess", "7-scenes-heads"):
        for k in range(2):
            np.savez(folder / f"{scene}@seq-01_00{k}.npz", pcd=room)
        (folder / f"{scene}@seq-01-0.30.txt").write_text(f"{scene}@seq-01_000.npz {scene}@seq-01_001.npz 0.9\n")
    module = ThreeDMatchDataModule(root=str(tmp_path))
    train, val = module.split_pairs("train"), module.split_pairs("val")
    assert [p.source.name for p in train] == ["7-scenes-chess@seq-01_000.npz"]  # heads is a validation scene
    assert [p.source.name for p in val] == ["7-scenes-heads@seq-01_000.npz"]
    assert np.array_equal(train[0].transform, np.eye(4))
    with pytest.raises(DatasetNotFoundError, match="has no val split"):
        ThreeDMatchDataModule(root=str(folder)).split_pairs("val")


# -- KITTI -------------------------------------------------------------------------------------


def test_kitti_pair_selection_follows_the_reference_walk():
    positions = np.c_[np.arange(30.0), np.zeros(30), np.zeros(30)]  # one metre per scan
    assert select_pairs(positions, list(range(30))) == [(0, 10), (11, 21)]


def test_kitti_layout_poses_and_calibration_give_velodyne_transforms(tmp_path):
    sequence = tmp_path / "sequences" / "08"
    (sequence / "velodyne").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for t in range(25):
        np.c_[rng.random((50, 3)), np.ones(50)].astype(np.float32).tofile(sequence / "velodyne" / f"{t:06d}.bin")
    poses = np.tile(np.eye(4), (25, 1, 1))
    poses[:, 2, 3] = np.arange(25) * 1.5  # the camera drives along its z axis
    (tmp_path / "poses").mkdir()
    np.savetxt(tmp_path / "poses" / "08.txt", poses[:, :3, :].reshape(25, 12))
    module = KittiOdometryDataModule(root=str(tmp_path), test_sequences=[8], icp_refinement=False)
    pairs = module.split_pairs("test")
    assert [p.name for p in pairs] == ["08/000000_000006", "08/000007_000013", "08/000014_000020"]
    from data.kitti_odometry import VELODYNE_TO_CAMERA as tr

    expected = np.linalg.inv(tr) @ np.linalg.inv(poses[6]) @ poses[0] @ tr
    assert np.allclose(pairs[0].transform, expected)
    assert pairs[0].transform[0, 3] == pytest.approx(-9.0, abs=0.1)  # 9 m forward = velodyne x
    (tmp_path / "poses" / "08.txt").write_text("1 2 3\n")
    with pytest.raises(UnreadableFileError, match="08.txt: expected 12 numbers"):
        module.split_pairs("test")


# -- lists of pairs ----------------------------------------------------------------------------


def test_pair_lists_read_relative_paths_and_refuse_bad_lines(tmp_path):
    write_ply(tmp_path / "clouds" / "a.ply", room_points(0, 400))
    write_ply(tmp_path / "clouds" / "b.ply", room_points(1, 400))
    motion = random_motion(5)
    numbers = " ".join(f"{v:.12g}" for v in motion.ravel())
    (tmp_path / "pairs.txt").write_text(f"# source target transform\nclouds/a.ply clouds/b.ply {numbers}\n")
    (tmp_path / "train.txt").write_text(f"clouds/a.ply clouds/b.ply {numbers}\n")
    module = RegistrationPairsDataModule(root=str(tmp_path))
    (pair,) = module.split_pairs("test")
    assert pair.name == "a_to_b" and np.allclose(pair.transform, motion) and pair.source == tmp_path / "clouds" / "a.ply"
    assert len(module.split_pairs("train")) == 1
    with pytest.raises(DatasetNotFoundError, match="val.txt: no val split"):
        module.split_pairs("val")
    bad = tmp_path / "bad.txt"
    bad.write_text(f"clouds/a.ply clouds/missing.ply {numbers}\n")
    with pytest.raises(MissingPairError, match=r"missing.ply: named by .*bad.txt line 1"):
        read_pair_list(bad)
    bad.write_text("clouds/a.ply clouds/b.ply 2 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1\n")
    with pytest.raises(InvalidValueError, match="bad.txt: line 1: the transform is not rigid"):
        read_pair_list(bad)
