"""Built-in abdominal CT phantoms with the eight Synapse organs, in TransUNet's preprocessed layout.

Each case is a 3D volume (slices x rows x columns; slice 0 is the most superior, image rows run
anterior to posterior, and the patient's right is on the image's left, the radiological
convention). It is painted in Hounsfield units, in anatomical order:

1. outside air; an elliptical body with a wobbly outline, subcutaneous fat, the abdominal wall
   muscle, intra-abdominal fat;
2. the spine (vertebral body, canal), paraspinal muscles, lower ribs near the top;
3. bowel loops (walls, fluid, air) in the lower anterior abdomen: unlabelled distractors;
4. the organs, each an ellipsoid-like solid whose cross-section is rotated, shifted and
   deformed by a few smooth angular harmonics that change along the body axis: liver (patient's
   right, upper), stomach (left anterior, with a wall, fluid content and sometimes a gas cap),
   spleen (left posterior), kidneys (either side of the spine, the right one lower, with a
   brighter cortex), pancreas (a tube curving from the head near the duodenum, in front of the
   aorta, to the tail at the splenic hilum), gallbladder (fluid, under the liver), aorta (in
   front of the spine) and the unlabelled inferior vena cava beside it;
5. organ-specific texture (correlated noise of organ-specific strength), a smooth whole-body
   deformation, the scanner's blur and quantum noise.

Every case draws its own body size, organ positions, sizes, rotations, shapes, enhancement and
scan range, so the test cases are new patients. Intensities are then clipped to TransUNet's
window [-125, 275] HU and scaled to [0, 1], exactly as the preprocessed Synapse files are.
Labels use TransUNet's order: 1 aorta, 2 gallbladder, 3 left kidney, 4 right kidney, 5 liver,
6 pancreas, 7 spleen, 8 stomach.

Training cases are written as ``train_npz/caseXXXX_sliceYYY.npz`` (keys ``image``, ``label``),
test cases as ``test_vol_h5/caseXXXX.npy.h5`` (``image``, ``label``: D x H x W), with the
``lists_Synapse/train.txt`` and ``test_vol.txt`` lists, and read back by ``data.synapse``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from pathlib import Path

import h5py
import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from data.base import build_once

ORGANS = ("aorta", "gallbladder", "left kidney", "right kidney", "liver", "pancreas", "spleen", "stomach")
HU_WINDOW = (-125.0, 275.0)
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class Solid:
    """An organ-like solid: an elliptical cross-section that follows an ellipsoid along z.

    ``centre`` and ``axes`` are in normalised image units ([-1, 1] across the field of view);
    ``z_centre`` / ``z_half`` place it along the body axis (0 = top slice, 1 = bottom);
    ``drift`` moves the centre per unit of z; ``fullness`` < 1 makes the ends blunter.
    """

    centre: tuple[float, float]
    axes: tuple[float, float]
    angle: float
    z_centre: float
    z_half: float
    drift: tuple[float, float] = (0.0, 0.0)
    fullness: float = 1.0
    wobble: float = 0.06


# The average patient; every case perturbs it (``_perturb``).
ATLAS = {
    "liver": Solid((-0.40, -0.04), (0.36, 0.44), 20, 0.28, 0.45, drift=(0.10, 0.0), fullness=0.6, wobble=0.08),
    "stomach": Solid((0.30, -0.22), (0.26, 0.19), -25, 0.22, 0.30, drift=(-0.10, 0.05), fullness=0.7, wobble=0.09),
    "spleen": Solid((0.57, 0.22), (0.15, 0.23), 35, 0.25, 0.24, wobble=0.07),
    "left kidney": Solid((0.35, 0.42), (0.13, 0.17), -30, 0.55, 0.22, wobble=0.05),
    "right kidney": Solid((-0.35, 0.43), (0.13, 0.17), 30, 0.63, 0.22, wobble=0.05),
    "gallbladder": Solid((-0.26, -0.10), (0.08, 0.11), 30, 0.50, 0.14, wobble=0.05),
    "ivc": Solid((-0.13, 0.22), (0.07, 0.055), 0, 0.45, 0.60, fullness=0.2, wobble=0.03),
    "aorta": Solid((0.06, 0.25), (0.058, 0.058), 0, 0.50, 0.80, drift=(0.0, 0.03), fullness=0.1, wobble=0.02),
}
# Pancreas: control points (head, neck, body, tail) of a curve, its half-thickness along the curve.
PANCREAS_CURVE = ((-0.14, 0.02), (0.0, 0.08), (0.18, 0.10), (0.44, 0.12))
PANCREAS_THICKNESS = (0.085, 0.06, 0.055, 0.05)
PANCREAS_Z = (0.46, 0.13)

# Mean HU, case-to-case spread and texture strength per tissue (portal-venous contrast phase).
TISSUE_HU = {
    "air": (-1000, 0, 0),
    "subcutaneous fat": (-100, 8, 6),
    "fat": (-90, 8, 8),
    "muscle": (45, 6, 8),
    "bone": (420, 40, 30),
    "marrow": (190, 20, 15),
    "canal": (25, 5, 4),
    "bowel wall": (55, 8, 10),
    "bowel content": (15, 15, 15),
    "liver": (108, 10, 6),
    "spleen": (120, 10, 5),
    "kidney cortex": (175, 15, 7),
    "kidney medulla": (125, 12, 7),
    "pancreas": (92, 10, 12),
    "gallbladder": (12, 6, 3),
    "stomach wall": (75, 8, 8),
    "stomach content": (20, 12, 10),
    "aorta": (185, 20, 4),
    "ivc": (135, 15, 4),
}


def _perturb(solid: Solid, rng: np.random.Generator, spread: float) -> Solid:
    """One patient's version of an atlas organ: shifted, scaled, rotated, moved along z."""
    scale = np.exp(rng.normal(0.0, 0.10 * spread))
    aspect = np.exp(rng.normal(0.0, 0.06 * spread))
    return Solid(
        centre=tuple(np.add(solid.centre, rng.normal(0.0, 0.03 * spread, 2))),
        axes=(solid.axes[0] * scale * aspect, solid.axes[1] * scale / aspect),
        angle=solid.angle + rng.normal(0.0, 10.0 * spread),
        z_centre=solid.z_centre + rng.normal(0.0, 0.04 * spread),
        z_half=solid.z_half * np.exp(rng.normal(0.0, 0.08 * spread)),
        drift=solid.drift,
        fullness=solid.fullness,
        wobble=solid.wobble,
    )


