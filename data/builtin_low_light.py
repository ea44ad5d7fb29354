"""Built-in low-light pairs: scikit-image's photographs darkened by a physical camera model.

The reference ("high") is the photograph as shipped. The dark image ("low") is what a camera
would record of the same scene with much less light (after the LOL / SID line of work):

1. undo the sRGB transfer curve, to work in linear light;
2. scale the exposure by ``k``, log-uniform in ``EXPOSURE`` (1/80 to 1/8 of the light);
3. tint by per-channel white-balance gains, log-normal with ``CAST_SIGMA`` (a colour cast);
4. add Poisson-Gaussian sensor noise: photon shot noise at ``PHOTONS`` electrons for full
   scale, plus Gaussian read noise of standard deviation ``READ_NOISE``;
5. apply a camera response curve ``v ** (1 / g)`` with ``g`` uniform in ``CRF_GAMMA``;
6. quantise to 8 bits.

Training crops come from one set of photographs and the test images from others, so the test
measures generalisation to unseen scenes. Files are written in LOL-v1 layout
(``our485/{low,high}``, ``eval15/{low,high}``) and read back by ``data.lol``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from data.base import build_once

EXPOSURE = (1 / 80, 1 / 8)
CAST_SIGMA = 0.12
PHOTONS = (300.0, 3000.0)
READ_NOISE = (0.0005, 0.003)
CRF_GAMMA = (1.8, 2.6)

GENERATOR_VERSION = 1


def _training_photos(max_side: int = 512) -> list[np.ndarray]:
    """Photographs for training crops: colour photos plus grey ones (the colour cast tints them).

    Each is shrunk once so that its shorter side is at most ``max_side``, which keeps the
    per-crop rescaling cheap.
    """
    left, right, _ = skdata.stereo_motorcycle()
    colour = [skdata.astronaut(), skdata.hubble_deep_field(), skdata.immunohistochemistry(), skdata.retina(), left, right]
    grey = [skdata.camera(), skdata.coins(), skdata.moon(), skdata.grass(), skdata.gravel(), skdata.brick()]
    photos = colour + [np.repeat(g[..., None], 3, axis=2) for g in grey]
    return [_resize(photo, min(1.0, max_side / min(photo.shape[:2]))) for photo in photos]


def _resize(photo: np.ndarray, scale: float) -> np.ndarray:
    """Bicubic resize (anti-aliased when shrinking, as PIL filters over the scaled support)."""
    if scale == 1.0:
        return photo
    height, width = photo.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC))


def _test_photos() -> dict[str, np.ndarray]:
    """Held-out photographs, never cropped for training; one keeps an odd width (451)."""
    rocket = skdata.rocket()[13:413, 20:620]
    return {"coffee": skdata.coffee(), "chelsea": skdata.chelsea(), "rocket": rocket}


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def darken(reference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply the six-step camera model of the module docstring to an (H, W, 3) uint8 image."""
    linear = srgb_to_linear(reference.astype(np.float64) / 255.0)
    exposure = np.exp(rng.uniform(np.log(EXPOSURE[0]), np.log(EXPOSURE[1])))
    cast = np.exp(rng.normal(0.0, CAST_SIGMA, size=3))
    cast /= cast.mean()
    signal = np.clip(linear * exposure * cast, 0.0, 1.0)
    photons = np.exp(rng.uniform(np.log(PHOTONS[0]), np.log(PHOTONS[1])))
    noisy = rng.poisson(signal * photons) / photons + rng.normal(0.0, rng.uniform(*READ_NOISE), signal.shape)
    response = np.clip(noisy, 0.0, 1.0) ** (1.0 / rng.uniform(*CRF_GAMMA))
    return np.round(response * 255.0).astype(np.uint8)


def _random_crop(photo: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    shortest = min(photo.shape[:2])
    scale = rng.uniform(max(crop / shortest, 0.25), max(crop / shortest, 1.0))
    scaled = _resize(photo, scale)
    if min(scaled.shape[:2]) < crop:  # rounding can leave one pixel short
        scaled = _resize(photo, scale * crop / min(scaled.shape[:2]) + 1e-3)
    top = rng.integers(0, scaled.shape[0] - crop + 1)
    left = rng.integers(0, scaled.shape[1] - crop + 1)
    patch = scaled[top : top + crop, left : left + crop]
    return np.ascontiguousarray(patch[:, ::-1] if rng.random() < 0.5 else patch)


def _save_pair(root: Path, split: str, name: str, low: np.ndarray, high: np.ndarray) -> None:
    for folder, pixels in (("low", low), ("high", high)):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / split / folder / f"{name}.png", compress_level=1)


def write_builtin_lol(root: Path, train_images: int, test_variants: int, crop: int, seed: int = 0) -> None:
    """Write the built-in set into ``root`` in LOL-v1 layout (see the module docstring)."""
    rng = np.random.default_rng(seed)
    photos = _training_photos()
    for i in range(train_images):
        high = _random_crop(photos[i % len(photos)], crop, rng)
        _save_pair(root, "our485", f"{i + 1:04d}", darken(high, rng), high)
    for name, high in _test_photos().items():
        for variant in range(test_variants):
            _save_pair(root, "eval15", f"{name}_{variant + 1}", darken(high, rng), high)


def build_builtin_lol(train_images: int = 240, test_variants: int = 4, crop: int = 192, seed: int = 0) -> Path:
    """Generate the built-in set once under the cache folder and return its root."""
    params = dict(
        version=GENERATOR_VERSION, train_images=train_images, test_variants=test_variants, crop=crop, seed=seed
    )
    return build_once(
        "low_light_builtin",
        params,
        lambda root: write_builtin_lol(root, train_images, test_variants, crop, seed),
    )
