"""Point-cloud augmentations as a configurable list, applied to one scene at a time.

A scene is a dict of CPU tensors: ``coord`` (N, 3) float32, ``color`` (N, 3) float32 in [0, 1],
optionally ``normal`` (N, 3) and ``segment`` (N,) int64. A pipeline is written in a config as a
list of ``{name: ..., <arguments>}`` entries, e.g.

    train_transforms:
      - {name: center_shift, apply_z: true}
      - {name: random_rotate_z, angle: 1.0, p: 0.5}       # angle in units of pi
      - {name: random_scale, low: 0.8, high: 1.2}
      - {name: random_jitter, sigma: 0.005, clip: 0.02}
      - {name: random_color_drop, p: 0.2}
      - {name: grid_sample, voxel_size: 0.04}
      - {name: sphere_crop, max_points: 80000}
      - {name: shuffle}

which is ConDaFormer's S3DIS training pipeline (``DEFAULT_TRAIN``). Every transform draws from the
``torch.Generator`` it is called with, and nothing else: the dataset seeds that generator from
the sample's key (``data.sampling``), so a run, and a resumed run, sees the same augmentations
whatever the number of loader workers. Per-point arrays stay aligned: anything that drops or reorders points applies the
same index to every per-point key.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from backbones.ops.voxel_hash import grid_sample

Scene = dict[str, Any]
PER_POINT = ("coord", "color", "normal", "segment", "instance")


def _select(scene: Scene, index: torch.Tensor) -> Scene:
    return {k: (v[index] if k in PER_POINT and isinstance(v, torch.Tensor) else v) for k, v in scene.items()}


def _uniform(generator: torch.Generator, low: float, high: float, size=()) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


class CenterShift:
    """Move the cloud's bounding-box centre to the origin in x, y (and z to 0 at its floor when
    ``apply_z``): rotations then turn the scene about its middle."""

    def __init__(self, apply_z: bool = True):
        self.apply_z = apply_z

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        coord = scene["coord"]
        lo, hi = coord.min(0).values, coord.max(0).values
        shift = (lo + hi) / 2
        shift[2] = lo[2] if self.apply_z else 0.0
        return {**scene, "coord": coord - shift}


class RandomRotateZ:
    """Rotate about the vertical axis by an angle uniform in ``[-angle, angle] * pi`` (with
    probability ``p``); normals turn with the points."""

    def __init__(self, angle: float = 1.0, p: float = 0.5):
        self.angle, self.p = angle, p

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        if float(torch.rand((), generator=generator)) >= self.p:
            return scene
        theta = float(_uniform(generator, -self.angle, self.angle)) * math.pi
        return rotate_z(scene, theta)


def rotate_z(scene: Scene, theta: float) -> Scene:
    """``scene`` turned by ``theta`` radians about the vertical axis through the origin."""
    c, s = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    out = {**scene, "coord": scene["coord"] @ rotation.T}
    if "normal" in scene:
        out["normal"] = scene["normal"] @ rotation.T
    return out


class RandomScale:
    """Scale all coordinates by one factor uniform in [low, high]."""

    def __init__(self, low: float = 0.8, high: float = 1.2):
        self.low, self.high = low, high

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        return {**scene, "coord": scene["coord"] * float(_uniform(generator, self.low, self.high))}


class RandomFlip:
    """Mirror x and y independently, each with probability ``p`` (normals mirrored too)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        sign = torch.ones(3)
        for axis in (0, 1):
            if float(torch.rand((), generator=generator)) < self.p:
                sign[axis] = -1.0
        out = {**scene, "coord": scene["coord"] * sign}
        if "normal" in scene:
            out["normal"] = scene["normal"] * sign
        return out


class RandomJitter:
    """Gaussian noise of std ``sigma`` on every coordinate, clipped to ``[-clip, clip]``."""

    def __init__(self, sigma: float = 0.005, clip: float = 0.02):
        self.sigma, self.clip = sigma, clip

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        noise = (torch.randn(scene["coord"].shape, generator=generator) * self.sigma).clamp(-self.clip, self.clip)
        return {**scene, "coord": scene["coord"] + noise}


class ChromaticJitter:
    """Per-point colour noise of std ``std`` (colours in [0, 1]) with probability ``p``."""

    def __init__(self, std: float = 0.05, p: float = 0.95):
        self.std, self.p = std, p

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        if float(torch.rand((), generator=generator)) >= self.p:
            return scene
        noise = torch.randn(scene["color"].shape, generator=generator) * self.std
        return {**scene, "color": (scene["color"] + noise).clamp(0, 1)}


class ChromaticAutoContrast:
    """Stretch each channel to [0, 1], blended with the original by a random factor (prob. ``p``)."""

    def __init__(self, p: float = 0.2, blend: Optional[float] = None):
        self.p, self.blend = p, blend

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        if float(torch.rand((), generator=generator)) >= self.p:
            return scene
        color = scene["color"]
        lo, hi = color.min(0).values, color.max(0).values
        stretched = (color - lo) / (hi - lo).clamp_min(1e-6)
        blend = self.blend if self.blend is not None else float(torch.rand((), generator=generator))
        return {**scene, "color": (1 - blend) * color + blend * stretched}


class RandomColorDrop:
    """Set every colour to 0 with probability ``p``: the network must also work from geometry."""

    def __init__(self, p: float = 0.2):
        self.p = p

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        if float(torch.rand((), generator=generator)) >= self.p:
            return scene
        return {**scene, "color": torch.zeros_like(scene["color"])}