class Phantom:
    """One synthetic patient, painted slice by slice on a ``size`` x ``size`` grid."""

    def __init__(self, rng: np.random.Generator, size: int, slices: int):
        self.rng = rng
        self.size = size
        self.slices = slices
        axis = (np.arange(size) + 0.5) / size * 2 - 1
        self.y, self.x = np.meshgrid(axis, axis, indexing="ij")
        # the scan covers a slightly different stretch of the abdomen in every patient
        start = rng.uniform(-0.05, 0.05)
        self.z = start + np.linspace(0.0, 1.0, slices) * rng.uniform(0.95, 1.05)
        self.body_axes = (rng.uniform(0.76, 0.90), rng.uniform(0.54, 0.66))
        self.body_harmonics = rng.normal(0.0, 0.025, (4, 2))
        self.organs = {name: _perturb(solid, rng, 1.0) for name, solid in ATLAS.items()}
        self.harmonics = {name: rng.normal(0.0, 1.0, (3, 2, 2)) for name in ATLAS}
        self.pancreas_shift = rng.normal(0.0, 0.025, (len(PANCREAS_CURVE), 2))
        self.pancreas_z = (PANCREAS_Z[0] + rng.normal(0.0, 0.03), PANCREAS_Z[1] * np.exp(rng.normal(0.0, 0.08)))
        self.stomach_gas = rng.random() < 0.6
        self.bowel = [
            (rng.uniform(-0.55, 0.55), rng.uniform(-0.45, 0.15), rng.uniform(0.05, 0.11), rng.uniform(0.35, 1.1))
            for _ in range(rng.integers(6, 11))
        ]
        self.hu = {tissue: rng.normal(mean, spread) for tissue, (mean, spread, _) in TISSUE_HU.items()}

    # -- shapes on one slice ---------------------------------------------------------------
    def _body(self, shrink: float = 1.0) -> np.ndarray:
        """The body outline (the same on every slice), or a layer inside it when ``shrink`` < 1."""
        theta = np.arctan2(self.y, self.x)
        radius = 1.0 + sum(a * np.cos((k + 2) * theta) + b * np.sin((k + 2) * theta) for k, (a, b) in enumerate(self.body_harmonics))
        ax, ay = self.body_axes[0] * shrink, self.body_axes[1] * shrink
        return ((self.x / ax) ** 2 + ((self.y - 0.04) / ay) ** 2) < radius**2

    def _solid(self, name: str, z: float, shrink: float = 1.0) -> np.ndarray:
        """The cross-section of organ ``name`` on the slice at ``z`` (``shrink`` < 1: an inner part)."""
        solid = self.organs[name]
        t = (z - solid.z_centre) / solid.z_half
        if abs(t) >= 1:
            return np.zeros_like(self.x, dtype=bool)
        profile = (1 - t * t) ** (0.5 * solid.fullness)
        cx = solid.centre[0] + solid.drift[0] * (z - solid.z_centre)
        cy = solid.centre[1] + solid.drift[1] * (z - solid.z_centre)
        angle = np.deg2rad(solid.angle)
        u = (self.x - cx) * np.cos(angle) + (self.y - cy) * np.sin(angle)
        v = -(self.x - cx) * np.sin(angle) + (self.y - cy) * np.cos(angle)
        theta = np.arctan2(v, u)
        coefficients = self.harmonics.get(name, np.zeros((3, 2, 2)))
        wobble = 1.0
        for k, ((a0, a1), (b0, b1)) in enumerate(coefficients):  # harmonics 2..4, varying along z
            wobble = wobble + solid.wobble * ((a0 + a1 * t) * np.cos((k + 2) * theta) + (b0 + b1 * t) * np.sin((k + 2) * theta)) / (k + 1)
        radius = np.sqrt((u / solid.axes[0]) ** 2 + (v / solid.axes[1]) ** 2)
        return radius < profile * shrink * np.maximum(wobble, 0.5)

    def _pancreas(self, z: float) -> np.ndarray:
        """A tube around a Bezier curve; the tail rises towards the splenic hilum, so lower slices
        hold less of the tail and higher ones less of the head."""
        z_centre, z_half = self.pancreas_z
        t_z = (z - z_centre) / z_half
        if abs(t_z) >= 1:
            return np.zeros_like(self.x, dtype=bool)
        points = np.asarray(PANCREAS_CURVE) + self.pancreas_shift
        s = np.linspace(0.0, 1.0, 48)
        curve = _bezier(points, s)
        thickness = np.interp(s, np.linspace(0, 1, len(PANCREAS_THICKNESS)), PANCREAS_THICKNESS)
        keep = s <= 1.0 - 0.6 * max(t_z, 0.0)
        keep &= s >= 0.5 * max(-t_z, 0.0)
        curve, thickness = curve[keep], thickness[keep] * np.sqrt(1 - t_z * t_z) ** 0.5
        distance = np.hypot(self.x[..., None] - curve[:, 0], self.y[..., None] - curve[:, 1]) / thickness
        return distance.min(axis=-1) < 1.0

    # -- the volume ------------------------------------------------------------------------
    def paint(self) -> tuple[np.ndarray, np.ndarray]:
        """HU volume (float32) and label volume (uint8), both slices x size x size."""
        hu = np.empty((self.slices, self.size, self.size), np.float32)
        tissue_index = np.empty(hu.shape, np.uint8)
        label = np.zeros(hu.shape, np.uint8)
        tissues = list(TISSUE_HU)
        body, wall, cavity = self._body(), self._body(0.93), self._body(0.87)
        for i, z in enumerate(self.z):
            tissue = np.zeros((self.size, self.size), np.uint8)  # index into ``tissues``
            lab = np.zeros((self.size, self.size), np.uint8)

            def put(mask: np.ndarray, name: str, organ: int | None = None) -> None:
                tissue[mask] = tissues.index(name)
                if organ is not None:
                    lab[mask] = organ

            put(body, "subcutaneous fat")
            put(wall, "muscle")
            put(cavity, "fat")
            self._paint_spine(z, put)
            for cx, cy, r, top in self.bowel:
                if z > top:
                    loop = np.hypot(self.x - cx, self.y - cy) < r
                    put(loop, "bowel wall")
                    put(np.hypot(self.x - cx, self.y - cy) < 0.65 * r, "bowel content")
                    if cy < -0.2:  # anterior loops hold gas
                        put(loop & (self.y < cy - 0.3 * r) & (np.hypot(self.x - cx, self.y - cy) < 0.65 * r), "air")
            put(self._solid("liver", z), "liver", 5)
            put(self._solid("stomach", z), "stomach wall", 8)
            lumen = self._solid("stomach", z, 0.78)
            put(lumen, "stomach content", 8)
            if self.stomach_gas:
                cy = self.organs["stomach"].centre[1]
                put(lumen & (self.y < cy - 0.08), "air", 8)
            put(self._solid("spleen", z), "spleen", 7)
            for name, organ in (("left kidney", 3), ("right kidney", 4)):
                put(self._solid(name, z), "kidney cortex", organ)
                put(self._solid(name, z, 0.6), "kidney medulla", organ)
            put(self._pancreas(z), "pancreas", 6)
            put(self._solid("gallbladder", z), "gallbladder", 2)
            put(self._solid("ivc", z), "ivc")
            put(self._solid("aorta", z), "aorta", 1)
            outside = ~body
            tissue[outside] = tissues.index("air")
            lab[outside] = 0
            tissue_index[i], label[i] = tissue, lab
        means = np.array([self.hu[t] for t in tissues], np.float32)
        strengths = np.array([TISSUE_HU[t][2] for t in tissues], np.float32)
        texture = self._texture(hu.shape)
        hu[:] = means[tissue_index] + strengths[tissue_index] * texture
        coordinates = self._displacement(hu.shape)  # one smooth warp for image and labels
        hu = map_coordinates(hu, coordinates, order=1, mode="nearest")
        label = map_coordinates(label, coordinates, order=0, mode="nearest")
        hu = gaussian_filter(hu, sigma=(0.0, 0.6, 0.6))  # the scanner's point-spread function
        hu += self.rng.normal(0.0, self.rng.uniform(8.0, 16.0), hu.shape).astype(np.float32)  # quantum noise
        return hu, label

    def _paint_spine(self, z: float, put) -> None:
        x, y = self.x, self.y
        put(np.hypot((x - 0.17) / 0.12, (y - 0.62) / 0.09) < 1, "muscle")  # paraspinal muscles
        put(np.hypot((x + 0.17) / 0.12, (y - 0.62) / 0.09) < 1, "muscle")
        body_centre = 0.47
        put(np.hypot(x / 0.11, (y - body_centre) / 0.10) < 1, "bone")
        put(np.hypot(x / 0.085, (y - body_centre) / 0.075) < 1, "marrow")
        put(np.hypot(x / 0.045, (y - 0.63) / 0.04) < 1, "canal")
        put((np.abs(x) < 0.025) & (y > 0.67) & (y < 0.78), "bone")  # spinous process
        if z < 0.35:  # lower ribs at the top of the scan
            for side in (-1, 1):
                for angle in (0.5, 1.1, 1.9, 2.5):
                    rx = side * 0.8 * np.cos(angle - np.pi / 2) * self.body_axes[0] / 0.85
                    ry = 0.04 + 0.82 * np.sin(angle - np.pi / 2) * -self.body_axes[1] / 0.6
                    put(np.hypot(x - rx, y - ry) < 0.03, "bone")

    def _texture(self, shape: tuple[int, ...]) -> np.ndarray:
        """Zero-mean, unit-variance correlated noise: fine grain plus coarser mottling."""
        fine = gaussian_filter(self.rng.normal(size=shape), sigma=(0.5, 1.0, 1.0))
        coarse = gaussian_filter(self.rng.normal(size=shape), sigma=(1.0, 3.0, 3.0))
        texture = fine / (fine.std() + 1e-8) + 0.7 * coarse / (coarse.std() + 1e-8)
        return (texture / texture.std()).astype(np.float32)

    def _displacement(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Sampling coordinates of a smooth random in-plane displacement of about 3 % of the field
        (patients are not ellipses)."""
        d, h, w = shape
        coordinates = np.stack(np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")).astype(np.float32)
        for axis in (1, 2):
            field = gaussian_filter(self.rng.normal(size=shape), sigma=(d / 6, h / 6, w / 6), mode="wrap")
            coordinates[axis] += 0.03 * h * field / (field.std() + 1e-8)
        return coordinates


def _bezier(points: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Points of the Bezier curve with control ``points`` (n, 2) at parameters ``s``."""
    n = len(points) - 1
    basis = np.stack([comb(n, k) * s**k * (1 - s) ** (n - k) for k in range(n + 1)], axis=1)
    return basis @ points


def window(hu: np.ndarray, low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]) -> np.ndarray:
    """TransUNet's normalisation: clip to [low, high] HU, scale to [0, 1]."""
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def phantom_case(seed: int, size: int, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """One case: windowed image in [0, 1] and labels, both (slices, size, size) float32."""
    hu, label = Phantom(np.random.default_rng(seed), size, slices).paint()
    return window(hu), label.astype(np.float32)


def write_builtin_synapse(root: Path, train_cases: int, test_cases: int, size: int, slices: int, seed: int = 0) -> None:
    """Write the phantoms into ``root`` in TransUNet's layout (see the module docstring)."""
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir(parents=True)
    (root / "lists_Synapse").mkdir(parents=True)
    train_names, test_names = [], []
    for number in range(1, train_cases + test_cases + 1):
        case = f"case{number:04d}"
        image, label = phantom_case(seed * 100_003 + number, size, slices)
        if number <= train_cases:
            for index in range(slices):
                name = f"{case}_slice{index:03d}"
                np.savez(root / "train_npz" / f"{name}.npz", image=image[index], label=label[index])
                train_names.append(name)
        else:
            with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as handle:
                handle.create_dataset("image", data=image)
                handle.create_dataset("label", data=label)
            test_names.append(case)
    (root / "lists_Synapse" / "train.txt").write_text("\n".join(train_names) + "\n")
    (root / "lists_Synapse" / "test_vol.txt").write_text("\n".join(test_names) + "\n")


def build_builtin_synapse(train_cases: int = 12, test_cases: int = 4, size: int = 96, slices: int = 40, seed: int = 0) -> Path:
    """Generate the built-in set once under the cache folder and return its root."""
    params = dict(version=GENERATOR_VERSION, train_cases=train_cases, test_cases=test_cases, size=size, slices=slices, seed=seed)
    return build_once(
        "synapse_builtin",
        params,
        lambda root: write_builtin_synapse(root, train_cases, test_cases, size, slices, seed),
    )
