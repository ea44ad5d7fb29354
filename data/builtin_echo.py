"""Built-in echo videos: synthetic apical four-chamber (A4C) views from two ultrasound sites.

Each video is a beating four-chamber heart seen from the apex, imaged by a simple B-mode model:

1. **Anatomy** (one video = one random heart): the left and right ventricles (LV, RV) near the
   apex, the left and right atria (LA, RA) below them, drawn as ellipses of blood inside a bright
   myocardial wall, with random position, size and tilt. The areas follow a periodic heartbeat:
   the ventricles shrink in systole while the atria fill, then the reverse; the
   atrioventricular plane moves towards the apex in systole. Period 7 to 9 frames, so a
   16-frame clip holds about two beats.
2. **Echogenicity**: blood is dark, the walls bright, the surrounding tissue grey with a slowly
   varying texture.
3. **Imaging** (the site's scanner settings): multiplicative speckle (complex Gaussian noise
   smoothed to the site's speckle size, magnitude taken, so its statistics are Rayleigh), depth
   attenuation, near-field clutter that fills the chambers with haze, log compression, gain and
   contrast (a gamma curve), a Gaussian point-spread blur, and the sector of the probe (apex at
   the top centre, the site's opening angle); 8-bit quantisation.

The two sites differ only in step 3 (``SITES``): site A is a sharp, high-contrast scanner with
fine speckle; site B has coarse, blurred speckle, strong attenuation, chamber haze, lower
contrast, a brighter gain curve and a narrower sector. A segmentor trained on site A alone
misreads site B; the anatomy and its labels are drawn from the same distribution at both sites.

Files are written in the CardiacUDA layout (``Site_A/patient0001-4_image.nii.gz`` with
``..._label.nii.gz``, H x W x T uint8, labels 1 LV, 2 LA, 3 RA, 4 RV as CardiacUDA's view 4) and
read back by ``data.cardiac_uda``. Every frame is labelled; the UDA datamodule hides the target
site's training labels from the task, and uses its test labels only to score.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from data.base import build_once

GENERATOR_VERSION = 1

#: scanner settings per site (step 3 of the module docstring)
SITES = {
    "Site_A": dict(
        speckle_size=0.6,  # std of the Gaussian that correlates the speckle (pixels)
        blur=0.0,  # std of the point-spread blur (pixels)
        attenuation=0.6,  # exp(-attenuation * depth), depth in [0, 1]
        clutter=0.02,  # near-field haze level
        log_compression=40.0,  # k in log(1 + k x) / log(1 + k)
        gain=1.0,
        gamma=1.0,  # contrast curve out = gain * in ** gamma
        sector_degrees=84.0,  # full opening angle of the probe's sector
    ),
    "Site_B": dict(
        speckle_size=1.5,
        blur=0.8,
        attenuation=2.0,
        clutter=0.2,
        log_compression=8.0,
        gain=1.2,
        gamma=0.6,
        sector_degrees=66.0,
    ),
}

#: chamber -> (label value, centre (lateral, depth), semi-axes (lateral, depth)) in units of the
#: image side, for a heart at rest (end-diastole for the ventricles)
CHAMBERS = {
    "LV": (1, (0.61, 0.40), (0.115, 0.22)),
    "LA": (2, (0.61, 0.78), (0.105, 0.095)),
    "RA": (3, (0.38, 0.78), (0.095, 0.095)),
    "RV": (4, (0.38, 0.42), (0.085, 0.19)),
}
WALL = 0.045  # myocardial wall thickness (image side units)


def _heart(rng: np.random.Generator) -> dict:
    """Random anatomy of one video: global pose and per-chamber size jitter, and the heartbeat."""
    return dict(
        shift=rng.uniform(-0.04, 0.04, size=2),
        scale=rng.uniform(0.88, 1.1),
        tilt=math.radians(rng.uniform(-8, 8)),
        sizes={name: rng.uniform(0.9, 1.1, size=2) for name in CHAMBERS},
        period=rng.uniform(7.0, 9.0),
        phase=rng.uniform(0, 1),
        ejection=rng.uniform(0.15, 0.25),  # fractional shrink of the ventricles' axes in systole
    )


def _frame_geometry(heart: dict, t: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Label map (H, W) and wall map (H, W, bool) of one frame."""
    contraction = 0.5 - 0.5 * math.cos(2 * math.pi * (t / heart["period"] + heart["phase"]))  # 0 diastole, 1 systole
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    centre = np.array([0.5, 0.55])
    # pose: rotate about the heart's centre, then scale and shift
    cos, sin = math.cos(heart["tilt"]), math.sin(heart["tilt"])
    dx, dy = xx - centre[0] - heart["shift"][0], yy - centre[1] - heart["shift"][1]
    u = (cos * dx + sin * dy) / heart["scale"] + centre[0]
    v = (-sin * dx + cos * dy) / heart["scale"] + centre[1]

    labels = np.zeros((size, size), np.uint8)
    wall = np.zeros((size, size), bool)
    valve_shift = 0.04 * contraction  # the AV plane moves towards the apex in systole
    for name, (value, (cu, cv), (au, av)) in CHAMBERS.items():
        su, sv = heart["sizes"][name]
        if name in ("LV", "RV"):
            shrink = 1 - heart["ejection"] * contraction
            cv = cv + 0.5 * av * (1 - shrink) - valve_shift  # the apex stays, the base moves up
            au, av = au * su * shrink, av * sv * shrink
        else:
            grow = 1 - 0.12 * (1 - contraction)  # the atria are largest at end-systole
            cv = cv - valve_shift
            au, av = au * su * grow, av * sv * grow
        r = ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2
        outer = ((u - cu) / (au + WALL)) ** 2 + ((v - cv) / (av + WALL)) ** 2
        wall |= outer <= 1
        labels[r <= 1] = value
    wall &= labels == 0
    return labels, wall


