"""Sparse voxel grids by hashing integer coordinates: no dense 3D grid is ever allocated.

A voxel is identified by one int64 key packing ``(cloud, x, y, z)``: 15 bits for the cloud and
16 bits per axis (coordinates are relative to each cloud's minimum, so a cloud may span 65 535
voxels per axis: 1.3 km at 2 cm). Everything below is ``torch.unique`` / ``torch.sort`` /
``torch.searchsorted`` over those keys, so it runs unchanged on CPU and CUDA, and memory grows
with the number of occupied voxels only.

* ``grid_sample``: one point per voxel (random, or the i-th point of each voxel for test-time
  voting), as the data pipeline and the voting protocol of ConDaFormer's code base do.
* ``voxelize``: cluster points into voxels (inverse map and counts).
* ``neighbour_table``: for every voxel, the index of the voxel at each kernel offset (-1 where
  empty): what a sub-manifold sparse convolution gathers from.
* ``coarsen``: the voxel grid at twice the size, with the parent of each voxel and the (up to 8)
  children of each coarse voxel: grid pooling and unpooling between U-Net stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

COORD_BITS = 16
MAX_COORD = (1 << COORD_BITS) - 1
MAX_CLOUDS = (1 << (63 - 3 * COORD_BITS)) - 1
_MASK = (1 << COORD_BITS) - 1


def pack_keys(batch: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(N,) cloud index and (N, 3) non-negative integer coordinates -> (N,) int64 keys.

    Keys sort by cloud, then x, then y, then z.
    """
    grid = grid.long()
    if grid.numel() and (int(grid.min()) < 0 or int(grid.max()) > MAX_COORD):
        raise ValueError(
            f"voxel coordinates span [{int(grid.min())}, {int(grid.max())}]; at most {MAX_COORD} voxels per axis "
            "fit the hash (use a larger voxel size or crop the cloud)"
        )
    if batch.numel() and int(batch.max()) > MAX_CLOUDS:
        raise ValueError(f"at most {MAX_CLOUDS + 1} clouds (or windows per voxel) fit the hash")
    return (
        (batch.long() << (3 * COORD_BITS))
        | (grid[:, 0] << (2 * COORD_BITS))
        | (grid[:, 1] << COORD_BITS)
        | grid[:, 2]
    )


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_keys``: (cloud index (N,), coordinates (N, 3))."""
    grid = torch.stack([(keys >> (2 * COORD_BITS)) & _MASK, (keys >> COORD_BITS) & _MASK, keys & _MASK], dim=1)
    return keys >> (3 * COORD_BITS), grid


def kernel_offsets(size: int = 3, device: Optional[torch.device] = None) -> torch.Tensor:
    """The ``size**3`` integer offsets of a cubic kernel, (K, 3), x slowest and z fastest.

    This is the order of ``torch.nn.Conv3d``'s kernel axes (weight[..., dx, dy, dz]); the centre is
    offset number ``K // 2`` and offset ``K - 1 - k`` is the mirror image of offset ``k``.
    """
    r = torch.arange(size, device=device) - size // 2
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


def cloud_minimum(coord: torch.Tensor, batch: torch.Tensor, num_clouds: int) -> torch.Tensor:
    """Per-cloud minimum of the coordinates, (B, 3)."""
    index = batch.unsqueeze(1).expand_as(coord)
    start = torch.full((num_clouds, 3), float("inf"), dtype=coord.dtype, device=coord.device)
    return start.scatter_reduce(0, index, coord, reduce="amin", include_self=True)


def grid_coordinates(coord: torch.Tensor, batch: torch.Tensor, voxel_size: float, num_clouds: int) -> torch.Tensor:
    """Continuous coordinates in voxel units, shifted per cloud so that the smallest occupied
    voxel index is 0 on every axis, (N, 3).

    ``floor`` of them is the integer voxel coordinate; the fractional part is the position inside
    the voxel, which the relative position encoding uses. Voxel boundaries sit at multiples of
    ``voxel_size`` in the input frame, so any subset of a cloud (one point kept per voxel, a crop)
    gets the same voxels as the whole cloud, up to a whole-voxel shift.
    """
    scaled = coord / voxel_size
    origin = cloud_minimum(torch.floor(scaled), batch, num_clouds)
    return scaled - origin[batch]


def grid_sample(
    coord: torch.Tensor,
    batch: torch.Tensor,
    voxel_size: float,
    generator: Optional[torch.Generator] = None,
    index: Optional[int] = None,
    num_clouds: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep one point per occupied voxel.

    With ``index=None`` the kept point is random (``generator``), as in training. With
    ``index=i`` it is the i-th point of each voxel (in input order, cycling when a voxel has fewer),
    so ``i = 0, 1, ...`` are the distinct samplings that test-time voting averages over.

    Returns ``kept`` (M,), indices into the points sorted by voxel, and ``inverse`` (N,), the
    position in ``kept`` of each point's voxel.
    """
    num_clouds = num_clouds if num_clouds is not None else int(batch.max()) + 1 if batch.numel() else 0
    grid = torch.floor(grid_coordinates(coord, batch, voxel_size, num_clouds)).long()
    keys = pack_keys(batch, grid)
    if index is None:
        perm = torch.randperm(len(keys), generator=generator, device=keys.device)
        sorted_keys, order = torch.sort(keys[perm], stable=True)
        order = perm[order]
    else:
        sorted_keys, order = torch.sort(keys, stable=True)
    _, run, counts = torch.unique_consecutive(sorted_keys, return_inverse=True, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    pick = 0 if index is None else torch.remainder(torch.full_like(counts, index), counts)
    kept = order[start + pick]
    inverse = torch.empty_like(run)
    inverse[order] = run
    return kept, inverse


@dataclass
class Voxels:
    """Occupied voxels of a batch, sorted by key.

    ``grid`` (M, 3) int64, ``batch`` (M,), ``keys`` (M,) sorted, ``inverse`` (N,) voxel of each
    input element, ``counts`` (M,) input elements per voxel.
    """

    grid: torch.Tensor
    batch: torch.Tensor
    keys: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor


def voxelize(grid: torch.Tensor, batch: torch.Tensor) -> Voxels:
    """Group elements with equal (cloud, integer coordinates) into voxels."""
    keys, inverse, counts = torch.unique(pack_keys(batch, grid), sorted=True, return_inverse=True, return_counts=True)
    voxel_batch, voxel_grid = unpack_keys(keys)
    return Voxels(voxel_grid, voxel_batch, keys, inverse, counts)


def neighbour_table(voxels: Voxels, offsets: torch.Tensor) -> torch.Tensor:
    """Index of the voxel at ``grid + offsets[k]`` for every voxel and offset, (M, K); -1 if empty.

    One ``searchsorted`` of all M * K query keys in the sorted keys: O(M K log M), no dense grid.
    """
    query = voxels.grid.unsqueeze(1) + offsets.to(voxels.grid.device).unsqueeze(0)  # (M, K, 3)
    inside = ((query >= 0) & (query <= MAX_COORD)).all(-1)
    query = query.clamp(0, MAX_COORD)
    query_keys = pack_keys(voxels.batch.unsqueeze(1).expand_as(inside).reshape(-1), query.reshape(-1, 3))
    found = torch.searchsorted(voxels.keys, query_keys).clamp_max(len(voxels.keys) - 1)
    hit = (voxels.keys[found] == query_keys) & inside.reshape(-1)
    return torch.where(hit, found, torch.full_like(found, -1)).view(inside.shape)


@dataclass
class CoarseVoxels:
    """The next coarser grid: ``voxels`` at twice the size, ``parent`` (M_fine,) and
    ``children`` (M_coarse, 8) (fine voxel in each octant, -1 where empty)."""

    voxels: Voxels
    parent: torch.Tensor
    children: torch.Tensor


def coarsen(fine: Voxels) -> CoarseVoxels:
    """Voxels of twice the size (integer coordinates halved), with the parent/children maps."""
    coarse = voxelize(torch.div(fine.grid, 2, rounding_mode="floor"), fine.batch)
    octant = (fine.grid[:, 0] % 2) * 4 + (fine.grid[:, 1] % 2) * 2 + fine.grid[:, 2] % 2
    children = torch.full((len(coarse.keys), 8), -1, dtype=torch.long, device=fine.grid.device)
    children[coarse.inverse, octant] = torch.arange(len(fine.keys), device=fine.grid.device)
    return CoarseVoxels(coarse, coarse.inverse, children)
