"""Built-in indoor rooms, scanned by a simulated laser scanner and written in the raw S3DIS layout.

Each room is assembled from simple solids, every one carrying an S3DIS class:

* structure: floor, ceiling and four walls (slabs) with door and window openings cut out;
  beams across the ceiling and columns in corners or along walls, painted like the walls and
  the ceiling, so only their shape tells them apart;
* openings: windows (frame, mullions, sill and glass that the laser mostly passes through) and
  doors (leaf recessed in the opening, casing, handle), often in the wall's own colour;
* furniture placed plausibly: tables with legs, chairs turned towards the tables, sofas
  against walls, bookcases (carcass, shelves and books of every colour), boards on walls;
* clutter: boxes, bins, plants, monitors and cups on the floor and on tables.

Points come from ray casting (open3d's ``RaycastingScene``) from two or three scanner positions
inside the room, so there is occlusion (nothing behind a bookcase or under a table top is seen),
density falls with range and incidence, and the glass of windows is mostly missed, as with a
real scanner. Range noise is added along each ray; colours get shading by incidence, a room-wide
cast and per-point noise. Colours deliberately overlap between classes (wall, column, beam,
door and board share palettes; chairs and sofas take any colour), so geometry, not only colour
or height, decides the class.

Rooms are written as ``Area_N/<room>/<room>.txt`` and ``Area_N/<room>/Annotations/<class>_<i>.txt``
(``x y z r g b`` per line), the raw Stanford layout, and read back by ``data.s3dis``. Areas 1-4
train, 5 is the test area (as in S3DIS) and 6 validates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from data.base import build_once

S3DIS_CLASSES = (
    "ceiling", "floor", "wall", "beam", "column", "window", "door",
    "table", "chair", "sofa", "bookcase", "board", "clutter",
)  # fmt: skip

GENERATOR_VERSION = 1

# palettes (RGB 0-255); structure colours are shared on purpose
PAINT = [(228, 226, 218), (214, 208, 196), (200, 204, 206), (236, 232, 220), (190, 186, 176), (222, 214, 200)]
FLOORING = [(120, 118, 112), (150, 110, 74), (188, 182, 170), (96, 100, 108), (170, 150, 120)]
WOOD = [(150, 104, 64), (118, 80, 50), (184, 146, 100), (98, 66, 44)]
NEUTRAL = [(40, 40, 42), (90, 92, 96), (160, 162, 164), (232, 232, 230)]
FABRIC = [(46, 64, 120), (150, 40, 42), (60, 110, 70), (80, 80, 84), (180, 150, 110), (30, 30, 32), (120, 60, 110)]
GLASS = (150, 176, 190)
METAL = (172, 174, 178)


@dataclass
class Part:
    """One solid: triangle mesh, class, instance number, base colour, and the chance that a ray
    hitting it returns a point (below 1 for glass)."""

    vertices: np.ndarray
    triangles: np.ndarray
    label: str
    instance: int
    colour: tuple[float, float, float]
    opacity: float = 1.0


def box_mesh(lo, hi, yaw: float = 0.0, pivot=None) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned box [lo, hi] rotated by ``yaw`` about the vertical axis through ``pivot``."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    faces = np.array(
        [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
         [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]
    )  # fmt: skip
    return _rotate(corners, yaw, pivot), faces


def cylinder_mesh(centre, radius: float, height: float, sides: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Closed vertical cylinder standing on ``centre`` (its base centre)."""
    angles = np.arange(sides) * 2 * math.pi / sides
    ring = np.stack([np.cos(angles) * radius, np.sin(angles) * radius, np.zeros(sides)], 1)
    vertices = np.concatenate([ring, ring + [0, 0, height], [[0, 0, 0], [0, 0, height]]]) + np.asarray(centre, float)
    faces = []
    for i in range(sides):
        j = (i + 1) % sides
        faces += [[i, j, sides + j], [i, sides + j, sides + i], [2 * sides, j, i], [2 * sides + 1, sides + i, sides + j]]
    return vertices, np.array(faces)


