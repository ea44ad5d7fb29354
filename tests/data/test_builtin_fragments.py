"""The built-in scanned rooms: 3DMatch layout, consistent ground truth, low-overlap pairs, determinism."""

import numpy as np
from scipy.spatial import cKDTree

from data.builtin_fragments import camera_pose, write_builtin_fragments
from data.registration import read_point_cloud
from data.threedmatch import benchmark_pairs, read_gt_info


def test_camera_pose_looks_along_z_with_y_down():
    pose = camera_pose(np.array([1.0, 2.0, 1.5]), yaw_degrees=90.0, pitch_degrees=0.0)
    assert np.allclose(pose[:3, 2], [0, 1, 0], atol=1e-12)  # forward = world +y
    assert np.allclose(pose[:3, 1], [0, 0, -1], atol=1e-12)  # image down = world down
    assert np.isclose(np.linalg.det(pose[:3, :3]), 1.0)


def test_builtin_rooms_are_written_in_3dmatch_layout_with_consistent_ground_truth(tmp_path):
    write_builtin_fragments(tmp_path, train_scenes=0, val_scenes=0, test_scenes=1, fragments_per_scene=5, width=48)
    scene = tmp_path / "test" / "room-test-00"
    assert sorted(p.name for p in scene.glob("*.ply")) == [f"cloud_bin_{i}.ply" for i in range(5)]
    high, low = benchmark_pairs(tmp_path / "test", "3DMatch"), benchmark_pairs(tmp_path / "test", "3DLoMatch")
    assert high and not {p.name for p in high} & {p.name.removesuffix("_lo") for p in low}
    info = read_gt_info(scene / "gt.info")
    for pair in high:
        source = read_point_cloud(pair.source)
        target = read_point_cloud(pair.target)
        aligned = source @ pair.transform[:3, :3].T + pair.transform[:3, 3]
        distance, _ = cKDTree(target).query(aligned, distance_upper_bound=0.075)
        assert np.isfinite(distance).mean() > 0.25  # high-overlap pairs do overlap under the ground truth
        i, j = (int(v) for v in pair.name.split("/")[1].split("_"))
        assert info[(i, j)][0, 0] > 0 and np.allclose(info[(i, j)], info[(i, j)].T)


def test_builtin_generation_is_deterministic(tmp_path):
    for folder in ("a", "b"):
        write_builtin_fragments(tmp_path / folder, train_scenes=1, val_scenes=0, test_scenes=0, fragments_per_scene=2, width=32)
    first = read_point_cloud(tmp_path / "a" / "train" / "room-train-00" / "cloud_bin_1.ply")
    second = read_point_cloud(tmp_path / "b" / "train" / "room-train-00" / "cloud_bin_1.ply")
    assert np.array_equal(first, second)
    assert (tmp_path / "a" / "train" / "room-train-00" / "gt.log").read_text() == (tmp_path / "b" / "train" / "room-train-00" / "gt.log").read_text()
