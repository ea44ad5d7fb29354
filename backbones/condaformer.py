"""ConDaFormer: a sparse-voxel U-Net of disassembled-window Transformer blocks, in plain PyTorch.

Paper: L. Duan, S. Zhao, N. Xue, M. Gong, G.-S. Xia, D. Tao, "ConDaFormer: Disassembled
Transformer with Local Structure Enhancement for 3D Point Cloud Understanding", NeurIPS 2023
(official code: github.com/LHDuan/ConDaFormer, CUDA-only). Layout and sizes follow the official
configs (``ConDaFormer-small-v1m1`` for S3DIS, ``ConDaFormer-v1m1`` for ScanNet):

1. Voxelization (Sec. 3.1): points are clustered into voxels of ``voxel_size``; the stem is a
   sub-manifold 3x3x3 sparse convolution, batch norm, LeakyReLU(0.2) and a residual block of two
   more such convolutions (``BasicBlock``).
2. Encoder stages (Sec. 3.3): ``GridPool`` halves the grid (max-pooled features, count-weighted
   cluster centres), then ``ConDaFormerBlock`` s: pre-norm Transformer blocks whose attention is
   the ConDaFormer module (Sec. 3.2): local structure enhancement (LSE: a 1x1x1 branch and a
   depth-wise 3x3x3 sparse-convolution branch) before and after the disassembled window
   attention (``backbones.ops.plane_attention``), then a projection; odd blocks use shifted
   windows. With ``attention="cubic"`` the same network attends in cubic windows (the baseline).
3. Decoder: ``GridUnpool`` per stage (features of the coarse grid interpolated to the finer one
   from their 3 nearest coarse voxels by inverse distance, plus a projected skip connection),
   back to the input voxels; per-point features are those of each point's voxel.

Sparse neighbourhoods come from voxel hashing (``backbones.ops.voxel_hash``): sort, unique and
searchsorted over int64 keys, never a dense 3D grid. The index computations are gathered in a
``SparseStructure`` built once per batch; ``forward_voxels`` takes it as plain tensors, which is
what the ONNX export feeds as inputs (those computations need sorting and hashing that ONNX
graphs cannot express efficiently).

Deviations from the official code, all stated: the 3 nearest neighbours for unpooling are
searched among the 27 coarse voxels around each fine voxel's parent (the official code searches
all coarse points; the nearest three are virtually always among these), and windows are
partitioned on the integer stage grid (identical for even window sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from backbones.ops.plane_attention import PlaneWindowAttention
from backbones.ops.sparse_conv import SubMConv3d
from backbones.ops.voxel_hash import (
    Voxels,
    coarsen,
    grid_coordinates,
    kernel_offsets,
    neighbour_table,
    voxelize,
)
from backbones.point_batch import PointBatch

BN_EPS, LN_EPS = 1e-5, 1e-6


def gather_rows(x: torch.Tensor, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``x[index]`` for an index tensor of any shape, with ``fill`` where the index is -1."""
    padded = torch.cat([x, torch.full((1,) + tuple(x.shape[1:]), fill, dtype=x.dtype, device=x.device)])
    return padded[torch.where(index < 0, torch.full_like(index, x.shape[0]), index)]


# -- the sparse structure of a batch -------------------------------------------------------------


@dataclass
class SparseStructure:
    """Every index a forward pass needs, computed once per batch by ``ConDaFormer.build_structure``.

    Level 0 is the input voxel grid, level ``s`` the grid ``2**s`` times coarser.

    Attributes:
        neighbours: per level, (M_s, 27) voxel at each 3x3x3 offset, -1 where empty.
        parents: per level s >= 1, (M_{s-1},) the level-s voxel holding each level-(s-1) voxel.
        children: per level s >= 1, (M_s, 8) its level-(s-1) voxels, -1 where empty.
        windows: per level s >= 1, window tables of the unshifted and shifted blocks
            (``{False: [...], True: [...]}``; only the shifts the stage uses).
        voxels: per level, the hashed voxels (for callers; not used by ``forward_voxels``).
    """

    neighbours: list[torch.Tensor]
    parents: list[torch.Tensor] = field(default_factory=list)
    children: list[torch.Tensor] = field(default_factory=list)
    windows: list[dict[bool, list[torch.Tensor]]] = field(default_factory=list)
    voxels: list[Voxels] = field(default_factory=list)

    def flat(self) -> tuple[list[str], list[torch.Tensor]]:
        """Names and tensors in a fixed order (the ONNX graph's index inputs); one table per window set."""
        names, tensors = ["neighbours_0"], [self.neighbours[0]]
        for s in range(1, len(self.neighbours)):
            names += [f"parent_{s}", f"children_{s}", f"neighbours_{s}"]
            tensors += [self.parents[s - 1], self.children[s - 1], self.neighbours[s]]
            for shift, tables in sorted(self.windows[s - 1].items()):
                if len(tables) != 1:
                    raise ValueError("flat() needs one window table per set: build with bucketed=False")
                names.append(f"windows_{s}_{'shifted' if shift else 'plain'}")
                tensors.append(tables[0])
        return names, tensors

    @classmethod
    def from_flat(cls, tensors: list[torch.Tensor], stage_shifts: list[tuple[bool, ...]]) -> "SparseStructure":
        """Inverse of ``flat`` given the shifts each stage uses."""
        it = iter(tensors)
        structure = cls(neighbours=[next(it)])
        for shifts in stage_shifts:
            structure.parents.append(next(it))
            structure.children.append(next(it))
            structure.neighbours.append(next(it))
            structure.windows.append({shift: [next(it)] for shift in sorted(shifts)})
        return structure