def sphere_mesh(centre, radius: float, rings: int = 6, sides: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """UV sphere."""
    vertices = [[0, 0, radius]]
    for r in range(1, rings):
        theta = math.pi * r / rings
        for s in range(sides):
            phi = 2 * math.pi * s / sides
            vertices.append([radius * math.sin(theta) * math.cos(phi), radius * math.sin(theta) * math.sin(phi), radius * math.cos(theta)])
    vertices.append([0, 0, -radius])
    faces, last = [], len(vertices) - 1
    for s in range(sides):
        t = (s + 1) % sides
        faces.append([0, 1 + s, 1 + t])
        faces.append([last, 1 + (rings - 2) * sides + t, 1 + (rings - 2) * sides + s])
    for r in range(rings - 2):
        for s in range(sides):
            t = (s + 1) % sides
            a, b, c, d = 1 + r * sides + s, 1 + r * sides + t, 1 + (r + 1) * sides + s, 1 + (r + 1) * sides + t
            faces += [[a, c, d], [a, d, b]]
    return np.asarray(vertices) + np.asarray(centre, float), np.array(faces)


def _rotate(points: np.ndarray, yaw: float, pivot) -> np.ndarray:
    if yaw == 0.0:
        return points
    pivot = np.zeros(3) if pivot is None else np.asarray(pivot, float)
    c, s = math.cos(yaw), math.sin(yaw)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return (points - pivot) @ rotation.T + pivot


class Room:
    """A room under construction: its parts, and a floor-plan occupancy for placing furniture."""

    def __init__(self, rng: np.random.Generator, width: float, depth: float, height: float):
        self.rng = rng
        self.width, self.depth, self.height = width, depth, height
        self.parts: list[Part] = []
        self.instances: dict[str, int] = {}
        self.footprints: list[tuple[float, float, float, float]] = []  # occupied (x0, y0, x1, y1)
        self.wall_paint = PAINT[rng.integers(len(PAINT))]
        self.ceiling_paint = PAINT[rng.integers(len(PAINT))]
        self.wall_spans: dict[int, list[tuple[float, float]]] = {w: [] for w in range(4)}  # used (u0, u1) per wall

    # -- bookkeeping ---------------------------------------------------------------------------
    def new_instance(self, label: str) -> int:
        self.instances[label] = self.instances.get(label, 0) + 1
        return self.instances[label]

    def add(self, mesh, label: str, instance: int, colour, opacity: float = 1.0) -> None:
        vertices, triangles = mesh
        self.parts.append(Part(vertices, triangles, label, instance, tuple(float(c) for c in colour), opacity))

    def jitter(self, colour, amount: float = 12.0):
        return np.clip(np.asarray(colour, float) + self.rng.normal(0, amount, 3), 0, 255)

    def free(self, x0, y0, x1, y1, margin: float = 0.05) -> bool:
        if x0 < -0.01 or y0 < -0.01 or x1 > self.width + 0.01 or y1 > self.depth + 0.01:
            return False
        return all(x1 + margin <= a0 or a1 + margin <= x0 or y1 + margin <= b0 or b1 + margin <= y0 for a0, b0, a1, b1 in self.footprints)

    def wall_free(self, wall: int, u0: float, u1: float, margin: float = 0.15) -> bool:
        length = self.width if wall in (0, 1) else self.depth
        if u0 < 0.25 or u1 > length - 0.25:
            return False
        return all(u1 + margin <= a or b + margin <= u0 for a, b in self.wall_spans[wall])

    def wall_frame(self, wall: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Origin on the floor at the wall's start, unit vector along it, inward normal, its length.
        Walls: 0 at y = 0, 1 at y = depth, 2 at x = 0, 3 at x = width."""
        if wall == 0:
            return np.array([0.0, 0, 0]), np.array([1.0, 0, 0]), np.array([0.0, 1, 0]), self.width
        if wall == 1:
            return np.array([0.0, self.depth, 0]), np.array([1.0, 0, 0]), np.array([0.0, -1, 0]), self.width
        if wall == 2:
            return np.array([0.0, 0, 0]), np.array([0.0, 1, 0]), np.array([1.0, 0, 0]), self.depth
        return np.array([self.width, 0, 0]), np.array([0.0, 1, 0]), np.array([-1.0, 0, 0]), self.depth

    def wall_box(self, wall: int, u0: float, u1: float, z0: float, z1: float, n0: float, n1: float):
        """A box in wall coordinates: along the wall [u0, u1], height [z0, z1], inward [n0, n1]."""
        origin, along, inward, _ = self.wall_frame(wall)
        corners = [origin + along * u + inward * n for u in (u0, u1) for n in (n0, n1)]
        lo = np.minimum.reduce(corners)
        hi = np.maximum.reduce(corners)
        return box_mesh([lo[0], lo[1], z0], [hi[0], hi[1], z1])


# -- structure -------------------------------------------------------------------------------------


def build_shell(room: Room, openings: dict[int, list[tuple[float, float, float, float]]]) -> None:
    """Floor, ceiling and walls 0.15 m thick outside the room, with (u0, u1, z0, z1) holes."""
    rng, h, t = room.rng, room.height, 0.15
    floor_colour = FLOORING[rng.integers(len(FLOORING))]
    room.add(box_mesh([-t, -t, -0.1], [room.width + t, room.depth + t, 0.0]), "floor", room.new_instance("floor"), floor_colour)
    room.add(box_mesh([-t, -t, h], [room.width + t, room.depth + t, h + 0.1]), "ceiling", room.new_instance("ceiling"), room.ceiling_paint)
    for wall in range(4):
        length = room.wall_frame(wall)[3]
        instance = room.new_instance("wall")
        colour = room.jitter(room.wall_paint, 4)
        cuts = sorted(openings.get(wall, []))
        u = -t
        for u0, u1, z0, z1 in cuts:
            room.add(room.wall_box(wall, u, u0, 0, h, -t, 0), "wall", instance, colour)
            if z0 > 0:
                room.add(room.wall_box(wall, u0, u1, 0, z0, -t, 0), "wall", instance, colour)
            room.add(room.wall_box(wall, u0, u1, z1, h, -t, 0), "wall", instance, colour)
            u = u1
        room.add(room.wall_box(wall, u, length + t, 0, h, -t, 0), "wall", instance, colour)


def add_window(room: Room, wall: int, u0: float, u1: float, z0: float, z1: float) -> None:
    """Frame, mullions and sill inside the opening; glass mostly transparent to the laser."""
    rng, instance = room.rng, room.new_instance("window")
    frame = METAL if rng.random() < 0.5 else room.jitter(room.wall_paint, 6)
    recess, f = rng.uniform(-0.12, -0.04), 0.05
    for box in (
        (u0, u0 + f, z0, z1), (u1 - f, u1, z0, z1), (u0, u1, z0, z0 + f), (u0, u1, z1 - f, z1),
    ):  # fmt: skip
        room.add(room.wall_box(wall, *box, recess - 0.04, recess + 0.02), "window", instance, frame)
    for m in range(1, int((u1 - u0) / 0.9) + 1):
        centre = u0 + (u1 - u0) * m / (int((u1 - u0) / 0.9) + 1)
        room.add(room.wall_box(wall, centre - 0.025, centre + 0.025, z0, z1, recess - 0.03, recess + 0.02), "window", instance, frame)
    room.add(room.wall_box(wall, u0 - 0.05, u1 + 0.05, z0 - 0.03, z0, -0.15, rng.uniform(0.03, 0.12)), "window", instance, frame)
    room.add(room.wall_box(wall, u0, u1, z0, z1, recess - 0.01, recess), "window", instance, GLASS, opacity=0.25)


def add_door(room: Room, wall: int, u0: float, u1: float, z1: float) -> None:
    """Leaf recessed in the opening, casing proud of the wall, a handle."""
    rng, instance = room.rng, room.new_instance("door")
    leaf = WOOD[rng.integers(len(WOOD))] if rng.random() < 0.6 else room.jitter(room.wall_paint, 10)
    casing = room.jitter(room.wall_paint, 8) if rng.random() < 0.6 else leaf
    recess = rng.uniform(-0.1, -0.03)
    room.add(room.wall_box(wall, u0, u1, 0, z1, recess - 0.04, recess), "door", instance, leaf)
    for box in ((u0 - 0.07, u0, 0, z1 + 0.07), (u1, u1 + 0.07, 0, z1 + 0.07), (u0, u1, z1, z1 + 0.07)):
        room.add(room.wall_box(wall, *box, -0.02, 0.015), "door", instance, casing)
    side = u1 - 0.12 if rng.random() < 0.5 else u0 + 0.06
    room.add(room.wall_box(wall, side, side + 0.06, 1.0, 1.05, recess, recess + 0.06), "door", instance, METAL)


def add_beams(room: Room) -> None:
    rng = room.rng
    along_x = rng.random() < 0.5
    span = room.depth if along_x else room.width
    count = int(rng.integers(1, 3))
    for i in range(count):
        c = span * (i + 1) / (count + 1) + rng.uniform(-0.3, 0.3)
        w, d = rng.uniform(0.25, 0.45), rng.uniform(0.25, 0.5)
        if along_x:
            lo, hi = [0, c - w / 2, room.height - d], [room.width, c + w / 2, room.height]
        else:
            lo, hi = [c - w / 2, 0, room.height - d], [c + w / 2, room.depth, room.height]
        room.add(box_mesh(lo, hi), "beam", room.new_instance("beam"), room.jitter(room.ceiling_paint, 5))


def add_columns(room: Room) -> None:
    """One or two square columns, in a corner or along a wall, floor to ceiling."""
    rng = room.rng
    for _ in range(int(rng.integers(1, 3))):
        s = rng.uniform(0.3, 0.6)
        wall = int(rng.integers(4))
        length = room.wall_frame(wall)[3]
        u = float(rng.choice([0.0, length - s, rng.uniform(0.5, max(0.6, length - s - 0.5))]))
        if any(u < b + 0.1 and a < u + s + 0.1 for a, b in room.wall_spans[wall]):
            continue
        room.wall_spans[wall].append((u, u + s))
        mesh = room.wall_box(wall, u, u + s, 0, room.height, 0, s * rng.uniform(0.6, 1.0))
        lo, hi = mesh[0].min(0), mesh[0].max(0)
        room.footprints.append((lo[0], lo[1], hi[0], hi[1]))
        room.add(mesh, "column", room.new_instance("column"), room.jitter(room.wall_paint, 5))


def add_board(room: Room) -> None:
    rng = room.rng
    for _ in range(10):
        wall = int(rng.integers(4))
        length = room.wall_frame(wall)[3]
        w = rng.uniform(1.0, min(3.0, length - 1.0))
        u0 = rng.uniform(0.3, length - w - 0.3)
        if room.wall_free(wall, u0, u0 + w):
            break
    else:
        return
    room.wall_spans[wall].append((u0, u0 + w))
    instance, z0 = room.new_instance("board"), rng.uniform(0.8, 1.05)
    z1 = z0 + rng.uniform(0.9, 1.3)
    surface = (236, 238, 236) if rng.random() < 0.6 else (38, 62, 52) if rng.random() < 0.5 else (30, 32, 34)
    room.add(room.wall_box(wall, u0, u0 + w, z0, z1, 0, 0.015), "board", instance, surface)
    for box in ((u0 - 0.03, u0, z0 - 0.03, z1 + 0.03), (u0 + w, u0 + w + 0.03, z0 - 0.03, z1 + 0.03),
                (u0, u0 + w, z0 - 0.03, z0), (u0, u0 + w, z1, z1 + 0.03)):  # fmt: skip
        room.add(room.wall_box(wall, *box, 0, 0.03), "board", instance, METAL)
    room.add(room.wall_box(wall, u0 + 0.1, u0 + w - 0.1, z0 - 0.06, z0 - 0.03, 0, 0.08), "board", instance, METAL)


# -- furniture -------------------------------------------------------------------------------------


def place_against_wall(room: Room, width: float, depth: float, tries: int = 20):
    """A free spot of ``width`` x ``depth`` against a wall: (wall, u0) or None."""
    rng = room.rng
    for _ in range(tries):
        wall = int(rng.integers(4))
        length = room.wall_frame(wall)[3]
        if length < width + 0.6:
            continue
        u0 = rng.uniform(0.3, length - width - 0.3)
        mesh = room.wall_box(wall, u0, u0 + width, 0, 1, 0.0, depth)
        lo, hi = mesh[0].min(0), mesh[0].max(0)
        if room.wall_free(wall, u0, u0 + width, 0.05) and room.free(lo[0], lo[1], hi[0], hi[1]):
            room.wall_spans[wall].append((u0, u0 + width))
            room.footprints.append((lo[0], lo[1], hi[0], hi[1]))
            return wall, u0
    return None


def add_bookcase(room: Room) -> None:
    rng = room.rng
    width, depth, height = rng.uniform(0.8, 2.0), rng.uniform(0.3, 0.42), rng.uniform(1.6, 2.3)
    spot = place_against_wall(room, width, depth)
    if spot is None:
        return
    wall, u0 = spot
    instance = room.new_instance("bookcase")
    colour = WOOD[rng.integers(len(WOOD))] if rng.random() < 0.6 else NEUTRAL[rng.integers(len(NEUTRAL))]
    b = 0.02
    for box in ((u0, u0 + b, 0, height, 0, depth), (u0 + width - b, u0 + width, 0, height, 0, depth),
                (u0, u0 + width, height - b, height, 0, depth), (u0, u0 + width, 0, height, 0, 0.015)):  # fmt: skip
        room.add(room.wall_box(wall, *box[:4], *box[4:]), "bookcase", instance, colour)
    shelves = int(rng.integers(4, 7))
    for s in range(shelves):
        z = 0.05 + (height - 0.1) * s / shelves
        room.add(room.wall_box(wall, u0 + b, u0 + width - b, z, z + b, 0, depth), "bookcase", instance, colour)
        u = u0 + b
        while u < u0 + width - 0.08:  # books: thin boxes of any colour, leaning gaps
            thick = rng.uniform(0.02, 0.06)
            tall = min(rng.uniform(0.15, 0.3), (height - 0.1) / shelves - 0.04)
            if rng.random() < 0.8 and u + thick < u0 + width - b:
                room.add(room.wall_box(wall, u, u + thick, z + b, z + b + tall, 0.02, depth * rng.uniform(0.6, 0.95)),
                         "bookcase", instance, room.jitter(FABRIC[rng.integers(len(FABRIC))], 30))  # fmt: skip
            u += thick + rng.uniform(0.0, 0.02)


def add_sofa(room: Room) -> None:
    rng = room.rng
    width, depth = rng.uniform(1.4, 2.3), rng.uniform(0.8, 0.95)
    spot = place_against_wall(room, width, depth)
    if spot is None:
        return
    wall, u0 = spot
    instance = room.new_instance("sofa")
    colour = room.jitter(FABRIC[rng.integers(len(FABRIC))], 15)
    seat = rng.uniform(0.38, 0.45)
    room.add(room.wall_box(wall, u0, u0 + width, 0.05, seat, 0.0, depth), "sofa", instance, colour)
    room.add(room.wall_box(wall, u0, u0 + width, seat, seat + rng.uniform(0.35, 0.45), 0.0, 0.2), "sofa", instance, colour)
    arm = rng.uniform(0.15, 0.25)
    for a in (u0, u0 + width - arm):
        room.add(room.wall_box(wall, a, a + arm, seat, seat + 0.2, 0.0, depth), "sofa", instance, colour)
    for a in (u0 + 0.05, u0 + width - 0.1):
        room.add(room.wall_box(wall, a, a + 0.05, 0.0, 0.05, 0.05, depth - 0.05), "sofa", instance, NEUTRAL[0])


def add_table(room: Room, x: float, y: float, length: float, width: float, yaw: float) -> Optional[tuple]:
    """A table centred at (x, y); returns its corners' footprint if it fits."""
    rng = room.rng
    corners = _rotate(np.array([[x - length / 2, y - width / 2, 0], [x + length / 2, y + width / 2, 0],
                                [x - length / 2, y + width / 2, 0], [x + length / 2, y - width / 2, 0]]), yaw, [x, y, 0])  # fmt: skip
    lo, hi = corners.min(0), corners.max(0)
    if not room.free(lo[0], lo[1], hi[0], hi[1], margin=0.6):
        return None
    room.footprints.append((lo[0], lo[1], hi[0], hi[1]))
    instance = room.new_instance("table")
    colour = WOOD[rng.integers(len(WOOD))] if rng.random() < 0.5 else NEUTRAL[rng.integers(len(NEUTRAL))]
    top, thick = rng.uniform(0.7, 0.78), rng.uniform(0.025, 0.05)
    room.add(box_mesh([x - length / 2, y - width / 2, top - thick], [x + length / 2, y + width / 2, top], yaw, [x, y, 0]), "table", instance, colour)
    leg_colour = colour if rng.random() < 0.5 else METAL
    if rng.random() < 0.7:
        for sx in (-1, 1):
            for sy in (-1, 1):
                cx, cy = x + sx * (length / 2 - 0.06), y + sy * (width / 2 - 0.06)
                room.add(box_mesh([cx - 0.025, cy - 0.025, 0], [cx + 0.025, cy + 0.025, top - thick], yaw, [x, y, 0]), "table", instance, leg_colour)
    else:  # panel ends
        for sx in (-1, 1):
            cx = x + sx * (length / 2 - 0.05)
            room.add(box_mesh([cx - 0.02, y - width / 2 + 0.05, 0], [cx + 0.02, y + width / 2 - 0.05, top - thick], yaw, [x, y, 0]), "table", instance, leg_colour)
    # clutter on the table: monitors, books, cups
    for _ in range(int(rng.integers(0, 4))):
        px, py = x + rng.uniform(-0.4, 0.4) * length, y + rng.uniform(-0.35, 0.35) * width
        add_clutter_item(room, px, py, top, small=True)
    return lo, hi


def add_chair(room: Room, x: float, y: float, yaw: float) -> None:
    """A chair at (x, y) whose front faces direction ``yaw``."""
    rng = room.rng
    instance = room.new_instance("chair")
    colour = room.jitter(FABRIC[rng.integers(len(FABRIC))] if rng.random() < 0.7 else NEUTRAL[rng.integers(len(NEUTRAL))], 12)
    seat, s = rng.uniform(0.42, 0.5), rng.uniform(0.4, 0.5)
    pivot = [x, y, 0]
    room.add(box_mesh([x - s / 2, y - s / 2, seat - 0.06], [x + s / 2, y + s / 2, seat], yaw, pivot), "chair", instance, colour)
    back = rng.uniform(0.35, 0.5)
    room.add(box_mesh([x - s / 2 - 0.05, y - s / 2, seat], [x - s / 2, y + s / 2, seat + back], yaw, pivot), "chair", instance, colour)
    frame = METAL if rng.random() < 0.6 else NEUTRAL[0]
    if rng.random() < 0.5:
        for sx in (-1, 1):
            for sy in (-1, 1):
                cx, cy = x + sx * (s / 2 - 0.03), y + sy * (s / 2 - 0.03)
                room.add(box_mesh([cx - 0.015, cy - 0.015, 0], [cx + 0.015, cy + 0.015, seat - 0.06], yaw, pivot), "chair", instance, frame)
    else:  # office chair: pedestal and star base
        room.add(cylinder_mesh([x, y, 0.06], 0.03, seat - 0.12, 8), "chair", instance, frame)
        for a in range(5):
            angle = yaw + a * 2 * math.pi / 5
            end = [x + 0.3 * math.cos(angle), y + 0.3 * math.sin(angle)]
            room.add(box_mesh([x, y - 0.02, 0.03], [x + 0.3, y + 0.02, 0.07], angle, [x, y, 0]), "chair", instance, frame)
            room.add(cylinder_mesh([end[0], end[1], 0], 0.025, 0.03, 6), "chair", instance, NEUTRAL[0])
        if rng.random() < 0.5:  # armrests
            for sy in (-1, 1):
                cy = y + sy * (s / 2 + 0.02)
                room.add(box_mesh([x - s / 2, cy - 0.025, seat + 0.18], [x + s / 2 - 0.05, cy + 0.025, seat + 0.22], yaw, pivot), "chair", instance, frame)


def add_clutter_item(room: Room, x: float, y: float, z: float, small: bool = False) -> None:
    rng = room.rng
    instance = room.new_instance("clutter")
    colour = room.jitter([rng.integers(30, 240) for _ in range(3)], 5)
    kind = rng.integers(4)
    if small and kind == 0:  # monitor on a foot
        yaw = rng.uniform(0, 2 * math.pi)
        room.add(box_mesh([x - 0.02, y - 0.25, z + 0.12], [x + 0.02, y + 0.25, z + 0.45], yaw, [x, y, 0]), "clutter", instance, NEUTRAL[0])
        room.add(box_mesh([x - 0.08, y - 0.1, z], [x + 0.08, y + 0.1, z + 0.12], yaw, [x, y, 0]), "clutter", instance, NEUTRAL[0])
    elif kind == 1:  # cylinder: cup, bin, lamp
        r, h = (rng.uniform(0.03, 0.06), rng.uniform(0.08, 0.15)) if small else (rng.uniform(0.12, 0.22), rng.uniform(0.3, 0.6))
        room.add(cylinder_mesh([x, y, z], r, h, 10), "clutter", instance, colour)
    elif kind == 2 and not small:  # plant: pot and foliage
        room.add(cylinder_mesh([x, y, z], 0.14, 0.3, 10), "clutter", instance, colour)
        room.add(sphere_mesh([x, y, z + 0.3 + 0.3], rng.uniform(0.22, 0.35)), "clutter", instance, room.jitter((60, 120, 50), 20))
    else:  # box: carton, printer, books
        a, b, c = (rng.uniform(0.1, 0.3, 3) if small else rng.uniform(0.2, 0.7, 3))
        if small:
            c *= 0.5
        yaw = rng.uniform(0, 2 * math.pi)
        room.add(box_mesh([x - a / 2, y - b / 2, z], [x + a / 2, y + b / 2, z + c], yaw, [x, y, 0]), "clutter", instance, colour)


def furnish(room: Room, kind: str) -> None:
    """Tables with chairs around them, then furniture against walls, then clutter."""
    rng = room.rng
    tables = {"office": int(rng.integers(1, 4)), "conference": 1, "lounge": int(rng.integers(0, 2)), "storage": int(rng.integers(0, 2))}[kind]
    for _ in range(tables):
        length = rng.uniform(2.4, min(4.0, max(2.5, room.width - 2))) if kind == "conference" else rng.uniform(1.0, 1.8)
        width = rng.uniform(1.0, 1.4) if kind == "conference" else rng.uniform(0.6, 0.9)
        yaw = rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.05)
        for _ in range(20):
            x, y = rng.uniform(1.0, room.width - 1.0), rng.uniform(1.0, room.depth - 1.0)
            if add_table(room, x, y, length, width, yaw) is not None:
                # chairs along both long sides, facing the table
                per_side = max(1, int(length / 0.75))
                for side in (-1, 1):
                    for i in range(per_side):
                        if rng.random() < 0.25:
                            continue
                        along = (i + 0.5) / per_side * length - length / 2 + rng.normal(0, 0.05)
                        off = side * (width / 2 + rng.uniform(0.3, 0.45))
                        cx = x + along * math.cos(yaw) - off * math.sin(yaw)
                        cy = y + along * math.sin(yaw) + off * math.cos(yaw)
                        # the chair faces the table: towards -side along the table's normal
                        facing = yaw + (math.pi / 2 if side < 0 else -math.pi / 2) + rng.normal(0, 0.25)
                        if room.free(cx - 0.25, cy - 0.25, cx + 0.25, cy + 0.25, margin=0.0):
                            room.footprints.append((cx - 0.25, cy - 0.25, cx + 0.25, cy + 0.25))
                            add_chair(room, cx, cy, facing)
                break
    wall_items = {
        "office": ["bookcase", "bookcase", "board", "sofa"],
        "conference": ["board", "board", "bookcase"],
        "lounge": ["sofa", "sofa", "sofa", "bookcase"],
        "storage": ["bookcase"] * 4 + ["board"],
    }[kind]
    for item in wall_items:
        if rng.random() < 0.8:
            {"bookcase": add_bookcase, "board": add_board, "sofa": add_sofa}[item](room)
    # loose chairs and floor clutter
    for _ in range(int(rng.integers(0, 3))):
        x, y = rng.uniform(0.5, room.width - 0.5), rng.uniform(0.5, room.depth - 0.5)
        if room.free(x - 0.3, y - 0.3, x + 0.3, y + 0.3):
            room.footprints.append((x - 0.3, y - 0.3, x + 0.3, y + 0.3))
            add_chair(room, x, y, rng.uniform(0, 2 * math.pi))
    for _ in range(int(rng.integers(4, 12))):
        x, y = rng.uniform(0.3, room.width - 0.3), rng.uniform(0.3, room.depth - 0.3)
        if room.free(x - 0.3, y - 0.3, x + 0.3, y + 0.3, margin=0.0):
            room.footprints.append((x - 0.3, y - 0.3, x + 0.3, y + 0.3))
            add_clutter_item(room, x, y, 0.0)


def generate_room(rng: np.random.Generator) -> Room:
    """One furnished room of a random kind and size."""
    kind = str(rng.choice(["office", "office", "conference", "lounge", "storage"]))
    room = Room(rng, rng.uniform(4.0, 7.5), rng.uniform(3.5, 6.5), rng.uniform(2.7, 3.3))
    openings: dict[int, list] = {}
    if rng.random() < 0.6:
        add_columns(room)
    # one or two doors, zero to three windows, on different stretches of wall
    for label, count in (("door", int(rng.integers(1, 3))), ("window", int(rng.integers(0, 4)))):
        for _ in range(count):
            for _ in range(10):
                wall = int(rng.integers(4))
                length = room.wall_frame(wall)[3]
                w = rng.uniform(0.85, 1.0) if label == "door" else rng.uniform(0.9, min(2.6, length - 1))
                u0 = rng.uniform(0.3, length - w - 0.3)
                if room.wall_free(wall, u0 - 0.1, u0 + w + 0.1):
                    room.wall_spans[wall].append((u0 - 0.1, u0 + w + 0.1))
                    if label == "door":
                        z1 = rng.uniform(2.0, 2.15)
                        openings.setdefault(wall, []).append((u0, u0 + w, 0.0, z1))
                        add_door(room, wall, u0, u0 + w, z1)
                        # keep the door's swing free
                        origin, along, inward, _ = room.wall_frame(wall)
                        a, b = origin + along * u0, origin + along * (u0 + w) + inward * 0.9
                        room.footprints.append((min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1])))
                    else:
                        z0 = rng.uniform(0.8, 1.1)
                        z1 = min(room.height - 0.3, z0 + rng.uniform(1.0, 1.6))
                        openings.setdefault(wall, []).append((u0, u0 + w, z0, z1))
                        add_window(room, wall, u0, u0 + w, z0, z1)
                    break
    build_shell(room, openings)
    if rng.random() < 0.5:
        add_beams(room)
    furnish(room, kind)
    return room


