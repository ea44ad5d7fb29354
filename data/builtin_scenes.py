"""Built-in scene-classification data: procedurally rendered aerial scenes, in UC Merced layout.

Twelve land-use classes, each defined by its *layout* rather than its colours: every scene is
painted from one shared set of materials (grass, trees, crops, soil, sand, water, asphalt,
concrete, roofs, cars), so classes that share materials differ only in structure:

=====================  ============================================================
class                  structure
=====================  ============================================================
``agricultural``       parallel field strips of crops and soil with furrow texture
``forest``             a dense canopy of overlapping shaded tree crowns
``meadow``             smooth grass with patchy tone, a few bushes, perhaps a path
``river``              a meandering water band with sandy banks across land
``lake``               one irregular water body inside land
``beach``              a wavy coastline: water with surf, a sand band, then land
``desert``             sand with dune ripples and a few rocks
``denseresidential``   a street grid with small roofs packed into every block
``sparseresidential``  grass with a curved street and a few houses, trees and pools
``parkinglot``         asphalt with painted bays, rows of cars and aisles
``intersection``       roads with lane markings crossing over land, a few cars
``industrial``         large flat roofs with vents, tanks and trucks on concrete
=====================  ============================================================

Every scene draws its own size scale, rotation (any angle: aerial images have no "up"),
illumination, colour cast, haze, blur and sensor noise, and each material its own shade and
fractal texture. Colour histograms therefore separate the material groups but not the classes
inside a group (forest / meadow / agricultural, river / lake, dense residential / parking lot /
industrial, ...), which is what the leaderboard's colour-histogram baseline measures.

Files are written as ``UCMerced_LandUse/Images/<class>/<class>NN.tif`` (UC Merced's layout and
format) and read back by ``data.scene_folders``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from data.base import build_once

GENERATOR_VERSION = 1

#: base colours (RGB, 0-255) of the materials every class paints with
MATERIALS = {
    "grass": (96, 126, 62),
    "tree": (48, 78, 44),
    "crop": (112, 140, 58),
    "dry_crop": (168, 152, 92),
    "soil": (126, 102, 78),
    "sand": (198, 184, 146),
    "water": (48, 80, 98),
    "asphalt": (86, 86, 90),
    "concrete": (168, 166, 160),
    "marking": (228, 228, 222),
}
ROOFS = [(150, 78, 62), (122, 122, 128), (208, 206, 200), (116, 88, 68), (92, 104, 118), (176, 168, 150)]
#: cars share the roofs' colours (plus white and black), so they are no colour cue either
CARS = ROOFS + [(230, 230, 228), (40, 40, 44)]
#: texture strength (relative brightness swing) of each material
TEXTURE = {"grass": 0.12, "tree": 0.22, "crop": 0.1, "dry_crop": 0.08, "soil": 0.1, "sand": 0.05, "water": 0.05,
           "asphalt": 0.06, "concrete": 0.05, "marking": 0.02}  # fmt: skip


class Canvas:
    """An RGB float canvas with the scene's random state, scale and shared noise fields."""

    def __init__(self, size: int, scale: float, rng: np.random.Generator):
        self.size, self.scale, self.rng = size, scale, rng
        self.image = np.zeros((size, size, 3), np.float32)
        self._noise = [fractal_noise(rng, size) for _ in range(3)]

    def s(self, value: float) -> int:
        """A length in pixels at this scene's scale."""
        return max(1, int(round(value * self.scale)))

    def material(self, name: str) -> np.ndarray:
        """A full-canvas texture of ``name``: its colour, shaded per scene, times fractal noise."""
        base = np.array(MATERIALS[name], np.float32) * self.rng.uniform(0.85, 1.15, 3)
        noise = self._noise[self.rng.integers(3)]
        return base * (1 + TEXTURE[name] * noise[..., None] * self.rng.uniform(0.7, 1.3))

    def paint(self, mask: np.ndarray, colour) -> None:
        """Paint ``colour`` (an RGB triple or a full texture) where the uint8 ``mask`` is set."""
        where = mask.astype(bool)
        self.image[where] = (colour[where] if np.ndim(colour) == 3 else np.asarray(colour, np.float32))

    def mask(self) -> np.ndarray:
        return np.zeros((self.size, self.size), np.uint8)


