"""Disassembled (tri-plane) window attention of ConDaFormer, and the cubic-window attention it replaces.

Paper: L. Duan, S. Zhao, N. Xue, M. Gong, G.-S. Xia, D. Tao, "ConDaFormer: Disassembled
Transformer with Local Structure Enhancement for 3D Point Cloud Understanding", NeurIPS 2023,
Sec. 3.2 (disassembled window attention) and the relative position encoding it inherits from
Stratified Transformer (contextual q/k/v tables).

The cubic window of side ``w`` is replaced by three orthogonal planar windows, ``(w, w, 1)``,
``(w, 1, w)`` and ``(1, w, w)``, one stage voxel thick. The heads are split into three equal
groups and group ``g`` attends inside the windows of plane ``g``; the three outputs are
concatenated head-wise. A planar window holds at most ``w**2`` voxels instead of ``w**3``.

How it is vectorised (no loop over windows or voxels): a *token* is one (voxel, head group)
pair, token ``t = voxel * G + g`` with ``G = 3`` planes (``G = 1`` for the cubic baseline).
Tokens are hashed by (cloud, group, window coordinates), sorted by window and laid out in padded
``(windows, length)`` index tables, one table per *bucket* of windows whose occupancy rounds up
to the same power of two (a handful of buckets). Attention is dense inside each bucket with the
padding masked, so memory is about twice ``sum over windows of n_w**2``: linear in the number of
voxels, since a window's occupancy is bounded. For ONNX export the partition is one bucket padded
to the largest window, so the graph has a fixed structure.

Relative position encoding (exactly the official kernels' arithmetic): each voxel's position
inside its window, ``((p + shift) mod window) / quant_size`` floored per axis, gives per-axis
relative indices ``u_i - u_j + L - 1`` with ``L = window / quant_size``; tables ``T_q, T_k, T_v``
of shape ``(2L - 1, 3 axes, heads per group, head_dim)`` are shared by the three planes, and

    logit_ij = q_i . k_j + sum_axes (q_i . T_q[r_ij] + k_j . T_k[r_ij])
    out_i    = sum_j softmax_j(logit_ij) (v_j + sum_axes T_v[r_ij])

with ``q`` already scaled by ``head_dim ** -0.5``. Windows use the integer stage grid (the
official code floors continuous cluster centres, which is the same partition for even ``w``);
shifted windows move by ``w / 2`` on every axis.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.ops.voxel_hash import pack_keys

WINDOW_KINDS = ("plane", "cubic")


def window_shapes(kind: str, window_size: int) -> tuple[tuple[int, int, int], ...]:
    """The window shape of each head group: three planes, or one cube."""
    w = window_size
    if kind == "plane":
        return ((w, w, 1), (w, 1, w), (1, w, w))
    if kind == "cubic":
        return ((w, w, w),)
    raise ValueError(f"window kind must be one of {WINDOW_KINDS}, got {kind!r}")


def partition_windows(
    grid: torch.Tensor,
    batch: torch.Tensor,
    shapes: Sequence[Sequence[int]],
    shift: bool,
    bucketed: bool = True,
    min_length: int = 4,
) -> list[torch.Tensor]:
    """Group the tokens (voxel, head group) of one stage by window.

    Args:
        grid: (M, 3) integer stage-voxel coordinates (>= 0, relative to each cloud's minimum).
        batch: (M,) cloud index.
        shapes: window shape per head group, e.g. ``window_shapes("plane", 8)``.
        shift: shift the windows by half their size on every axis (odd blocks).
        bucketed: pad each window to the next power of two of its occupancy (few, tight buckets);
            otherwise one table padded to the fullest window (what the ONNX graph takes).
        min_length: smallest padded length of a bucket.

    Returns:
        One ``(windows, length)`` int64 table per bucket, holding token indices
        ``voxel * G + group`` and -1 for padding. Every token appears exactly once.
    """
    device = grid.device
    sizes = torch.tensor(shapes, dtype=torch.long, device=device)  # (G, 3)
    groups = len(sizes)
    cells = grid.long().unsqueeze(1)  # (M, 1, 3)
    # floor((g + w / 2) / w) in integers
    window = torch.div(2 * cells + sizes, 2 * sizes, rounding_mode="floor") if shift else torch.div(cells, sizes, rounding_mode="floor")
    group = torch.arange(groups, device=device)
    keys = pack_keys((batch.long().unsqueeze(1) * groups + group).reshape(-1), window.reshape(-1, 3))
    _, window_of_token, counts = torch.unique(keys, sorted=True, return_inverse=True, return_counts=True)
    order = torch.argsort(window_of_token, stable=True)  # tokens grouped by window
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=device) - start[window_of_token[order]]

    if bucketed:
        lengths = torch.pow(2, torch.ceil(torch.log2(counts.double()))).long().clamp_min(min_length)
    else:
        lengths = torch.full_like(counts, int(counts.max()))
    bucket_lengths, bucket_of_window = torch.unique(lengths, return_inverse=True)
    # row of each window inside its bucket (windows keep their sorted order)
    by_bucket = torch.argsort(bucket_of_window, stable=True)
    windows_per_bucket = torch.bincount(bucket_of_window, minlength=len(bucket_lengths))
    bucket_start = torch.cumsum(windows_per_bucket, 0) - windows_per_bucket
    row = torch.empty_like(by_bucket)
    row[by_bucket] = torch.arange(len(by_bucket), device=device) - bucket_start[bucket_of_window[by_bucket]]

    token_window = window_of_token[order]
    token_bucket = bucket_of_window[token_window]
    tables = []
    for b, length in enumerate(bucket_lengths.tolist()):
        chosen = token_bucket == b
        table = torch.full((int(windows_per_bucket[b]) * length,), -1, dtype=torch.long, device=device)
        table[row[token_window[chosen]] * length + rank[chosen]] = order[chosen]
        tables.append(table.view(-1, length))
    return tables


def token_positions(tables: Sequence[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Where each token sits in the concatenation of the flattened tables, (T,).

    Turns the output scatter into a gather (each token is in exactly one window).
    """
    flat = torch.cat([t.reshape(-1) for t in tables])
    target = torch.where(flat < 0, torch.full_like(flat, num_tokens), flat)
    positions = torch.zeros(num_tokens + 1, dtype=torch.long, device=flat.device)
    positions = positions.scatter(0, target, torch.arange(flat.shape[0], device=flat.device))
    return positions[:num_tokens]


def quantised_window_positions(
    positions: torch.Tensor, shapes: Sequence[Sequence[int]], shift: bool, quant_size: float
) -> torch.Tensor:
    """Per token, the quantised position inside its window, (M * G, 3) int64.

    ``positions`` are continuous stage-voxel coordinates (M, 3) (cluster centres, >= 0).
    """
    sizes = torch.tensor(shapes, dtype=positions.dtype, device=positions.device)  # (G, 3)
    offset = sizes / 2 if shift else torch.zeros_like(sizes)
    local = torch.remainder(positions.unsqueeze(1) + offset, sizes)  # (M, G, 3)
    return torch.floor(local / quant_size).long().reshape(-1, 3)


def _pad_row(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))], dim=0)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