# -- scanning --------------------------------------------------------------------------------------


def scan_room(room: Room, rays_per_scan: int, scans: int, range_noise: float = 0.004):
    """Cast rays from ``scans`` scanner positions; returns coordinates (N, 3) float32, colours
    (N, 3) uint8, class names per part and the part index of each point (N,)."""
    import open3d as o3d

    rng = room.rng
    scene = o3d.t.geometry.RaycastingScene()
    for part in room.parts:
        scene.add_triangles(o3d.core.Tensor(part.vertices.astype(np.float32)), o3d.core.Tensor(part.triangles.astype(np.uint32)))
    # Fibonacci sphere of directions, randomly rotated per scan
    i = np.arange(rays_per_scan) + 0.5
    polar = np.arccos(1 - 2 * i / rays_per_scan)
    azimuth = math.pi * (1 + 5**0.5) * i
    directions = np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], 1)
    coords, parts, normals, origins = [], [], [], []
    for _ in range(scans):
        for _ in range(50):  # a scanner position in free floor space
            x, y = rng.uniform(0.6, room.width - 0.6), rng.uniform(0.6, room.depth - 0.6)
            if room.free(x - 0.2, y - 0.2, x + 0.2, y + 0.2, margin=0.0):
                break
        origin = np.array([x, y, rng.uniform(1.2, 1.8)])
        spin = rng.uniform(0, 2 * math.pi)
        d = _rotate(directions, spin, None)
        rays = np.concatenate([np.broadcast_to(origin, d.shape), d], 1).astype(np.float32)
        hit = scene.cast_rays(o3d.core.Tensor(rays))
        t = hit["t_hit"].numpy()
        ok = np.isfinite(t) & (t < 20)
        part = hit["geometry_ids"].numpy().astype(np.int64)[ok]
        distance = t[ok] + rng.normal(0, range_noise, ok.sum())
        coords.append(origin + d[ok] * distance[:, None])
        parts.append(part)
        normals.append(hit["primitive_normals"].numpy()[ok])
        origins.append(np.broadcast_to(-d[ok], (ok.sum(), 3)))
    coord, part, normal, towards = (np.concatenate(x) for x in (coords, parts, normals, origins))
    keep = rng.random(len(part)) < np.array([p.opacity for p in room.parts])[part]
    coord, part, normal, towards = coord[keep], part[keep], normal[keep], towards[keep]
    # colour: base colour, shaded by incidence, a room-wide cast and per-point noise
    base = np.array([p.colour for p in room.parts])[part]
    incidence = np.abs((normal * towards).sum(1))
    cast = rng.normal(1.0, 0.04, 3)
    colour = base * (0.7 + 0.3 * incidence)[:, None] * cast * rng.uniform(0.85, 1.1) + rng.normal(0, 6, base.shape)
    return coord.astype(np.float32), np.clip(colour, 0, 255).round().astype(np.uint8), part


