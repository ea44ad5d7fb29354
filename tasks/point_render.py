"""Pictures of point clouds without a display: an orthographic, oblique view with a z-buffer.

A room is seen from above at an angle with its top quarter (ceiling, beams, upper walls) cut
away, the way S3DIS results are usually shown, so the furniture is visible. Each point is drawn
as a small square; the nearest point wins each pixel, and points are shaded by depth so that
the layout reads in 3D. Pure torch, deterministic, no window system or GPU renderer needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def render_points(
    coord: torch.Tensor,
    colour: torch.Tensor,
    height: int = 240,
    width: int = 320,
    elevation: float = 55.0,
    azimuth: float = -35.0,
    cut_top: float = 0.25,
    point_size: int = 2,
) -> torch.Tensor:
    """Render points (N, 3) with colours (N, 3) in [0, 1] into a (3, height, width) image in [0, 1].

    Args:
        elevation / azimuth: viewing direction in degrees (90 = straight down).
        cut_top: fraction of the vertical extent removed from the top (0 keeps everything).
        point_size: side of the square drawn per point, in pixels.
    """
    # pictures are drawn in float32 on the CPU even inside a mixed-precision step
    with torch.autocast("cpu", enabled=False):
        return _render(coord.detach().float().cpu(), colour.detach().float().cpu().clamp(0, 1), height, width,
                       elevation, azimuth, cut_top, point_size)  # fmt: skip


def _render(coord, colour, height, width, elevation, azimuth, cut_top, point_size) -> torch.Tensor:
    image = torch.ones(3, height, width)
    if len(coord) == 0:
        return image
    z = coord[:, 2]
    keep = z <= z.max() - cut_top * (z.max() - z.min())
    coord, colour = coord[keep], colour[keep]
    if len(coord) == 0:
        return image
    coord = coord - coord.mean(0)
    a, e = math.radians(azimuth), math.radians(elevation)
    spin = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    tilt = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.sin(e), math.cos(e)], [0.0, -math.cos(e), math.sin(e)]])
    view = coord @ spin.T @ tilt.T  # x right, y up on screen, z towards the viewer
    lo, hi = view[:, :2].min(0).values, view[:, :2].max(0).values
    scale = 0.94 * min((width - point_size) / max(float(hi[0] - lo[0]), 1e-6), (height - point_size) / max(float(hi[1] - lo[1]), 1e-6))
    centre = (lo + hi) / 2
    u = ((view[:, 0] - centre[0]) * scale + width / 2).long()
    v = (height / 2 - (view[:, 1] - centre[1]) * scale).long()
    depth = view[:, 2]
    shade = 0.7 + 0.3 * (depth - depth.min()) / (depth.max() - depth.min()).clamp_min(1e-6)
    shaded = colour * shade.unsqueeze(1)
    offsets = torch.arange(point_size) - point_size // 2
    du, dv = torch.meshgrid(offsets, offsets, indexing="ij")
    pu = (u.unsqueeze(1) + du.reshape(1, -1)).reshape(-1)
    pv = (v.unsqueeze(1) + dv.reshape(1, -1)).reshape(-1)
    point = torch.arange(len(u)).repeat_interleave(point_size**2)
    inside = (pu >= 0) & (pu < width) & (pv >= 0) & (pv < height)
    pixel, point = pv[inside] * width + pu[inside], point[inside]
    nearest = torch.full((height * width,), float("-inf")).scatter_reduce(0, pixel, depth[point], reduce="amax")
    front = depth[point] >= nearest[pixel]
    flat = image.view(3, -1)
    flat[:, pixel[front]] = shaded[point[front]].T
    return image


def side_by_side(images: list[torch.Tensor], gap: int = 4) -> torch.Tensor:
    """Concatenate (3, H, W) images left to right with white gaps."""
    return torch.cat([F.pad(image, (0, gap), value=1.0) for image in images[:-1]] + [images[-1]], dim=2)
