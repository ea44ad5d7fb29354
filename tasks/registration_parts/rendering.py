"""Pictures of a registration pair: orthographic renders of two clouds in two colours.

``pair_panel`` draws, side by side, the pair as given (source orange, target blue), the source
moved by the estimated transform, and by the ground truth, all from the same oblique viewpoint
and scale, so a good registration looks like the third picture. Points are splatted with a
z-buffer (nearest point wins) and shaded by depth; plain torch, no display or GPU needed.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

SOURCE_COLOUR = (0.95, 0.55, 0.10)
TARGET_COLOUR = (0.15, 0.45, 0.85)


def view_rotation(azimuth_degrees: float = 35.0, elevation_degrees: float = 55.0) -> torch.Tensor:
    """Rotation taking world coordinates to view coordinates (x right, y up, z towards the viewer)."""
    a, e = math.radians(azimuth_degrees), math.radians(elevation_degrees)
    turn = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    tilt = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(e), -math.sin(e)], [0.0, math.sin(e), math.cos(e)]])
    return tilt @ turn


@torch.autocast("cpu", enabled=False)  # drawn in float32 even inside a bf16-mixed step
def render_points(
    clouds: list[tuple[torch.Tensor, tuple[float, float, float]]],
    rotation: torch.Tensor,
    centre: torch.Tensor,
    extent: float,
    size: int = 160,
    point_size: int = 2,
) -> torch.Tensor:
    """Orthographic render (3, size, size) in [0, 1] of coloured clouds on white.

    ``centre`` and ``extent`` (the half-width of the visible square) are in view coordinates.
    """
    image = torch.ones(3, size, size)
    depth = torch.full((size, size), -math.inf)
    for points, colour in clouds:
        if len(points) == 0:
            continue
        view = (points.detach().float().cpu() @ rotation.T) - centre
        pixel = ((view[:, :2] / extent + 1) * 0.5 * (size - 1)).round().long()
        rows, cols = size - 1 - pixel[:, 1], pixel[:, 0]
        z = view[:, 2]
        low, high = z.min(), z.max()
        shade = 0.55 + 0.45 * (z - low) / (high - low).clamp_min(1e-6)  # nearer is brighter
        rgb = torch.tensor(colour).unsqueeze(1) * shade.unsqueeze(0)
        for dr in range(point_size):
            for dc in range(point_size):
                r, c = rows + dr, cols + dc
                inside = (r >= 0) & (r < size) & (c >= 0) & (c < size)
                r, c, zz, colours = r[inside], c[inside], z[inside], rgb[:, inside]
                order = torch.argsort(zz)  # far to near: later writes (nearer) win
                r, c, zz, colours = r[order], c[order], zz[order], colours[:, order]
                flat = r * size + c
                nearer = zz > depth.view(-1)[flat]
                flat, zz, colours = flat[nearer], zz[nearer], colours[:, nearer]
                depth.view(-1)[flat] = zz
                image.view(3, -1)[:, flat] = colours
    return image


def _caption(image: torch.Tensor, text: str) -> torch.Tensor:
    pixels = Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    ImageDraw.Draw(pixels).text((4, 2), text, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(pixels).copy()).permute(2, 0, 1).float() / 255


@torch.autocast("cpu", enabled=False)
def pair_panel(
    source: torch.Tensor,
    target: torch.Tensor,
    estimate: torch.Tensor,
    truth: Optional[torch.Tensor],
    size: int = 160,
    captions: tuple[str, str, str] = ("input", "estimate", "ground truth"),
) -> torch.Tensor:
    """Before | after (estimate) | after (ground truth), as one (3, size, 3 * size + 8) picture."""
    from tasks.registration_parts.rigid import apply_transform

    rotation = view_rotation()
    moved = apply_transform(estimate.float().cpu(), source.float().cpu())
    reference = apply_transform(truth.float().cpu(), source.float().cpu()) if truth is not None else moved
    framing = torch.cat([target.float().cpu(), reference]) @ rotation.T
    centre = (framing.amax(0) + framing.amin(0)) / 2
    extent = float((framing.amax(0) - framing.amin(0))[:2].max() / 2 * 1.05) or 1.0
    before_view = torch.cat([source.float().cpu(), target.float().cpu()]) @ rotation.T
    before_centre = (before_view.amax(0) + before_view.amin(0)) / 2
    before_extent = float((before_view.amax(0) - before_view.amin(0))[:2].max() / 2 * 1.05) or 1.0
    pictures = [
        render_points([(target, TARGET_COLOUR), (source, SOURCE_COLOUR)], rotation, before_centre, before_extent, size),
        render_points([(target, TARGET_COLOUR), (moved, SOURCE_COLOUR)], rotation, centre, extent, size),
    ]
    if truth is not None:
        pictures.append(render_points([(target, TARGET_COLOUR), (reference, SOURCE_COLOUR)], rotation, centre, extent, size))
    pictures = [_caption(p, text) for p, text in zip(pictures, captions)]
    gap = torch.ones(3, size, 4)
    return torch.cat([x for p in pictures for x in (p, gap)][:-1], dim=2)
