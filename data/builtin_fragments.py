"""Built-in registration set: procedural rooms scanned by a simulated depth camera, in 3DMatch layout.

Like 3DMatch, each fragment is a few depth frames fused in the frame of its first camera, and
pairs are fragments of the same scene that overlap. Generation, per scene (seeded):

1. **Room**: a box of 4-7 m x 3.5-6 m x 2.5-3 m (units are metres, as 3DMatch's) with wall
   fixtures (door frames, pictures, shelves, radiators), 8-14 pieces of furniture (tables with
   legs, chairs, cabinets, sofas, beds, bins, pillars, lamps) at random places and headings, and
   25-45 small objects (boxes, bottles, balls) on the floor and on the furniture: without clutter
   FPFH sees mostly planes and almost no correspondence is right.
2. **Scanning**: a camera walks a loop around the middle of the room at 1.2-1.7 m, looking 15-30
   degrees down. Fragment ``k`` turns by about 45 degrees from fragment ``k - 1`` and fuses three
   frames 15 degrees apart (a 60 x 45 degree pinhole camera, 128 x 96 pixels by default). Depths come from
   open3d ray casting, with the Kinect depth noise model of Nguyen et al. (3DIMPVT 2012),
   ``sigma(z) = 0.0012 + 0.0019 (z - 0.4)^2`` metres along each ray, plus 0.5 % of pixels
   replaced by flying points at a random depth (mixed pixels at edges). Each fragment is
   stored at 1.5 cm resolution, in its first camera's frame (x right, y down, z forward).
3. **Pairs**: overlap is the mean, over both directions, of the fraction of 5 cm keypoints with
   a counterpart closer than 7.5 cm once aligned. Pairs above 30 % go to the scene's ``gt.log``
   (3DMatch's criterion), pairs between 10 and 30 % to ``3DLoMatch/<scene>/gt.log`` (3DLoMatch's
   range). ``gt.info`` holds the 3DMatch information matrix of every pair (translation first, as
   the benchmark's error formula expects).

Layout (read back by ``data.threedmatch``): ``{train,val,test}/<scene>/cloud_bin_<i>.ply``, the
scene's ``gt.log`` and ``gt.info`` beside them, and ``{split}/3DLoMatch/<scene>/gt.{log,info}``.
Test scenes are generated from seeds never used for training. The success thresholds of
3DMatch apply unchanged (15 degrees, 30 cm), since the rooms are at real scale.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import open3d as o3d
from scipy.spatial import cKDTree

from data.base import build_once
from data.threedmatch import write_gt_info, write_gt_log

GENERATOR_VERSION = 1
IMAGE_WIDTH = 128  # pixels; height is 3/4 of it
FIELD_OF_VIEW = (60.0, 45.0)  # degrees, horizontal and vertical
FRAMES_PER_FRAGMENT = 3
FRAME_TURN = 15.0  # degrees between frames of a fragment
FRAGMENT_TURN = (38.0, 52.0)  # degrees between consecutive fragments
STORE_VOXEL = 0.015
OVERLAP_VOXEL, OVERLAP_RADIUS = 0.05, 0.075
FLYING_PIXELS = 0.005


# -- 1. rooms ------------------------------------------------------------------------------------


def _box(size, centre, yaw: float = 0.0) -> o3d.geometry.TriangleMesh:
    mesh = o3d.geometry.TriangleMesh.create_box(*size)
    mesh.translate(-np.asarray(size) / 2)
    mesh.rotate(o3d.geometry.get_rotation_matrix_from_xyz((0.0, 0.0, yaw)), center=(0, 0, 0))
    return mesh.translate(centre)


def _cylinder(radius: float, height: float, centre) -> o3d.geometry.TriangleMesh:
    return o3d.geometry.TriangleMesh.create_cylinder(radius, height, resolution=24).translate(centre)


def _furniture(kind: str, rng: np.random.Generator) -> list[o3d.geometry.TriangleMesh]:
    """One piece of furniture at the origin (standing on z = 0), heading along x."""
    u = rng.uniform
    if kind == "table":
        w, d, h = u(0.8, 1.6), u(0.6, 1.0), u(0.7, 0.78)
        parts = [_box((w, d, 0.04), (0, 0, h - 0.02))]
        for sx in (-1, 1):
            for sy in (-1, 1):
                parts.append(_box((0.05, 0.05, h - 0.04), (sx * (w / 2 - 0.06), sy * (d / 2 - 0.06), (h - 0.04) / 2)))
        return parts
    if kind == "chair":
        s, h = u(0.4, 0.5), u(0.42, 0.48)
        parts = [_box((s, s, 0.04), (0, 0, h)), _box((0.04, s, u(0.4, 0.5)), (-s / 2, 0, h + 0.25))]
        for sx in (-1, 1):
            for sy in (-1, 1):
                parts.append(_box((0.04, 0.04, h), (sx * (s / 2 - 0.03), sy * (s / 2 - 0.03), h / 2)))
        return parts
    if kind == "cabinet":
        w, d, h = u(0.5, 1.2), u(0.35, 0.6), u(0.8, 2.0)
        parts = [_box((w, d, h), (0, 0, h / 2))]
        for level in range(1, int(h / 0.45) + 1):  # drawer fronts / handles break the flat face
            parts.append(_box((0.02, w * 0.8, 0.03), (d / 2 + 0.01, 0, min(level * 0.45, h - 0.05))))
        return [p.rotate(o3d.geometry.get_rotation_matrix_from_xyz((0, 0, math.pi / 2)), center=(0, 0, 0)) for p in parts]
    if kind == "sofa":
        w, d = u(1.6, 2.4), u(0.8, 1.0)
        return [
            _box((w, d, 0.45), (0, 0, 0.225)),
            _box((w, 0.2, 0.45), (0, d / 2 - 0.1, 0.675)),
            _box((0.2, d, 0.25), (-w / 2 + 0.1, 0, 0.575)),
            _box((0.2, d, 0.25), (w / 2 - 0.1, 0, 0.575)),
        ]
    if kind == "bed":
        w, d = u(1.9, 2.1), u(0.9, 1.6)
        return [_box((w, d, 0.5), (0, 0, 0.25)), _box((0.08, d, 1.0), (-w / 2, 0, 0.5)), _box((0.5, d * 0.8, 0.12), (-w / 2 + 0.35, 0, 0.56))]
    if kind == "bin":
        r, h = u(0.12, 0.25), u(0.3, 0.7)
        return [_cylinder(r, h, (0, 0, h / 2))]
    if kind == "pillar":
        r = u(0.15, 0.3)
        return [_cylinder(r, 2.4, (0, 0, 1.2))]
    if kind == "lamp":
        h = u(1.3, 1.8)
        return [_cylinder(0.02, h, (0, 0, h / 2)), _cylinder(0.15, 0.04, (0, 0, 0.02)), o3d.geometry.TriangleMesh.create_sphere(u(0.12, 0.2)).translate((0, 0, h))]
    raise ValueError(kind)


FURNITURE = ("table", "chair", "cabinet", "sofa", "bed", "bin", "pillar", "lamp")


def _clutter(rng: np.random.Generator, half_x: float, half_y: float, parts: list) -> o3d.geometry.TriangleMesh:
    """A small object resting on the floor or on top of an earlier part (a table, a cabinet, ...)."""
    u = rng.uniform
    kind = rng.choice(["box", "box", "cylinder", "sphere"])
    if kind == "box":
        size = (u(0.08, 0.5), u(0.08, 0.5), u(0.05, 0.45))
        mesh, height = o3d.geometry.TriangleMesh.create_box(*size).translate((-size[0] / 2, -size[1] / 2, 0)), size[2]
    elif kind == "cylinder":
        radius, height = u(0.03, 0.18), u(0.08, 0.5)
        mesh = o3d.geometry.TriangleMesh.create_cylinder(radius, height, resolution=16).translate((0, 0, height / 2))
    else:
        radius = u(0.06, 0.2)
        mesh, height = o3d.geometry.TriangleMesh.create_sphere(radius, resolution=10).translate((0, 0, radius)), 2 * radius
    tilt = (u(-0.15, 0.15), u(-0.15, 0.15), u(0, 2 * math.pi))
    mesh.rotate(o3d.geometry.get_rotation_matrix_from_xyz(tilt), center=(0, 0, 0))
    base = (u(-half_x + 0.2, half_x - 0.2), u(-half_y + 0.2, half_y - 0.2), 0.0)
    if len(parts) > 1 and rng.random() < 0.5:  # on top of a piece of furniture (not the room itself)
        support = parts[1 + rng.integers(len(parts) - 1)]
        low, high = support.get_min_bound(), support.get_max_bound()
        if high[2] < 2.2 and (high[:2] - low[:2]).min() > 0.1:
            base = (u(low[0], high[0]), u(low[1], high[1]), high[2])
    return mesh.translate(base)


def make_room(rng: np.random.Generator) -> tuple[o3d.geometry.TriangleMesh, np.ndarray]:
    """A furnished room mesh and its half-extents (x, y) and height."""
    half_x, half_y, height = rng.uniform(2.0, 3.5), rng.uniform(1.75, 3.0), rng.uniform(2.5, 3.0)
    room = _box((2 * half_x, 2 * half_y, height), (0, 0, height / 2))
    parts = [room]
    for _ in range(rng.integers(3, 7)):  # fixtures on the walls
        wall = rng.integers(4)
        along = rng.uniform(-0.8, 0.8)
        kind = rng.choice(["picture", "shelf", "door", "radiator"])
        size = {"picture": (0.03, rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.8)), "shelf": (0.25, rng.uniform(0.6, 1.2), 0.03),
                "door": (0.06, 0.95, 2.05), "radiator": (0.1, rng.uniform(0.6, 1.2), 0.6)}[kind]  # fmt: skip
        z = {"picture": rng.uniform(1.2, 1.8), "shelf": rng.uniform(1.0, 2.0), "door": 1.025, "radiator": 0.45}[kind]
        if wall < 2:
            x = (1 if wall == 0 else -1) * (half_x - size[0] / 2)
            parts.append(_box(size, (x, along * half_y, z)))
        else:
            y = (1 if wall == 2 else -1) * (half_y - size[0] / 2)
            parts.append(_box(size, (along * half_x, y, z), yaw=math.pi / 2))
    for _ in range(rng.integers(8, 15)):
        kind = FURNITURE[rng.integers(len(FURNITURE))]
        yaw = rng.uniform(0, 2 * math.pi)
        position = (rng.uniform(-half_x + 0.5, half_x - 0.5), rng.uniform(-half_y + 0.5, half_y - 0.5), 0.0)
        rotation = o3d.geometry.get_rotation_matrix_from_xyz((0, 0, yaw))
        for part in _furniture(kind, rng):
            parts.append(part.rotate(rotation, center=(0, 0, 0)).translate(position))
    for _ in range(rng.integers(25, 45)):  # clutter: boxes, books, bottles, balls on the floor and on furniture
        parts.append(_clutter(rng, half_x, half_y, parts))
    mesh = o3d.geometry.TriangleMesh()
    for part in parts:
        mesh += part
    return mesh, np.array([half_x, half_y, height])


# -- 2. scanning ---------------------------------------------------------------------------------


def camera_pose(position: np.ndarray, yaw_degrees: float, pitch_degrees: float) -> np.ndarray:
    """Camera-to-world (4 x 4) for a camera with x right, y down, z forward."""
    yaw, pitch = math.radians(yaw_degrees), math.radians(pitch_degrees)
    forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)])
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = position
    return pose


def depth_frame(scene: o3d.t.geometry.RaycastingScene, pose: np.ndarray, rng: np.random.Generator, width: int) -> np.ndarray:
    """One noisy depth frame (``width`` x ``3/4 width`` pixels) as points (M, 3) in the camera's frame."""
    height = width * 3 // 4
    fx = (width / 2) / math.tan(math.radians(FIELD_OF_VIEW[0] / 2))
    fy = (height / 2) / math.tan(math.radians(FIELD_OF_VIEW[1] / 2))
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    directions = np.stack([(u - width / 2) / fx, (v - height / 2) / fy, np.ones_like(u)], axis=-1).reshape(-1, 3)
    world = directions @ pose[:3, :3].T
    rays = np.concatenate([np.broadcast_to(pose[:3, 3], world.shape), world], axis=1).astype(np.float32)
    depth = scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy().astype(np.float64)  # direction has z = 1
    valid = np.isfinite(depth) & (depth > 0.3) & (depth < 6.0)
    directions, depth = directions[valid], depth[valid]
    depth = depth + rng.normal(size=depth.shape) * (0.0012 + 0.0019 * (depth - 0.4) ** 2)
    flying = rng.random(len(depth)) < FLYING_PIXELS
    depth[flying] = rng.uniform(0.4, depth[flying].clip(min=0.5))
    return directions * depth[:, None]