#: windows of a bucket are attended in chunks whose largest temporary holds at most this many
#: elements, so that peak memory beyond the inputs and outputs stays bounded
CHUNK_ELEMENTS = 1 << 24


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: Sequence[torch.Tensor],
    quantised: torch.Tensor,
    q_table: torch.Tensor,
    k_table: torch.Tensor,
    v_table: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention inside every window, with contextual relative position encoding.

    Args:
        q, k, v: (T, h, d) per token (q already scaled).
        tables: ``partition_windows`` output for these tokens.
        quantised: (T, 3) ``quantised_window_positions``.
        q_table, k_table, v_table: (2L - 1, 3, h, d).

    Returns:
        (T, h, d) attention output per token, in float32.
    """
    num_tokens = q.shape[0]
    span = q_table.shape[0]  # 2L - 1 relative offsets per axis
    q_pad, k_pad, v_pad = (_pad_row(x.float()) for x in (q, k, v))
    # the three axes' tables side by side, (h, d, 3 (2L - 1)): one product gives every axis and
    # offset term of a token; relative index r on axis a is column a (2L - 1) + r
    rpe = tuple(t.float().permute(2, 3, 1, 0).reshape(t.shape[2], t.shape[3], -1) for t in (q_table, k_table, v_table))
    padded = (q_pad, k_pad, v_pad, _pad_row(quantised))
    heads = q.shape[1]
    outputs = []
    for table in tables:
        if _tracing():  # one piece, so that the exported graph keeps the number of windows symbolic
            outputs.append(_attend_windows(table, num_tokens, padded, rpe))
            continue
        windows, length = table.shape
        # the largest temporaries are (windows, heads, length, 3 length) and (..., 3 (2L - 1))
        step = max(1, CHUNK_ELEMENTS // (heads * length * 3 * max(length, span)))
        for start in range(0, windows, step):
            outputs.append(_attend_windows(table[start : start + step], num_tokens, padded, rpe))
    return torch.cat(outputs)[token_positions(tables, num_tokens)]


def _attend_windows(table: torch.Tensor, num_tokens: int, padded: tuple, rpe: tuple) -> torch.Tensor:
    """Attention inside the windows of one (W, L) table; returns (W * L, h, d) in table order."""
    q_pad, k_pad, v_pad, quant_pad = padded
    q_rpe, k_rpe, v_rpe = rpe
    span = q_rpe.shape[-1] // 3
    centre = (span - 1) // 2  # L - 1
    axis_base = torch.arange(3, device=table.device) * span + centre
    index = torch.where(table < 0, torch.full_like(table, num_tokens), table)  # (W, L)
    windows, length = table.shape
    qw, kw, vw = (x[index].permute(0, 2, 1, 3) for x in (q_pad, k_pad, v_pad))  # (W, h, L, d)
    heads = qw.shape[1]
    pos = quant_pad[index]  # (W, L, 3)
    # (W, 1, L, 3 L): for query i, key j, axis a: u_i - u_j + column offset of axis a
    rel = (pos[:, :, None, :] - pos[:, None, :, :] + axis_base).reshape(windows, 1, length, 3 * length)
    rel = rel.expand(windows, heads, length, 3 * length)
    rel_t = (pos[:, None, :, :] - pos[:, :, None, :] + axis_base)  # indexed [j, i]: u_i - u_j, keyed by j
    rel_t = rel_t.reshape(windows, 1, length, 3 * length).expand(windows, heads, length, 3 * length)
    query_term = torch.gather(qw @ q_rpe, -1, rel).view(windows, heads, length, length, 3).sum(-1)
    key_term = torch.gather(kw @ k_rpe, -1, rel_t).view(windows, heads, length, length, 3).sum(-1)
    logits = qw @ kw.transpose(-1, -2) + query_term + key_term.transpose(-1, -2)  # (W, h, L, L)
    padding = (table < 0)[:, None, None, :]
    attention = torch.softmax(logits.masked_fill(padding, float("-inf")), dim=-1)
    # value term: attention weights binned by relative offset, then one product with T_v
    spread = attention.unsqueeze(-1).expand(windows, heads, length, length, 3).reshape(windows, heads, length, 3 * length)
    bins = q_pad.new_zeros(windows, heads, length, 3 * span).scatter_add(-1, rel, spread)
    out = attention @ vw + bins @ v_rpe.transpose(-1, -2)
    return out.permute(0, 2, 1, 3).reshape(windows * length, heads, -1)


class PlaneWindowAttention(nn.Module):
    """Window attention over a stage's tokens with relative position tables.

    ``kind="plane"``: ConDaFormer's disassembled attention (three planes, heads split in three
    groups, tables shared by the planes). ``kind="cubic"``: the cubic-window attention it replaces
    (all heads in one ``w**3`` window), the baseline of the paper's ablation.

    Args:
        num_heads: heads in total (a multiple of 3 for planes).
        head_dim: channels per head.
        window_size: window side ``w`` in stage voxels.
        quant_size: quantisation step of positions inside a window, in stage voxels.
        shift: shifted windows (odd blocks).
    """

    def __init__(self, num_heads: int, head_dim: int, window_size: int, quant_size: float = 0.25, kind: str = "plane", shift: bool = False):
        super().__init__()
        self.shapes = window_shapes(kind, window_size)
        if num_heads % len(self.shapes):
            raise ValueError(f"{kind} windows split the heads into {len(self.shapes)} groups; got {num_heads} heads")
        self.kind, self.shift, self.quant_size = kind, shift, quant_size
        self.num_heads, self.head_dim = num_heads, head_dim
        length = int(window_size / quant_size + 1e-4)
        table_shape = (2 * length - 1, 3, num_heads // len(self.shapes), head_dim)
        self.q_table = nn.Parameter(torch.zeros(table_shape))
        self.k_table = nn.Parameter(torch.zeros(table_shape))
        self.v_table = nn.Parameter(torch.zeros(table_shape))
        for table in (self.q_table, self.k_table, self.v_table):
            nn.init.trunc_normal_(table, std=0.02)

    @property
    def groups(self) -> int:
        return len(self.shapes)

    def partition(self, grid: torch.Tensor, batch: torch.Tensor, bucketed: bool = True) -> list[torch.Tensor]:
        """The window tables this layer attends in (``partition_windows`` with its shapes and shift)."""
        return partition_windows(grid, batch, self.shapes, self.shift, bucketed)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, tables: Sequence[torch.Tensor]) -> torch.Tensor:
        """q, k, v: (M, heads, d) per voxel (q scaled); positions: (M, 3) stage-voxel centres.

        Returns (M, heads, d): group g's heads attended inside group g's windows.
        """
        m, groups = q.shape[0], self.groups
        per_group = self.num_heads // groups
        tokens = [x.reshape(m * groups, per_group, self.head_dim) for x in (q, k, v)]
        quantised = quantised_window_positions(positions.float(), self.shapes, self.shift, self.quant_size)
        arguments = (*tokens, tables, quantised, self.q_table, self.k_table, self.v_table)
        if torch.is_autocast_enabled(q.device.type):
            # the attention arithmetic stays in float32 under mixed precision, as in the official kernels
            with torch.autocast(q.device.type, enabled=False):
                out = window_attention(*arguments)
        else:
            out = window_attention(*arguments)
        return out.reshape(m, self.num_heads, self.head_dim).to(q.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, windows={self.shapes}, shift={self.shift}, heads={self.num_heads}"