def fractal_noise(rng: np.random.Generator, size: int, octaves=(4, 8, 16, 48)) -> np.ndarray:
    """Zero-mean, unit-scale value noise: random grids of several sizes, upsampled and summed."""
    total = np.zeros((size, size), np.float32)
    for i, cells in enumerate(octaves):
        grid = rng.standard_normal((cells, cells)).astype(np.float32)
        total += cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC) * 0.6**i
    return total / (np.abs(total).max() + 1e-6)


def shade_colour(rng: np.random.Generator, colour, spread: float = 0.08) -> tuple[float, float, float]:
    return tuple(float(c) for c in np.clip(np.asarray(colour) * rng.uniform(1 - spread, 1 + spread, 3), 0, 255))


def land_background(c: Canvas) -> None:
    """Two of grass, crops, dry grass or soil in large soft patches: the land around water,
    roads and houses (the same mixture for every class that has land)."""
    names = c.rng.choice(["grass", "crop", "soil", "dry_crop"], size=2, replace=False, p=[0.4, 0.25, 0.15, 0.2])
    blend = (fractal_noise(c.rng, c.size, (3, 6)) > c.rng.uniform(-0.3, 0.3)).astype(np.float32)
    blend = cv2.GaussianBlur(blend, (0, 0), c.s(3))[..., None]
    c.image[:] = c.material(names[0]) * blend + c.material(names[1]) * (1 - blend)