# -- building blocks ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Residual block of two sub-manifold 3x3x3 convolutions with batch norm (the stem's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = SubMConv3d(channels, channels)
        self.norm1 = nn.BatchNorm1d(channels, eps=BN_EPS)
        self.conv2 = SubMConv3d(channels, channels)
        self.norm2 = nn.BatchNorm1d(channels, eps=BN_EPS)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x, neighbours)))
        return self.act(self.norm2(self.conv2(out, neighbours)) + x)


class LocalStructureEnhancement(nn.Module):
    """LSE (Sec. 3.2): half the channels from a 1x1x1 projection, half from a depth-wise 3x3x3
    sparse convolution (+ BN, GELU, linear, BN), concatenated. It gives the attention, which only
    sees inside thin windows, the local 3D structure around each voxel."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.pointwise = nn.Linear(dim, half, bias=False)
        self.pointwise_norm = nn.BatchNorm1d(half, eps=BN_EPS)
        self.depthwise = SubMConv3d(dim, dim, depthwise=True)
        self.depthwise_norm = nn.BatchNorm1d(dim, eps=BN_EPS)
        self.depthwise_proj = nn.Linear(dim, dim - half)
        self.depthwise_proj_norm = nn.BatchNorm1d(dim - half, eps=BN_EPS)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        local = F.gelu(self.depthwise_norm(self.depthwise(x, neighbours)))
        local = self.depthwise_proj_norm(self.depthwise_proj(local))
        return torch.cat([self.pointwise_norm(self.pointwise(x)), local], dim=1)


class ConDaFormerAttention(nn.Module):
    """The ConDaFormer module: LSE, q/k/v, disassembled window attention, LSE, projection."""

    def __init__(self, dim: int, head_dim: int, window_size: int, quant_size: float, kind: str, shift: bool):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"channels {dim} are not a multiple of head_dim {head_dim}")
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.scale = head_dim**-0.5
        self.lse = LocalStructureEnhancement(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention = PlaneWindowAttention(self.num_heads, head_dim, window_size, quant_size, kind, shift)
        self.lse_post = LocalStructureEnhancement(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor, positions: torch.Tensor, tables: list[torch.Tensor]) -> torch.Tensor:
        m, dim = x.shape
        q, k, v = self.qkv(self.lse(x, neighbours)).view(m, 3, self.num_heads, self.head_dim).unbind(1)
        out = self.attention(q * self.scale, k, v, positions, tables).reshape(m, dim)
        return self.proj(self.lse_post(out, neighbours))


class ConDaFormerBlock(nn.Module):
    """Pre-norm Transformer block: x + DropPath(Attn(LN x)); x + DropPath(MLP(LN x)).

    DropPath acts per voxel (rows of the (M, C) features), as in the official code.
    """

    def __init__(self, dim: int, head_dim: int, window_size: int, quant_size: float, kind: str, shift: bool,
                 drop_path: float = 0.0, mlp_ratio: float = 4.0):  # fmt: skip
        super().__init__()
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = ConDaFormerAttention(dim, head_dim, window_size, quant_size, kind, shift)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor, positions: torch.Tensor, tables: list[torch.Tensor]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), neighbours, positions, tables))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class GridPool(nn.Module):
    """LN + linear, then max over each coarse voxel's children; centres are count-weighted means."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels, eps=LN_EPS)
        self.linear = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor, children: torch.Tensor):
        projected = self.linear(self.norm(x))
        # empty octants gather the lowest finite value (every coarse voxel has a child)
        features = gather_rows(projected, children, torch.finfo(projected.dtype).min).amax(dim=1)
        child_counts = gather_rows(counts.unsqueeze(1), children).squeeze(-1)  # (M_c, 8), 0 where empty
        total = child_counts.sum(1, keepdim=True)
        centres = (gather_rows(positions, children) * child_counts.unsqueeze(-1)).sum(1) / total
        return features, centres, total.squeeze(1)