def _speckle(rng: np.random.Generator, shape: tuple[int, ...], size: float) -> np.ndarray:
    """Fully developed speckle of (T, H, W) frames: |complex Gaussian noise smoothed to ``size``
    within each frame|, normalised to mean one."""
    noise = rng.normal(size=(2, *shape)).astype(np.float32)
    if size > 0:
        noise = ndimage.gaussian_filter(noise, (0, 0, size, size))
    amplitude = np.hypot(noise[0], noise[1])
    return amplitude / amplitude.mean()


def _sector(size: int, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Sector mask of the probe (apex at the top centre) and the depth of each pixel in [0, 1]."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    dx, dy = xx - 0.5, yy + 0.02
    depth = np.hypot(dx, dy)
    angle = np.degrees(np.abs(np.arctan2(dx, dy)))
    return (angle <= degrees / 2) & (depth <= 1.0), np.clip(depth, 0, 1)


def render_video(heart: dict, site: dict, frames: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Images (H, W, T) uint8 and labels (H, W, T) uint8 of one heart imaged at one site."""
    inside, depth = _sector(size, site["sector_degrees"])
    texture = 0.3 + 0.3 * ndimage.gaussian_filter(rng.normal(size=(size, size)), 3.0)
    labels, walls = zip(*(_frame_geometry(heart, t, size) for t in range(frames)))
    labels, walls = np.stack(labels), np.stack(walls)
    shape = (frames, size, size)
    echogenicity = np.where(labels > 0, 0.03, np.where(walls, 0.9, texture[None]))
    signal = echogenicity * _speckle(rng, shape, site["speckle_size"]) * np.exp(-site["attenuation"] * depth)
    signal += site["clutter"] * np.exp(-depth / 0.45) * _speckle(rng, shape, site["speckle_size"])
    k = site["log_compression"]
    image = np.log1p(k * np.clip(signal, 0, None)) / np.log1p(k)
    image = np.clip(site["gain"] * np.clip(image, 0, 1) ** site["gamma"], 0, 1)
    if site["blur"] > 0:
        image = ndimage.gaussian_filter(image, (0, site["blur"], site["blur"]))
    images = np.round(np.where(inside, image, 0.0) * 255).astype(np.uint8)
    labels = np.where(inside, labels, 0).astype(np.uint8)
    return np.moveaxis(images, 0, -1), np.moveaxis(labels, 0, -1)


def write_builtin_echo(root: Path, videos_per_site: int, frames: int, size: int, seed: int = 0) -> None:
    """Write both sites in CardiacUDA layout under ``root`` (see the module docstring)."""
    import nibabel as nib

    for site_index, (site_name, site) in enumerate(SITES.items()):
        rng = np.random.default_rng([seed, site_index])
        folder = root / site_name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(videos_per_site):
            images, labels = render_video(_heart(rng), site, frames, size, rng)
            stem = f"patient{i + 1:04d}-4"
            for suffix, volume in (("image", images), ("label", labels)):
                nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / f"{stem}_{suffix}.nii.gz")


def build_builtin_echo(videos_per_site: int = 40, frames: int = 32, size: int = 64, seed: int = 0) -> Path:
    """Generate the built-in two-site set once under the cache folder and return its root."""
    params = dict(version=GENERATOR_VERSION, videos_per_site=videos_per_site, frames=frames, size=size, seed=seed)
    return build_once("echo_uda_builtin", params, lambda root: write_builtin_echo(root, videos_per_site, frames, size, seed))