def tree_crowns(c: Canvas, count: int, region: np.ndarray | None = None) -> None:
    """Round crowns with a shadow on one side and a lit top, optionally only inside ``region``."""
    light = c.rng.uniform(0, 2 * math.pi)
    dx, dy = math.cos(light), math.sin(light)
    centres = c.rng.integers(0, c.size, (count, 2))
    radii = np.maximum(1, np.round(c.rng.uniform(2.5, 6, count) * c.scale)).astype(int)
    greens = np.asarray(MATERIALS["tree"], np.float32) * c.rng.uniform(0.75, 1.25, (count, 3))
    for (x, y), r, green in zip(centres.tolist(), radii.tolist(), greens):
        if region is not None and not region[y, x]:
            continue
        cv2.circle(c.image, (int(x + dx * r * 0.5), int(y + dy * r * 0.5)), r, (20, 32, 20), -1)
        cv2.circle(c.image, (x, y), r, green.tolist(), -1)
        cv2.circle(c.image, (int(x - dx * r * 0.3), int(y - dy * r * 0.3)), max(1, r // 2), np.minimum(255, green * 1.25).tolist(), -1)


def house(c: Canvas, centre, size) -> None:
    """A rectangular roof with a ridge along its length: one half lit, one half in shade."""
    roof = np.array(ROOFS[c.rng.integers(len(ROOFS))], np.float32) * c.rng.uniform(0.9, 1.1)
    (x, y), (w, h) = centre, size
    x0, y0, x1, y1 = int(x - w / 2), int(y - h / 2), int(x + w / 2), int(y + h / 2)
    cv2.rectangle(c.image, (x0, y0), (x1, y1), (roof * 0.75).tolist(), -1)
    cv2.rectangle(c.image, (x0, y0), (x1, int(y)), roof.tolist(), -1)


def car(c: Canvas, centre, along_x: bool = False) -> None:
    """A small rectangle in a roof or car colour, 2.5 x 5 (at scale 1), along y unless ``along_x``."""
    colour = shade_colour(c.rng, CARS[c.rng.integers(len(CARS))], 0.05)
    w, h = (c.s(5), c.s(2.5)) if along_x else (c.s(2.5), c.s(5))
    x, y = centre
    cv2.rectangle(c.image, (int(x - w / 2), int(y - h / 2)), (int(x + w / 2), int(y + h / 2)), colour, -1)


def road(c: Canvas, points: np.ndarray, width: int, dashed: bool = True) -> None:
    """An asphalt polyline with an optional dashed centre line."""
    mask = c.mask()
    cv2.polylines(mask, [points.astype(np.int32)], False, 1, width, cv2.LINE_AA)
    c.paint(mask, c.material("asphalt"))
    if dashed:
        for a, b in zip(points[:-1], points[1:]):
            length = np.linalg.norm(b - a)
            for t in np.arange(0, length, c.s(8)):
                p, q = a + (b - a) * t / length, a + (b - a) * min(length, t + c.s(4)) / length
                cv2.line(c.image, tuple(p.astype(int)), tuple(q.astype(int)), MATERIALS["marking"], 1, cv2.LINE_AA)


# -- the classes --------------------------------------------------------------------------------


def agricultural(c: Canvas) -> None:
    y = 0
    while y < c.size:
        width = c.s(c.rng.uniform(8, 24))
        name = c.rng.choice(["crop", "dry_crop", "soil", "grass", "tree"], p=[0.3, 0.2, 0.2, 0.25, 0.05])
        strip = c.mask()
        strip[y : y + width] = 1
        texture = c.material(name)
        period = c.rng.uniform(2.5, 4.5) * c.scale
        furrows = 1 + 0.1 * np.sin(2 * np.pi * np.arange(c.size) / period)[None, :, None]
        c.paint(strip, texture * furrows)
        y += width
        if c.rng.random() < 0.25:  # a track between fields
            c.image[y : y + c.s(1.5)] = shade_colour(c.rng, MATERIALS["soil"])
            y += c.s(1.5)


def forest(c: Canvas) -> None:
    c.image[:] = c.material("tree") * 0.8 + c.material("grass") * c.rng.uniform(0, 0.3)
    tree_crowns(c, int(c.size**2 / (c.scale**2 * 14)))
    for _ in range(c.rng.integers(0, 3)):  # clearings
        x, y = c.rng.integers(0, c.size, 2)
        mask = c.mask()
        cv2.circle(mask, (int(x), int(y)), c.s(c.rng.uniform(3, 7)), 1, -1)
        c.paint(mask, c.material(c.rng.choice(["grass", "soil"])))


def meadow(c: Canvas) -> None:
    tone = cv2.GaussianBlur(fractal_noise(c.rng, c.size, (2, 5)), (0, 0), c.s(4))[..., None]
    names = c.rng.choice(["grass", "crop", "dry_crop", "tree"], size=2, p=[0.45, 0.25, 0.2, 0.1])
    mix = c.rng.uniform(0, 1)
    c.image[:] = (c.material(names[0]) * mix + c.material(names[1]) * (1 - mix)) * (1 + 0.15 * tone)
    if c.rng.random() < 0.5:  # a footpath
        xs = np.linspace(0, c.size, 12)
        ys = c.size * c.rng.uniform(0.2, 0.8) + np.cumsum(c.rng.normal(0, c.s(3), 12))
        cv2.polylines(c.image, [np.stack([xs, ys], 1).astype(np.int32)], False, shade_colour(c.rng, MATERIALS["soil"]), c.s(1.5), cv2.LINE_AA)
    tree_crowns(c, int(c.rng.integers(0, 12)))


def water_fraction(c: Canvas) -> float:
    """River and lake draw their share of water from the same range (no colour cue between them)."""
    return float(c.rng.uniform(0.12, 0.35))


def river(c: Canvas) -> None:
    land_background(c)
    if c.rng.random() < 0.4:
        tree_crowns(c, int(c.size**2 / (c.scale**2 * 60)))
    xs = np.linspace(-10, c.size + 10, 40)
    phase, wavelength = c.rng.uniform(0, 2 * np.pi), c.rng.uniform(0.6, 1.5) * c.size
    ys = c.size / 2 + c.rng.uniform(0.1, 0.25) * c.size * np.sin(2 * np.pi * xs / wavelength + phase)
    points = np.stack([xs, ys], 1).astype(np.int32)
    width = max(3, int(water_fraction(c) * c.size / 1.45 * 0.8))
    bank, water = c.mask(), c.mask()
    cv2.polylines(bank, [points], False, 1, width + c.s(5), cv2.LINE_AA)
    cv2.polylines(water, [points], False, 1, width, cv2.LINE_AA)
    c.paint(bank, c.material(c.rng.choice(["sand", "soil"])))
    c.paint(water, water_texture(c))


def water_texture(c: Canvas) -> np.ndarray:
    ripples = 1 + 0.05 * np.sin(2 * np.pi * np.arange(c.size)[:, None, None] / c.rng.uniform(3, 6))
    return c.material("water") * ripples


def lake(c: Canvas) -> None:
    land_background(c)
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    radius = c.size / 1.45 * math.sqrt(water_fraction(c) / math.pi) * (1 + 0.25 * np.convolve(np.tile(c.rng.standard_normal(48), 3), np.ones(7) / 7, "same")[48:96])
    centre = c.size / 2 + c.rng.uniform(-0.1, 0.1, 2) * c.size
    outline = np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1).astype(np.int32)
    shore, water = c.mask(), c.mask()
    cv2.fillPoly(shore, [outline], 1, cv2.LINE_AA)
    shore = cv2.dilate(shore, np.ones((c.s(4), c.s(4)), np.uint8))
    cv2.fillPoly(water, [outline], 1, cv2.LINE_AA)
    c.paint(shore, c.material(c.rng.choice(["sand", "soil", "grass"])))
    c.paint(water, water_texture(c))
    tree_crowns(c, int(c.rng.integers(0, 25)), region=shore == 0)


def beach(c: Canvas) -> None:
    ys = np.arange(c.size)[:, None]
    xs = np.arange(c.size)[None, :]
    coast = c.size * c.rng.uniform(0.3, 0.55) + c.s(4) * np.sin(2 * np.pi * xs / c.rng.uniform(30, 80) + c.rng.uniform(0, 6))
    sand_width = c.size * c.rng.uniform(0.2, 0.4)
    c.image[:] = c.material(c.rng.choice(["grass", "tree", "concrete", "soil", "dry_crop"]))
    c.paint((ys < coast + sand_width).astype(np.uint8), c.material("sand"))
    c.paint((ys < coast).astype(np.uint8), water_texture(c))
    for k in range(c.rng.integers(2, 5)):  # surf lines parallel to the shore
        offset = c.s(2.5) * (k + 1) + c.rng.uniform(0, 2)
        surf = (np.abs(ys - (coast - offset)) < c.rng.uniform(0.5, 1.2)).astype(np.uint8)
        c.paint(surf, (225, 230, 228))


def desert(c: Canvas) -> None:
    warp = fractal_noise(c.rng, c.size, (2, 4)) * c.s(10)
    wavelength = c.s(c.rng.uniform(9, 22))
    phase = 2 * np.pi * (np.arange(c.size)[:, None] + warp) / wavelength
    ripples = 1 + c.rng.uniform(0.06, 0.14) * np.sin(phase) ** 3
    c.image[:] = c.material(c.rng.choice(["sand", "soil", "dry_crop"], p=[0.6, 0.25, 0.15])) * ripples[..., None]
    for _ in range(c.rng.integers(0, 6)):  # rocks
        x, y = c.rng.integers(0, c.size, 2)
        cv2.circle(c.image, (int(x), int(y)), c.s(c.rng.uniform(1, 3)), shade_colour(c.rng, MATERIALS["soil"], 0.2), -1, cv2.LINE_AA)


def dense_residential(c: Canvas) -> None:
    c.image[:] = c.material(c.rng.choice(["asphalt", "concrete"], p=[0.7, 0.3]))
    block = c.s(c.rng.uniform(22, 34))
    street = c.s(c.rng.uniform(4, 6))
    for by in range(-block, c.size + block, block + street):
        for bx in range(-block, c.size + block, block + street):
            cv2.rectangle(c.image, (bx, by), (bx + block, by + block), shade_colour(c.rng, MATERIALS[c.rng.choice(["concrete", "grass"])]), -1)
            w, h = c.s(c.rng.uniform(6, 9)), c.s(c.rng.uniform(7, 11))
            for y in range(by + 1, by + block - h // 2, h + 1):
                for x in range(bx + 1, bx + block - w // 2, w + 1):
                    if c.rng.random() < 0.85:
                        house(c, (x + w / 2, y + h / 2), (w, h))
    if c.rng.random() < 0.5:
        tree_crowns(c, int(c.rng.integers(0, 10)))


def sparse_residential(c: Canvas) -> None:
    land_background(c)
    xs = np.linspace(-10, c.size + 10, 20)
    ys = c.size * c.rng.uniform(0.35, 0.65) + c.s(12) * np.sin(2 * np.pi * xs / c.rng.uniform(80, 200) + c.rng.uniform(0, 6))
    road(c, np.stack([xs, ys], 1), c.s(5), dashed=False)
    for x in np.arange(c.rng.uniform(0, 15), c.size, c.s(c.rng.uniform(18, 30))):
        y_road = np.interp(x, xs, ys)
        for side in (-1, 1):
            if c.rng.random() < 0.75:
                setback = c.s(c.rng.uniform(11, 16))
                house(c, (x, y_road + side * setback), (c.s(c.rng.uniform(8, 12)), c.s(c.rng.uniform(7, 10))))
                if c.rng.random() < 0.3:  # a pool behind the house
                    px, py = int(x + c.s(6)), int(y_road + side * (setback + c.s(8)))
                    cv2.rectangle(c.image, (px, py), (px + c.s(4), py + c.s(3)), (70, 160, 190), -1)
    tree_crowns(c, int(c.rng.integers(8, 30)))


def parking_lot(c: Canvas) -> None:
    c.image[:] = c.material(c.rng.choice(["asphalt", "concrete"], p=[0.7, 0.3]))
    bay, row_depth, aisle = c.s(3.6), c.s(6), c.s(c.rng.uniform(6, 9))
    occupancy = c.rng.uniform(0.3, 0.95)
    y = int(c.rng.integers(0, aisle))
    while y < c.size:
        for row in range(2):  # a double row of bays facing each other
            top = y + row * row_depth
            cv2.line(c.image, (0, top), (c.size, top), MATERIALS["marking"], 1)
            for x in range(0, c.size, bay):
                cv2.line(c.image, (x, top), (x, top + row_depth), MATERIALS["marking"], 1)
                if c.rng.random() < occupancy:
                    car(c, (x + bay / 2, top + row_depth / 2))
        y += 2 * row_depth + aisle
    if c.rng.random() < 0.4:  # a planted border
        c.image[: c.s(6)] = c.material("grass")[: c.s(6)]


def intersection(c: Canvas) -> None:
    land_background(c)
    width = c.s(c.rng.uniform(8, 14))
    cx, cy = c.size * c.rng.uniform(0.3, 0.7, 2)
    tilt = c.rng.uniform(-0.3, 0.3)
    horizontal = np.array([[-10, cy - tilt * (cx + 10)], [c.size + 10, cy + tilt * (c.size + 10 - cx)]])
    vertical = np.array([[cx + tilt * (cy + 10), -10], [cx - tilt * (c.size + 10 - cy), c.size + 10]])
    for line in (horizontal, vertical):
        road(c, line, width)
    if c.rng.random() < 0.4:  # a third, diagonal road
        road(c, np.array([[-10, -10], [c.size + 10, c.size + 10]]) + c.rng.uniform(-20, 20), c.s(7))
    for _ in range(c.rng.integers(0, 6)):
        t = c.rng.uniform(0, 1)
        line = horizontal if c.rng.random() < 0.5 else vertical
        centre = line[0] + (line[1] - line[0]) * t
        car(c, tuple(centre), along_x=line is horizontal)
    for corner in range(c.rng.integers(0, 4)):
        house(c, c.rng.uniform(0, c.size, 2), (c.s(12), c.s(10)))
    tree_crowns(c, int(c.rng.integers(0, 20)))


def industrial(c: Canvas) -> None:
    c.image[:] = c.material(c.rng.choice(["concrete", "asphalt"]))
    for _ in range(c.rng.integers(6, 12)):
        w, h = c.s(c.rng.uniform(24, 60)), c.s(c.rng.uniform(18, 40))
        x, y = c.rng.integers(c.size // 6 - w // 2, 5 * c.size // 6, 2)
        roof = shade_colour(c.rng, ROOFS[c.rng.integers(len(ROOFS))])
        cv2.rectangle(c.image, (int(x) + 2, int(y) + 2), (int(x + w) + 2, int(y + h) + 2), (50, 50, 52), -1)  # shadow
        cv2.rectangle(c.image, (int(x), int(y)), (int(x + w), int(y + h)), roof, -1)
        for vy in range(int(y) + c.s(4), int(y + h) - 2, c.s(7)):  # rooftop vents
            for vx in range(int(x) + c.s(4), int(x + w) - 2, c.s(7)):
                cv2.rectangle(c.image, (vx, vy), (vx + c.s(1.5), vy + c.s(1.5)), tuple(v * 0.6 for v in roof), -1)
    for _ in range(c.rng.integers(0, 4)):  # storage tanks
        x, y = c.rng.integers(0, c.size, 2)
        r = c.s(c.rng.uniform(4, 8))
        cv2.circle(c.image, (int(x) + 2, int(y) + 2), r, (50, 50, 52), -1, cv2.LINE_AA)
        cv2.circle(c.image, (int(x), int(y)), r, shade_colour(c.rng, (215, 215, 210)), -1, cv2.LINE_AA)
    for _ in range(c.rng.integers(0, 5)):  # trucks
        x, y = c.rng.integers(0, c.size, 2)
        box = cv2.boxPoints(((float(x), float(y)), (c.s(3), c.s(10)), 0.0)).astype(np.int32)
        cv2.fillPoly(c.image, [box], shade_colour(c.rng, CARS[c.rng.integers(len(CARS))]), cv2.LINE_AA)


CLASSES: dict[str, Callable[[Canvas], None]] = {
    "agricultural": agricultural,
    "beach": beach,
    "denseresidential": dense_residential,
    "desert": desert,
    "forest": forest,
    "industrial": industrial,
    "intersection": intersection,
    "lake": lake,
    "meadow": meadow,
    "parkinglot": parking_lot,
    "river": river,
    "sparseresidential": sparse_residential,
}


# -- photographing a scene ---------------------------------------------------------------------


def render_scene(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size`` x ``size`` uint8 RGB scene of class ``name``: paint on a larger canvas,
    rotate by a random angle, crop the centre, then apply a random camera (illumination,
    colour cast, haze, blur, sensor noise, 8-bit quantisation)."""
    big = int(math.ceil(size * math.sqrt(2))) + 4
    canvas = Canvas(big, scale=float(np.exp(rng.uniform(math.log(0.75), math.log(1.35)))) * size / 128, rng=rng)
    CLASSES[name](canvas)
    rotation = cv2.getRotationMatrix2D((big / 2, big / 2), float(rng.uniform(0, 360)), 1.0)
    image = cv2.warpAffine(canvas.image, rotation, (big, big), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    start = (big - size) // 2
    image = image[start : start + size, start : start + size] / 255.0

    image = image * rng.uniform(0.65, 1.35) * np.exp(rng.normal(0, 0.09, 3))  # exposure, colour cast
    haze = rng.uniform(0, 0.2)
    image = image * (1 - haze) + haze * np.array([0.7, 0.75, 0.8]) * rng.uniform(0.8, 1.1)
    blur = rng.uniform(0, 0.9)
    if blur > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    image = image + rng.normal(0, rng.uniform(0.005, 0.025), image.shape)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_builtin_scenes(root: Path, images_per_class: int, size: int, seed: int = 0) -> None:
    """Write every class in UC Merced layout under ``root``; scene ``i`` of class ``k`` uses its
    own seed, so the set does not depend on the order of classes."""
    for k, name in enumerate(CLASSES):
        folder = root / "UCMerced_LandUse" / "Images" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            rng = np.random.default_rng([seed, k, i])
            Image.fromarray(render_scene(name, size, rng)).save(folder / f"{name}{i:02d}.tif", compression="tiff_deflate")


def build_builtin_scenes(images_per_class: int = 100, size: int = 128, seed: int = 0) -> Path:
    """Generate the built-in set once under the cache folder and return its root."""
    params = dict(version=GENERATOR_VERSION, images_per_class=images_per_class, size=size, seed=seed)
    return build_once("scene_builtin", params, lambda root: write_builtin_scenes(root, images_per_class, size, seed))
