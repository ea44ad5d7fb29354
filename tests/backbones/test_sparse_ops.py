"""Voxel hashing and sub-manifold sparse convolution against dense references."""

import pytest
import torch
import torch.nn.functional as F

from backbones.ops.sparse_conv import SubMConv3d, _sparse_conv_forward, sparse_conv
from backbones.ops.voxel_hash import (
    coarsen,
    grid_coordinates,
    grid_sample,
    kernel_offsets,
    neighbour_table,
    pack_keys,
    unpack_keys,
    voxelize,
)


def full_grid(size: int) -> torch.Tensor:
    r = torch.arange(size)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def test_keys_round_trip_and_sort_by_cloud_then_xyz():
    g = torch.Generator().manual_seed(0)
    grid = torch.randint(0, 65536, (500, 3), generator=g)
    batch = torch.randint(0, 300, (500,), generator=g)
    keys = pack_keys(batch, grid)
    back_batch, back_grid = unpack_keys(keys)
    assert torch.equal(back_batch, batch) and torch.equal(back_grid, grid)
    order = torch.argsort(keys)
    lexicographic = sorted(range(500), key=lambda i: (int(batch[i]), *grid[i].tolist()))
    assert order.tolist() == lexicographic


def test_keys_refuse_coordinates_outside_the_hash():
    with pytest.raises(ValueError, match="voxels per axis"):
        pack_keys(torch.zeros(1, dtype=torch.long), torch.tensor([[0, 70000, 0]]))


def test_voxelize_groups_points_and_inverse_maps_back():
    coord = torch.tensor([[0.01, 0.02, 0.0], [0.03, 0.01, 0.04], [0.11, 0.0, 0.0], [0.01, 0.02, 0.0]])
    batch = torch.tensor([0, 0, 0, 1])
    grid = torch.floor(grid_coordinates(coord, batch, 0.05, 2)).long()
    voxels = voxelize(grid, batch)
    assert len(voxels.keys) == 3  # points 0 and 1 share a voxel; cloud 1 has its own
    assert voxels.counts.tolist() == [2, 1, 1]
    assert torch.equal(voxels.grid[voxels.inverse], grid) and torch.equal(voxels.batch[voxels.inverse], batch)


def test_grid_coordinates_of_a_subset_fall_in_the_same_voxels():
    coord = torch.rand(400, 3) * 2 - 0.7
    batch = torch.zeros(400, dtype=torch.long)
    kept, _ = grid_sample(coord, batch, 0.1, generator=torch.Generator().manual_seed(0))
    full = torch.floor(grid_coordinates(coord, batch, 0.1, 1))[kept]
    subset = torch.floor(grid_coordinates(coord[kept], batch[kept], 0.1, 1))
    assert torch.equal(full - full.min(0).values, subset)
    assert len(torch.unique(pack_keys(batch[kept], subset.long()))) == len(kept)  # one point per voxel


def test_grid_sample_cycles_through_every_point_of_each_voxel():
    coord = torch.tensor([[0.0, 0, 0], [0.01, 0, 0], [0.02, 0, 0], [0.5, 0, 0]])
    batch = torch.zeros(4, dtype=torch.long)
    seen = set()
    for index in range(3):
        kept, inverse = grid_sample(coord, batch, 0.1, index=index)
        assert len(kept) == 2 and torch.equal(kept[inverse][3:], torch.tensor([3]))
        seen.update(kept.tolist())
    assert seen == {0, 1, 2, 3}


def test_neighbour_table_matches_brute_force_lookup():
    g = torch.Generator().manual_seed(1)
    grid = torch.unique(torch.randint(0, 6, (120, 3), generator=g), dim=0)
    batch = torch.zeros(len(grid), dtype=torch.long)
    voxels = voxelize(grid, batch)
    table = neighbour_table(voxels, kernel_offsets(3))
    lookup = {tuple(c.tolist()): i for i, c in enumerate(voxels.grid)}
    for i, cell in enumerate(voxels.grid):
        for k, offset in enumerate(kernel_offsets(3)):
            assert table[i, k].item() == lookup.get(tuple((cell + offset).tolist()), -1)