class ElasticDistortion:
    """Smooth random displacement fields (PointNet++/MinkowskiNet style): for each
    ``(granularity, magnitude)`` pair, Gaussian noise on a grid of that spacing, blurred by two
    passes of a 3-wide box filter along each axis, interpolated trilinearly at every point, times the
    magnitude (in metres). Applied with probability ``p``."""

    def __init__(self, params: Optional[list[list[float]]] = None, p: float = 0.95):
        self.params = params or [[0.2, 0.4], [0.8, 1.6]]
        self.p = p

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        if float(torch.rand((), generator=generator)) >= self.p:
            return scene
        coord = scene["coord"]
        for granularity, magnitude in self.params:
            lo = coord.min(0).values
            cells = ((coord.max(0).values - lo) / granularity).long() + 3
            noise = torch.randn((1, 3, *cells.tolist()), generator=generator)
            for _ in range(2):
                for axis in range(3):
                    shape, padding = [1, 1, 1], [0, 0, 0]
                    shape[axis], padding[axis] = 3, 1
                    noise = F.conv3d(noise, torch.ones(3, 1, *shape) / 3, padding=tuple(padding), groups=3)
            # grid_sample takes (x, y, z) in [-1, 1] over the last three axes in (W, H, D) order
            position = (coord - lo) / granularity + 1  # in cells, inside [1, cells - 2]
            normalised = 2 * position / (cells - 1).float() - 1
            grid = normalised.flip(-1).view(1, 1, 1, -1, 3)
            offset = F.grid_sample(noise, grid, mode="bilinear", align_corners=True).view(3, -1).T
            coord = coord + offset * magnitude
        return {**scene, "coord": coord}


class GridSample:
    """Keep one random point per voxel of side ``voxel_size`` (the training voxelization)."""

    def __init__(self, voxel_size: float = 0.04):
        self.voxel_size = voxel_size

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        batch = torch.zeros(len(scene["coord"]), dtype=torch.long)
        kept, _ = grid_sample(scene["coord"], batch, self.voxel_size, generator=generator, num_clouds=1)
        return _select(scene, kept)


class SphereCrop:
    """At most ``max_points``: the nearest to a random point of the cloud (training crops)."""

    def __init__(self, max_points: int = 80000):
        self.max_points = max_points

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        coord = scene["coord"]
        if len(coord) <= self.max_points:
            return scene
        centre = coord[int(torch.randint(len(coord), (), generator=generator))]
        nearest = torch.topk((coord - centre).square().sum(1), self.max_points, largest=False).indices
        return _select(scene, nearest.sort().values)


class RandomDropout:
    """Drop a fraction ``ratio`` of the points with probability ``p``."""

    def __init__(self, ratio: float = 0.2, p: float = 0.2):
        self.ratio, self.p = ratio, p

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        if float(torch.rand((), generator=generator)) >= self.p:
            return scene
        n = len(scene["coord"])
        keep = torch.randperm(n, generator=generator)[: max(1, int(n * (1 - self.ratio)))]
        return _select(scene, keep.sort().values)


class Shuffle:
    """Random point order."""

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        return _select(scene, torch.randperm(len(scene["coord"]), generator=generator))


TRANSFORMS: dict[str, Callable[..., Callable[[Scene, torch.Generator], Scene]]] = {
    "center_shift": CenterShift,
    "random_rotate_z": RandomRotateZ,
    "random_scale": RandomScale,
    "random_flip": RandomFlip,
    "random_jitter": RandomJitter,
    "chromatic_jitter": ChromaticJitter,
    "chromatic_auto_contrast": ChromaticAutoContrast,
    "random_color_drop": RandomColorDrop,
    "elastic_distortion": ElasticDistortion,
    "grid_sample": GridSample,
    "sphere_crop": SphereCrop,
    "random_dropout": RandomDropout,
    "shuffle": Shuffle,
}

#: ConDaFormer's S3DIS training pipeline (official configs/s3dis/condaformer.py)
DEFAULT_TRAIN: list[dict] = [
    {"name": "center_shift", "apply_z": True},
    {"name": "random_rotate_z", "angle": 1.0, "p": 0.5},
    {"name": "random_scale", "low": 0.8, "high": 1.2},
    {"name": "random_jitter", "sigma": 0.005, "clip": 0.02},
    {"name": "random_color_drop", "p": 0.2},
    {"name": "grid_sample", "voxel_size": 0.04},
    {"name": "sphere_crop", "max_points": 80000},
    {"name": "shuffle"},
]

#: evaluation: the whole scene at full resolution; the task voxelizes it (voting)
DEFAULT_EVAL: list[dict] = [{"name": "center_shift", "apply_z": True}]


class Compose:
    """A pipeline built from ``[{name: ..., **arguments}, ...]``."""

    def __init__(self, specs: Optional[list[dict]]):
        self.specs = [dict(spec) for spec in specs or []]
        self.transforms = []
        for spec in self.specs:
            arguments = dict(spec)
            name = arguments.pop("name", None)
            if name not in TRANSFORMS:
                raise ValueError(f"unknown point transform {name!r}; choose from {', '.join(TRANSFORMS)}")
            try:
                self.transforms.append(TRANSFORMS[name](**arguments))
            except TypeError as error:
                raise ValueError(f"point transform {name!r}: {error}") from None

    def __call__(self, scene: Scene, generator: torch.Generator) -> Scene:
        for transform in self.transforms:
            scene = transform(scene, generator)
        return scene

    def __repr__(self) -> str:
        return f"Compose({[spec.get('name') for spec in self.specs]})"
