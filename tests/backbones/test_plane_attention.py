"""Disassembled plane-window and cubic-window attention against a naive per-voxel reference."""

import math

import pytest
import torch

from backbones.ops.plane_attention import (
    PlaneWindowAttention,
    partition_windows,
    token_positions,
    window_shapes,
)


def tiny_cloud(n_per_cloud=(40, 25), extent=8, seed=0):
    """Distinct random voxels in two clouds, with continuous centres inside their voxels."""
    g = torch.Generator().manual_seed(seed)
    grids, batches = [], []
    for b, n in enumerate(n_per_cloud):
        cells = torch.randperm(extent**3, generator=g)[:n]
        grids.append(torch.stack([cells // extent**2, (cells // extent) % extent, cells % extent], 1))
        batches.append(torch.full((n,), b))
    grid, batch = torch.cat(grids), torch.cat(batches)
    positions = grid + torch.rand(grid.shape, generator=g) * 0.999
    return grid, batch, positions


def naive_attention(layer: PlaneWindowAttention, q, k, v, grid, batch, positions):
    """Voxel by voxel: find the voxels in the same window of each plane, attend, add the RPE terms."""
    m, heads, d = q.shape
    per_group = heads // layer.groups
    centre = (layer.q_table.shape[0] - 1) // 2
    out = torch.zeros(m, heads, d)
    for g, shape in enumerate(layer.shapes):
        size = torch.tensor(shape, dtype=torch.float64)
        shift = size / 2 if layer.shift else torch.zeros(3, dtype=torch.float64)
        window = torch.floor((grid.double() + shift) / size)
        local = torch.floor(torch.remainder(positions.double() + shift, size) / layer.quant_size).long()
        group_heads = slice(g * per_group, (g + 1) * per_group)
        for i in range(m):
            mates = ((batch == batch[i]) & (window == window[i]).all(1)).nonzero()[:, 0]
            rel = local[i] - local[mates] + centre  # (J, 3)
            qi, kj, vj = q[i, group_heads], k[mates, group_heads], v[mates, group_heads]  # (h, d), (J, h, d)
            logits = (kj * qi).sum(-1)  # (J, h)
            values = vj.clone()
            for axis in range(3):
                logits = logits + (layer.q_table[rel[:, axis], axis] * qi).sum(-1)
                logits = logits + (layer.k_table[rel[:, axis], axis] * kj).sum(-1)
                values = values + layer.v_table[rel[:, axis], axis]
            weights = torch.softmax(logits, 0)  # over the window's voxels
            out[i, group_heads] = (weights[..., None] * values).sum(0)
    return out


@pytest.mark.parametrize("kind,shift,window", [("plane", False, 4), ("plane", True, 4), ("cubic", False, 3), ("cubic", True, 4)])
def test_window_attention_matches_naive_per_voxel_reference(kind, shift, window):
    torch.manual_seed(0)
    grid, batch, positions = tiny_cloud()
    heads = 6 if kind == "plane" else 2
    layer = PlaneWindowAttention(heads, head_dim=4, window_size=window, quant_size=0.5, kind=kind, shift=shift)
    for table in (layer.q_table, layer.k_table, layer.v_table):
        torch.nn.init.normal_(table, std=0.5)  # large enough that a wrong index shows
    q, k, v = (torch.randn(len(grid), heads, 4) for _ in range(3))
    tables = layer.partition(grid, batch)
    got = layer(q, k, v, positions, tables)
    expected = naive_attention(layer, q, k, v, grid, batch, positions)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # one table padded to the fullest window (the ONNX layout) gives the same result
    torch.testing.assert_close(layer(q, k, v, positions, layer.partition(grid, batch, bucketed=False)), got, atol=1e-5, rtol=1e-5)


def test_partition_holds_every_token_once_and_windows_are_planar():
    grid, batch, _ = tiny_cloud()
    shapes = window_shapes("plane", 4)
    tables = partition_windows(grid, batch, shapes, shift=True)
    tokens = torch.cat([t[t >= 0] for t in tables])
    assert torch.equal(tokens.sort().values, torch.arange(3 * len(grid)))
    assert all(t.shape[1] & (t.shape[1] - 1) == 0 for t in tables)  # power-of-two lengths
    for table in tables:
        for row in table:
            members = row[row >= 0]
            voxel, group = members // 3, members % 3
            assert (group == group[0]).all() and (batch[voxel] == batch[voxel[0]]).all()
            thin_axis = 2 - int(group[0])  # xy-plane windows are one voxel thick in z, and so on
            assert (grid[voxel, thin_axis] == grid[voxel[0], thin_axis]).all()
            assert len(members) <= 16
    positions = token_positions(tables, 3 * len(grid))
    flat = torch.cat([t.reshape(-1) for t in tables])
    assert torch.equal(flat[positions], torch.arange(3 * len(grid)))


def test_plane_windows_hold_fewer_voxels_than_the_cube_they_disassemble():
    # a dense 8x8x8 block: one cube window holds 512 voxels, a plane window 64
    r = torch.arange(8)
    grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    batch = torch.zeros(len(grid), dtype=torch.long)
    planes = partition_windows(grid, batch, window_shapes("plane", 8), shift=False)
    (cube,) = partition_windows(grid, batch, window_shapes("cubic", 8), shift=False)
    # one bucket per plane orientation (head group), 8 windows of 64 voxels each
    assert [table.shape for table in planes] == [(8, 64)] * 3 and cube.shape == (1, 512)
    assert [sorted({int(t) % 3 for t in table.flatten()}) for table in planes] == [[0], [1], [2]]


def test_heads_must_split_into_three_planes():
    with pytest.raises(ValueError, match="3 groups"):
        PlaneWindowAttention(4, 8, 4)


def test_attention_stays_float32_under_bfloat16_autocast():
    grid, batch, positions = tiny_cloud((40,))
    layer = PlaneWindowAttention(3, 4, 4, quant_size=1.0)
    q, k, v = (torch.randn(len(grid), 3, 4) for _ in range(3))
    tables = layer.partition(grid, batch)
    reference = layer(q, k, v, positions, tables)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(q, k, v, positions, tables)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference)
    assert torch.isfinite(mixed).all()