class GridUnpool(nn.Module):
    """Coarse features interpolated to the fine voxels (3 nearest coarse voxels, weights 1/d),
    added to the projected skip features of the fine level."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_channels, eps=LN_EPS), nn.Linear(in_channels, out_channels))
        self.proj_skip = nn.Sequential(nn.LayerNorm(skip_channels, eps=LN_EPS), nn.Linear(skip_channels, out_channels))

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor, coarse_positions: torch.Tensor, fine_positions: torch.Tensor,
                parent: torch.Tensor, coarse_neighbours: torch.Tensor) -> torch.Tensor:  # fmt: skip
        candidates = coarse_neighbours[parent]  # (M_f, 27): coarse voxels around each fine voxel's parent
        offsets = gather_rows(coarse_positions, candidates) - fine_positions.unsqueeze(1)
        distance = torch.where(candidates >= 0, offsets.norm(dim=-1), torch.full_like(offsets[..., 0], float("inf")))
        nearest, slot = torch.topk(distance, k=3, dim=1, largest=False)
        # 1 / max(d, 1e-8) (the official 1 / (d + 1e-8), in a form ONNX graph optimisers keep)
        weights = torch.where(torch.isfinite(nearest), 1.0 / nearest.clamp_min(1e-8), torch.zeros_like(nearest))
        weights = weights / weights.sum(1, keepdim=True)
        neighbours = torch.gather(candidates, 1, slot)
        interpolated = (gather_rows(self.proj(coarse), neighbours) * weights.unsqueeze(-1).to(coarse.dtype)).sum(1)
        return self.proj_skip(skip) + interpolated


# -- the network -------------------------------------------------------------------------------


class ConDaFormer(nn.Module):
    """Sparse-voxel U-Net of ConDaFormer blocks; a point backbone (``PointBatch`` in, (N, C) out).

    Args:
        in_channels: per-point input features (e.g. 6 = xyz + rgb on S3DIS, 9 with normals).
        voxel_size: input voxel side in the coordinates' unit (metres).
        base_channels: stem width.
        channels: width of each encoder stage (stage s works on voxels ``2**s`` times larger).
        depths: ConDaFormer blocks per encoder stage.
        decoder_channels: width after each unpooling, coarsest first; the last is the output width.
        head_dim: channels per attention head (heads = channels / head_dim, a multiple of 3).
        window_size: window side in stage voxels.
        quant_size: relative-position quantisation, in stage voxels.
        attention: ``"plane"`` (ConDaFormer) or ``"cubic"`` (cubic-window baseline).
        drop_path_rate: stochastic depth, rising linearly over the encoder blocks.
        mlp_ratio: hidden width of the blocks' MLP.
    """

    def __init__(
        self,
        in_channels: int = 6,
        voxel_size: float = 0.04,
        base_channels: int = 48,
        channels: tuple[int, ...] = (96, 192, 384),
        depths: tuple[int, ...] = (2, 6, 2),
        decoder_channels: tuple[int, ...] = (192, 96, 48),
        head_dim: int = 16,
        window_size: int = 8,
        quant_size: float = 0.25,
        attention: str = "plane",
        drop_path_rate: float = 0.5,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if not (len(channels) == len(depths) == len(decoder_channels) >= 1):
            raise ValueError(f"channels {channels}, depths {depths} and decoder_channels {decoder_channels} need one entry per stage")
        self.voxel_size = voxel_size
        self.out_channels = decoder_channels[-1]
        self.stem = nn.ModuleDict(
            {"conv": SubMConv3d(in_channels, base_channels), "norm": nn.BatchNorm1d(base_channels, eps=BN_EPS), "block": BasicBlock(base_channels)}
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        widths = [base_channels, *channels]
        self.pools = nn.ModuleList(GridPool(widths[s], widths[s + 1]) for s in range(len(channels)))
        self.stages = nn.ModuleList()
        for s, (dim, depth) in enumerate(zip(channels, depths)):
            blocks = [
                ConDaFormerBlock(dim, head_dim, window_size, quant_size, attention, shift=i % 2 == 1,
                                 drop_path=rates[sum(depths[:s]) + i], mlp_ratio=mlp_ratio)  # fmt: skip
                for i in range(depth)
            ]
            self.stages.append(nn.ModuleList(blocks))
        # unpool from stage s to s - 1: decoder_channels[k] for k = 0 (coarsest) ...
        self.unpools = nn.ModuleList()
        previous = channels[-1]
        for k, out in enumerate(decoder_channels):
            skip = widths[len(channels) - 1 - k]
            self.unpools.append(GridUnpool(previous, skip, out))
            previous = out

    @property
    def stage_shifts(self) -> list[tuple[bool, ...]]:
        """Which window shifts each stage's blocks use (unshifted first)."""
        return [tuple(sorted({block.shift for block in stage})) for stage in self.stages]

    # -- index computations (no gradients, hashing and sorting) -------------------------------
    @torch.no_grad()
    def build_structure(self, voxels: Voxels, bucketed: bool = True) -> SparseStructure:
        """Neighbour tables, pooling maps and window partitions of every level."""
        offsets = kernel_offsets(3, device=voxels.grid.device)
        structure = SparseStructure(neighbours=[neighbour_table(voxels, offsets)], voxels=[voxels])
        for stage, shifts in zip(self.stages, self.stage_shifts):
            coarse = coarsen(structure.voxels[-1])
            structure.voxels.append(coarse.voxels)
            structure.parents.append(coarse.parent)
            structure.children.append(coarse.children)
            structure.neighbours.append(neighbour_table(coarse.voxels, offsets))
            layer_of = {block.shift: block.attn.attention for block in stage}
            structure.windows.append(
                {shift: layer_of[shift].partition(coarse.voxels.grid, coarse.voxels.batch, bucketed) for shift in shifts}
            )
        return structure

    def voxelize(self, coord: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, Voxels]:
        """Continuous positions in voxel units (N, 3) and the occupied input voxels."""
        batch = torch.repeat_interleave(torch.arange(len(offset), device=coord.device), torch.diff(offset, prepend=offset.new_zeros(1)))
        positions = grid_coordinates(coord.float(), batch, self.voxel_size, len(offset))
        return positions, voxelize(torch.floor(positions).long(), batch)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, points: PointBatch) -> torch.Tensor:
        """Per-point features (N, out_channels); points in one voxel share their voxel's features."""
        positions, voxels = self.voxelize(points.coord, points.offset)
        counts = voxels.counts.to(positions.dtype)
        size = (len(voxels.keys), 1)

        def voxel_mean(x: torch.Tensor) -> torch.Tensor:
            total = x.new_zeros(size[0], x.shape[1]).index_add_(0, voxels.inverse, x)
            return total / counts.unsqueeze(1).to(x.dtype)

        structure = self.build_structure(voxels)
        out = self.forward_voxels(voxel_mean(positions), voxel_mean(points.feat), counts, structure)
        return out[voxels.inverse]

    def forward_voxels(self, positions: torch.Tensor, feat: torch.Tensor, counts: torch.Tensor, structure: SparseStructure) -> torch.Tensor:
        """The network on input voxels: ``positions`` (M, 3) in voxel units (inside each voxel),
        ``feat`` (M, C), ``counts`` (M,) points per voxel; returns (M, out_channels)."""
        x = F.leaky_relu(self.stem["norm"](self.stem["conv"](feat, structure.neighbours[0])), 0.2)
        x = self.stem["block"](x, structure.neighbours[0])
        skips, levels = [x], [positions]
        for s, (pool, stage) in enumerate(zip(self.pools, self.stages), start=1):
            x, positions, counts = pool(x, positions, counts, structure.children[s - 1])
            stage_positions = positions / 2**s
            for block in stage:
                x = block(x, structure.neighbours[s], stage_positions, structure.windows[s - 1][block.shift])
            skips.append(x)
            levels.append(positions)
        for k, unpool in enumerate(self.unpools):
            s = len(self.stages) - k  # from level s to level s - 1
            x = unpool(x, skips[s - 1], levels[s], levels[s - 1], structure.parents[s - 1], structure.neighbours[s])
        return x


# -- variants (the official configs) -------------------------------------------------------------

VARIANTS: dict[str, dict] = {
    # ConDaFormer-small-v1m1, S3DIS (configs/s3dis/condaformer.py)
    "condaformer_s3dis": dict(
        voxel_size=0.04, base_channels=48, channels=(96, 192, 384), depths=(2, 6, 2), decoder_channels=(192, 96, 48),
        head_dim=16, window_size=8, quant_size=0.25, drop_path_rate=0.5,
    ),
    # ConDaFormer-v1m1, ScanNet v2 (configs/scannet/condaformer.py)
    "condaformer_scannet": dict(
        voxel_size=0.02, base_channels=48, channels=(96, 192, 384, 384), depths=(2, 2, 6, 2),
        decoder_channels=(384, 192, 96, 48), head_dim=16, window_size=10, quant_size=0.25, drop_path_rate=0.3,
    ),
}  # fmt: skip