def write_raw_room(folder: Path, name: str, room: Room, coord: np.ndarray, colour: np.ndarray, part: np.ndarray) -> None:
    """``folder/<name>/<name>.txt`` (whole room) and ``Annotations/<class>_<i>.txt`` per instance."""
    room_dir = folder / name
    (room_dir / "Annotations").mkdir(parents=True)
    rows = np.concatenate([coord.astype(np.float64), colour.astype(np.float64)], 1)
    fmt = "%.3f %.3f %.3f %d %d %d"
    np.savetxt(room_dir / f"{name}.txt", rows, fmt=fmt)
    keys = np.array([f"{p.label}_{p.instance}" for p in room.parts])[part]
    for key in sorted(set(keys)):
        np.savetxt(room_dir / "Annotations" / f"{key}.txt", rows[keys == key], fmt=fmt)


AREA_ROOMS = {1: 8, 2: 8, 3: 8, 4: 8, 5: 6, 6: 4}


def build_builtin_s3dis(rooms_per_area: Optional[dict[int, int]] = None, rays_per_scan: int = 30000, seed: int = 0) -> Path:
    """Generate (once) the built-in rooms in the raw S3DIS layout; returns the root folder."""
    rooms_per_area = dict(rooms_per_area or AREA_ROOMS)
    params = {"version": GENERATOR_VERSION, "rooms": {str(k): v for k, v in sorted(rooms_per_area.items())}, "rays": rays_per_scan, "seed": seed}

    def write(folder: Path) -> None:
        for area, count in sorted(rooms_per_area.items()):
            for index in range(count):
                rng = np.random.default_rng([seed, area, index])
                room = generate_room(rng)
                coord, colour, part = scan_room(room, rays_per_scan, scans=int(rng.integers(2, 4)))
                write_raw_room(folder / f"Area_{area}", f"room_{index + 1}", room, coord, colour, part)

    return build_once("builtin_s3dis_rooms", params, write)