def _downsample(points: np.ndarray, voxel: float) -> o3d.geometry.PointCloud:
    return o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points)).voxel_down_sample(voxel)


def scan_scene(rng: np.random.Generator, fragments: int, width: int = IMAGE_WIDTH) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fragments (points in their first camera's frame) and their camera-to-world poses.

    A fragment whose first camera stands inside a piece of furniture (it would see nothing) is
    re-placed, up to 20 times.
    """
    mesh, (half_x, half_y, _) = make_room(rng)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(mesh))
    yaw = rng.uniform(0, 360)
    clouds, poses = [], []
    pixels = width * (width * 3 // 4)
    for k in range(fragments):
        for _attempt in range(20):
            angle = 2 * math.pi * k / fragments + rng.uniform(-0.2, 0.2)
            radius = rng.uniform(0.2, 0.5)
            position = np.array([radius * half_x * math.cos(angle), radius * half_y * math.sin(angle), rng.uniform(1.2, 1.7)])
            pitch = -rng.uniform(15, 30)
            frames = []
            first = camera_pose(position, yaw - FRAME_TURN, pitch)
            for f in range(FRAMES_PER_FRAGMENT):
                step = position + rng.normal(scale=0.05, size=3)
                pose = camera_pose(step, yaw + (f - 1) * FRAME_TURN, pitch + rng.normal(scale=2.0))
                points = depth_frame(scene, pose, rng, width)
                to_first = np.linalg.inv(first) @ pose
                frames.append(points @ to_first[:3, :3].T + to_first[:3, 3])
            if min(len(f) for f in frames) > pixels // 2:
                break
        cloud = _downsample(np.concatenate(frames), STORE_VOXEL)
        clouds.append(np.asarray(cloud.points))
        poses.append(first)
        yaw += rng.uniform(*FRAGMENT_TURN)
    return clouds, poses


# -- 3. pairs ------------------------------------------------------------------------------------


def _information(points_j: np.ndarray) -> np.ndarray:
    """3DMatch's 6 x 6 information matrix ``sum_p A_p^T A_p``, ``A_p = [I | -2 [p]_x]``, from the
    overlapping points (in fragment j's frame): ``e^T I e / I[0, 0]`` is then the mean squared
    displacement of those points under a small residual motion ``e = (t, q_xyz)``."""
    x, y, z = points_j.T
    zero, one = np.zeros_like(x), np.ones_like(x)
    a = np.stack(
        [
            np.stack([one, zero, zero, zero, 2 * z, -2 * y], -1),
            np.stack([zero, one, zero, -2 * z, zero, 2 * x], -1),
            np.stack([zero, zero, one, 2 * y, -2 * x, zero], -1),
        ],
        axis=1,
    )  # (M, 3, 6)
    return np.einsum("mki,mkj->ij", a, a)


def pair_overlaps(clouds: list[np.ndarray], poses: list[np.ndarray]):
    """Yield ``(i, j, overlap, gt.log matrix, information)`` for every pair i < j."""
    world = []
    for points, pose in zip(clouds, poses):
        down = np.asarray(_downsample(points, OVERLAP_VOXEL).points)
        world.append(down @ pose[:3, :3].T + pose[:3, 3])
    trees = [cKDTree(w) for w in world]

    def near(a: int, b: int) -> np.ndarray:
        """Which points of ``a`` have a point of ``b`` within the overlap radius."""
        distance, _ = trees[b].query(world[a], distance_upper_bound=OVERLAP_RADIUS)
        return np.isfinite(distance)

    for i in range(len(clouds)):
        for j in range(i + 1, len(clouds)):
            in_j, in_i = near(j, i), near(i, j)
            overlap = 0.5 * (in_j.mean() + in_i.mean())
            log_matrix = np.linalg.inv(poses[i]) @ poses[j]  # fragment j into fragment i's frame
            overlapping_j = (world[j][in_j] - poses[j][:3, 3]) @ poses[j][:3, :3]  # back in j's frame
            yield i, j, overlap, log_matrix, _information(overlapping_j)


def write_scene(folder: Path, name: str, clouds: list[np.ndarray], poses: list[np.ndarray]) -> None:
    scene_dir = folder / name
    scene_dir.mkdir(parents=True, exist_ok=True)
    for index, points in enumerate(clouds):
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
        o3d.io.write_point_cloud(str(scene_dir / f"cloud_bin_{index}.ply"), cloud, write_ascii=False)
    high, low, high_info, low_info = {}, {}, {}, {}
    for i, j, overlap, matrix, info in pair_overlaps(clouds, poses):
        if overlap > 0.30:
            high[(i, j)], high_info[(i, j)] = matrix, info
        elif overlap >= 0.10:
            low[(i, j)], low_info[(i, j)] = matrix, info
    write_gt_log(scene_dir / "gt.log", high, len(clouds))
    write_gt_info(scene_dir / "gt.info", high_info, len(clouds))
    lo_dir = folder / "3DLoMatch" / name
    lo_dir.mkdir(parents=True, exist_ok=True)
    write_gt_log(lo_dir / "gt.log", low, len(clouds))
    write_gt_info(lo_dir / "gt.info", low_info, len(clouds))


SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000}


def write_builtin_fragments(
    root: Path, train_scenes: int, val_scenes: int, test_scenes: int, fragments_per_scene: int, width: int = IMAGE_WIDTH
) -> None:
    """Write every split (see the module docstring); scene ``s`` of a split uses seed ``SPLIT_SEEDS[split] + s``."""
    for split, count in (("train", train_scenes), ("val", val_scenes), ("test", test_scenes)):
        for s in range(count):
            rng = np.random.default_rng(SPLIT_SEEDS[split] + s)
            clouds, poses = scan_scene(rng, fragments_per_scene, width)
            write_scene(root / split, f"room-{split}-{s:02d}", clouds, poses)


def build_builtin_fragments(
    train_scenes: int = 16, val_scenes: int = 2, test_scenes: int = 4, fragments_per_scene: int = 8, width: int = IMAGE_WIDTH
) -> Path:
    """Generate the built-in set once under the cache folder and return its root."""
    params = dict(
        version=GENERATOR_VERSION,
        train_scenes=train_scenes,
        val_scenes=val_scenes,
        test_scenes=test_scenes,
        fragments_per_scene=fragments_per_scene,
        width=width,
    )
    return build_once(
        "registration_builtin",
        params,
        lambda root: write_builtin_fragments(root, train_scenes, val_scenes, test_scenes, fragments_per_scene, width),
    )
