"""Sub-manifold sparse 3D convolution, dense and depth-wise, from a neighbour table.

Output voxels are the input voxels (sub-manifold: the active set never dilates), and

    out[i] = sum_k  x[neighbours[i, k]] @ W[k]        (dense,      W: (K, C_in, C_out))
    out[i] = sum_k  x[neighbours[i, k]] *  w[k]       (depth-wise, w: (K, C))

over the kernel offsets ``k`` whose neighbour exists (``neighbours[i, k] >= 0``), the
cross-correlation that ``torch.nn.Conv3d`` and spconv's ``SubMConv3d`` compute. ConDaFormer's
local structure enhancement needs the depth-wise form, which stock spconv lacks (the official
code patches spconv and then multiplies by an identity mask, i.e. computes a full C x C
convolution); here it costs K * C per voxel.

Memory: a depth-wise convolution loops over the K offsets; a dense one gathers the K
neighbours side by side in row chunks of bounded size and does one matrix product per chunk
(im2col). In training a custom autograd function keeps only the input, not the gathers: as
sub-manifold neighbourhoods are symmetric (j is i's neighbour at offset k iff i is j's at the
mirrored offset K-1-k), the input gradient is the same gather-convolution of the output
gradient with the mirrored (and, dense, transposed) kernel, with no scatter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 24  # gathered rows of a dense convolution are processed in chunks of this size


def _padded(x: torch.Tensor, neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with one zero row appended, and the table with -1 pointing at that row."""
    padded = torch.cat([x, x.new_zeros(1, x.shape[1])], dim=0)
    return padded, torch.where(neighbours < 0, torch.full_like(neighbours, x.shape[0]), neighbours)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _row_chunks(rows: int, width: int) -> list[slice]:
    """Row ranges whose gathered (rows, width) block stays under ``CHUNK_ELEMENTS`` (one range when
    tracing for export, so that the graph does not depend on the number of voxels)."""
    if _tracing():
        return [slice(None)]
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    return [slice(start, start + step) for start in range(0, rows, step)]


def _sparse_conv_forward(x: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    padded, index = _padded(x, neighbours)
    volume = weight.shape[0]
    if weight.ndim == 2 and _tracing():  # depth-wise, as one gather: a small graph to export
        return (padded[index] * weight).sum(1)
    if weight.ndim == 2:  # depth-wise: one offset at a time, (M, C) temporaries only
        out = padded.index_select(0, index[:, 0]) * weight[0]
        for k in range(1, volume):
            out = out + padded.index_select(0, index[:, k]) * weight[k]
        return out
    # dense: gather the K neighbours side by side and multiply by the (K * C_in, C_out) kernel in
    # one matrix product (faster than K small products), chunked over rows to bound memory
    flat_weight = weight.reshape(volume * weight.shape[1], weight.shape[2])
    parts = [
        padded.index_select(0, index[rows].reshape(-1)).view(-1, flat_weight.shape[0]) @ flat_weight
        for rows in _row_chunks(x.shape[0], flat_weight.shape[0])
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _SparseConvFunction(torch.autograd.Function):
    """Memory-light autograd for ``sparse_conv``: saves the input and weight, not the gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, neighbours, weight)
        return _sparse_conv_forward(x, neighbours, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, neighbours, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        # under mixed precision the incoming gradient may not be in the input's dtype
        grad_out = grad_out.to(x.dtype)
        depthwise = weight.ndim == 2
        if ctx.needs_input_grad[0]:
            mirrored = weight.flip(0) if depthwise else weight.flip(0).transpose(1, 2)
            grad_x = _sparse_conv_forward(grad_out, neighbours, mirrored)
        if ctx.needs_input_grad[2]:
            padded, index = _padded(x, neighbours)
            if depthwise:
                grad_weight = torch.stack(
                    [(padded.index_select(0, index[:, k]) * grad_out).sum(0) for k in range(weight.shape[0])]
                )
            else:
                width = weight.shape[0] * weight.shape[1]
                grad_weight = sum(
                    padded.index_select(0, index[rows].reshape(-1)).view(-1, width).transpose(0, 1) @ grad_out[rows]
                    for rows in _row_chunks(x.shape[0], width)
                ).view(weight.shape)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, None, grad_weight


def sparse_conv(x: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sub-manifold sparse convolution of voxel features ``x`` (M, C_in).

    Args:
        x: features of the active voxels.
        neighbours: (M, K) index of the voxel at each kernel offset, -1 where empty
            (``backbones.ops.voxel_hash.neighbour_table``).
        weight: (K, C_in, C_out) for a dense kernel, (K, C) for a depth-wise one.
    """
    if neighbours.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"neighbours {tuple(neighbours.shape)} must be (M, K) = ({x.shape[0]}, {weight.shape[0]})")
    weight = weight.to(x.dtype)  # under autocast x may be bfloat16 while parameters stay float32
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and not torch.compiler.is_compiling():
        return _SparseConvFunction.apply(x, neighbours, weight)
    return _sparse_conv_forward(x, neighbours, weight)


class SubMConv3d(nn.Module):
    """Sub-manifold sparse convolution with a cubic kernel, dense or depth-wise, no bias.

    Args:
        in_channels / out_channels: feature widths (equal for ``depthwise``).
        kernel_size: odd cube side; the neighbour table must use ``kernel_offsets(kernel_size)``.
        depthwise: one kernel per channel (groups = channels), as ConDaFormer's LSE uses.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, depthwise: bool = False):
        super().__init__()
        if depthwise and in_channels != out_channels:
            raise ValueError(f"a depth-wise convolution keeps the width: {in_channels} != {out_channels}")
        self.depthwise = depthwise
        volume = kernel_size**3
        shape = (volume, in_channels) if depthwise else (volume, in_channels, out_channels)
        self.weight = nn.Parameter(torch.empty(shape))
        # Depth-wise: uniform(+-1/sqrt(C_out * K)) as the official initialisation; dense: like
        # spconv / Conv3d (kaiming-uniform over the fan-in C_in * K).
        fan = (out_channels if depthwise else in_channels) * volume
        bound = 1 / math.sqrt(fan)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        return sparse_conv(x, neighbours, self.weight)

    def extra_repr(self) -> str:
        kind = "depthwise" if self.depthwise else "dense"
        return f"{kind}, weight={tuple(self.weight.shape)}"
