"""The ConDaFormer backbone: offset batching, per-point output, index structure, gradients."""

import pytest
import torch

from backbones.condaformer import ConDaFormer, SparseStructure
from backbones.point_batch import PointBatch, offset_to_batch

TINY = dict(in_channels=6, voxel_size=0.1, base_channels=8, channels=(24, 48), depths=(2, 1), decoder_channels=(24, 16),
            head_dim=8, window_size=4, quant_size=0.5, drop_path_rate=0.0, mlp_ratio=2.0)  # fmt: skip


def box_cloud(n: int, size=(2.0, 1.5, 1.0), seed: int = 0) -> torch.Tensor:
    """Points on the faces of a box, a little noisy (a tiny room)."""
    g = torch.Generator().manual_seed(seed)
    extent = torch.tensor(size)
    face = torch.randint(0, 6, (n,), generator=g)
    coord = torch.rand(n, 3, generator=g) * extent
    axis = face // 2
    coord[torch.arange(n), axis] = (face % 2).float() * extent[axis]
    return coord + 0.01 * torch.randn(n, 3, generator=g)


@pytest.fixture(scope="module")
def clouds():
    return [box_cloud(700, seed=1), box_cloud(500, (1.0, 2.5, 1.2), seed=2) + 5.0]


@pytest.mark.parametrize("attention", ["plane", "cubic"])
def test_batching_by_offsets_equals_running_each_cloud_alone(clouds, attention):
    torch.manual_seed(0)
    net = ConDaFormer(**TINY, attention=attention).eval()  # batch norm from running statistics
    feats = [torch.randn(len(c), 6) for c in clouds]
    alone = [net(PointBatch(c, f, torch.tensor([len(c)]))) for c, f in zip(clouds, feats)]
    together = net(PointBatch(torch.cat(clouds), torch.cat(feats), torch.tensor([700, 1200])))
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_points_of_one_voxel_share_features_and_order_is_kept(clouds):
    torch.manual_seed(0)
    net = ConDaFormer(**TINY).eval()
    coord = clouds[0]
    duplicated = torch.cat([coord, coord[:50]])  # the first 50 points twice: same voxels
    feat = torch.randn(len(duplicated), 6)
    feat[700:] = feat[:50]
    out = net(PointBatch(duplicated, feat, torch.tensor([len(duplicated)])))
    assert out.shape == (750, 16)
    torch.testing.assert_close(out[700:], out[:50])
    perm = torch.randperm(700)
    shuffled = net(PointBatch(coord[perm], feat[:700][perm], torch.tensor([700])))
    torch.testing.assert_close(shuffled, net(PointBatch(coord, feat[:700], torch.tensor([700])))[perm], atol=1e-5, rtol=1e-4)


def test_structure_levels_shrink_and_flat_round_trips(clouds):
    net = ConDaFormer(**TINY)
    _, voxels = net.voxelize(torch.cat(clouds), torch.tensor([700, 1200]))
    structure = net.build_structure(voxels, bucketed=False)
    sizes = [len(v.keys) for v in structure.voxels]
    assert sizes[0] > sizes[1] > sizes[2] and len(structure.neighbours) == 3
    assert all(len(w[False]) == 1 for w in structure.windows) and True in structure.windows[0]
    names, tensors = structure.flat()
    assert names == ["neighbours_0", "parent_1", "children_1", "neighbours_1", "windows_1_plain", "windows_1_shifted",
                     "parent_2", "children_2", "neighbours_2", "windows_2_plain"]  # fmt: skip
    again = SparseStructure.from_flat(tensors, net.stage_shifts)
    assert all(torch.equal(a, b) for a, b in zip(again.flat()[1], tensors))


def test_every_parameter_gets_a_gradient(clouds):
    torch.manual_seed(0)
    net = ConDaFormer(**TINY)
    coord = torch.cat(clouds)
    out = net(PointBatch(coord, torch.randn(len(coord), 6), torch.tensor([700, 1200])))
    out.square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_plane_and_cubic_windows_differ_only_in_attention():
    plane, cubic = ConDaFormer(**TINY, attention="plane"), ConDaFormer(**TINY, attention="cubic")
    plane_names = {n for n, _ in plane.named_parameters()}
    assert plane_names == {n for n, _ in cubic.named_parameters()}
    assert plane.stages[0][0].attn.attention.q_table.shape[2] * 3 == cubic.stages[0][0].attn.attention.q_table.shape[2]


def test_unpooling_interpolates_from_the_three_nearest_coarse_voxels():
    from backbones.condaformer import GridUnpool

    unpool = GridUnpool(1, 1, 1)
    unpool.proj = torch.nn.Identity()
    unpool.proj_skip = torch.nn.Identity()
    # four coarse voxels on a line; the fine voxel at x = 0.5 sits between the first two
    coarse_pos = torch.tensor([[0.0, 0, 0], [2.0, 0, 0], [4.0, 0, 0], [6.0, 0, 0]])
    coarse = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    neighbours = torch.full((4, 27), -1)
    for i in range(4):
        for j, k in ((i - 1, 4), (i, 13), (i + 1, 22)):
            if 0 <= j < 4:
                neighbours[i, k] = j
    out = unpool(coarse, torch.zeros(1, 1), coarse_pos, torch.tensor([[0.5, 0, 0]]), torch.tensor([0]), neighbours)
    weights = torch.tensor([1 / 0.5, 1 / 1.5])  # only two coarse voxels are within the parent's 27
    assert torch.allclose(out, (weights * torch.tensor([1.0, 2.0])).sum() / weights.sum())


def test_offset_to_batch():
    assert offset_to_batch(torch.tensor([2, 2, 5])).tolist() == [0, 0, 2, 2, 2]