def test_neighbour_table_never_crosses_clouds():
    grid = torch.tensor([[1, 1, 1], [1, 1, 2]])
    voxels = voxelize(grid, torch.tensor([0, 1]))
    table = neighbour_table(voxels, kernel_offsets(3))
    assert (table[:, 13] == torch.arange(2)).all() and (table.sum(1) == torch.arange(2) - 26).all()


def test_coarsen_parent_and_children_are_inverse():
    grid = full_grid(5)
    fine = voxelize(grid, torch.zeros(len(grid), dtype=torch.long))
    coarse = coarsen(fine)
    assert len(coarse.voxels.keys) == 27
    assert torch.equal(coarse.voxels.grid[coarse.parent], torch.div(fine.grid, 2, rounding_mode="floor"))
    for c, children in enumerate(coarse.children):
        members = children[children >= 0]
        assert (coarse.parent[members] == c).all()
    assert (coarse.children >= 0).sum() == len(grid)


@pytest.mark.parametrize("depthwise", [False, True])
def test_sparse_conv_matches_dense_conv3d_on_a_fully_occupied_grid(depthwise):
    torch.manual_seed(0)
    size, cin, cout = 5, 3, 3 if depthwise else 4
    grid = full_grid(size)
    voxels = voxelize(grid, torch.zeros(len(grid), dtype=torch.long))
    table = neighbour_table(voxels, kernel_offsets(3))
    x = torch.randn(len(grid), cin, dtype=torch.float64)
    conv = SubMConv3d(cin, cout, depthwise=depthwise).double()
    out = conv(x, table)
    dense_x = torch.zeros(1, cin, size, size, size, dtype=torch.float64)
    dense_x[0, :, voxels.grid[:, 0], voxels.grid[:, 1], voxels.grid[:, 2]] = x.T
    if depthwise:  # (K, C) -> (C, 1, 3, 3, 3), groups = C
        weight = conv.weight.T.reshape(cin, 1, 3, 3, 3)
        dense = F.conv3d(dense_x, weight, padding=1, groups=cin)
    else:  # (K, C_in, C_out) -> (C_out, C_in, 3, 3, 3)
        weight = conv.weight.permute(2, 1, 0).reshape(cout, cin, 3, 3, 3)
        dense = F.conv3d(dense_x, weight, padding=1)
    expected = dense[0, :, voxels.grid[:, 0], voxels.grid[:, 1], voxels.grid[:, 2]].T
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("depthwise", [False, True])
def test_memory_light_backward_matches_autograd_of_the_plain_sum(depthwise):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    grid = torch.unique(torch.randint(0, 5, (60, 3), generator=g), dim=0)  # sparse: many missing neighbours
    voxels = voxelize(grid, torch.zeros(len(grid), dtype=torch.long))
    table = neighbour_table(voxels, kernel_offsets(3))
    x = torch.randn(len(grid), 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn((27, 4) if depthwise else (27, 4, 5), dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(len(grid), weight.shape[-1], dtype=torch.float64)
    grads = torch.autograd.grad((sparse_conv(x, table, weight) * upstream).sum(), (x, weight))
    plain = torch.autograd.grad((_sparse_conv_forward(x, table, weight) * upstream).sum(), (x, weight))
    for got, expected in zip(grads, plain):
        torch.testing.assert_close(got, expected)


def test_sparse_conv_under_bfloat16_autocast_returns_float_gradients():
    grid = full_grid(3)
    voxels = voxelize(grid, torch.zeros(len(grid), dtype=torch.long))
    table = neighbour_table(voxels, kernel_offsets(3))
    conv = SubMConv3d(4, 4, depthwise=True)
    x = torch.randn(len(grid), 4, dtype=torch.bfloat16, requires_grad=True)
    conv(x, table).float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
