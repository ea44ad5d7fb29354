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
``(windows, length)`` index tables, one table per *bucket* of windows of one head group whose
occupancy rounds up to the same power of two (a handful of buckets). Attention is dense inside each bucket with the
padding masked, so memory is about twice ``sum over windows of n_w**2``: linear in the number of
voxels, since a window's occupancy is bounded. For ONNX export the partition is one bucket padded
to the largest window, so the graph has a fixed structure.

Relative position encoding (exactly the official kernels' arithmetic): each voxel's position
inside its window, ``((p + shift) mod window) / quant_size`` floored per axis, gives per-axis
relative indices ``u_i - u_j + L - 1`` with ``L = window / quant_size``; tables ``T_q, T_k, T_v``
of shape ``(2L - 1, 3 axes, heads per group, head_dim)`` are shared by the three planes, and

    logit_ij = q_i . k_j + sum_axes (q_i . T_q[r_ij] + k_j . T_k[r_ij])
    out_i    = sum_j softmax_j(logit_ij) (v_j + sum_axes T_v[r_ij])

with ``q`` already scaled by ``head_dim ** -0.5``. The position terms are evaluated as one
product of every token with the table rows its window can reach, then a gather per pair: a
plane window one voxel thick reaches ``2 / quant_size - 1`` rows across instead of ``2L - 1``,
which is where the disassembled windows save most of their time on CPU. Windows use the integer stage grid (the
official code floors continuous cluster centres, which is the same partition for even ``w``);
shifted windows move by ``w / 2`` on every axis.
"""

from __future__ import annotations

import math
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
        bucketed: pad each window to the next power of two of its occupancy (few, tight buckets,
            each of one head group); otherwise one table padded to the fullest window (what the
            ONNX graph takes).
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
        # one group per bucket, so that a bucket's position terms need only its planes' table rows
        group_of_window = torch.empty_like(counts)
        group_of_window[window_of_token] = torch.arange(len(keys), device=device) % groups
        bucket_keys = lengths * groups + group_of_window
    else:
        bucket_keys = torch.full_like(counts, int(counts.max()))
    bucket_keys, bucket_of_window = torch.unique(bucket_keys, return_inverse=True)
    bucket_lengths = bucket_keys // groups if bucketed else bucket_keys
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
    shapes: Sequence[Sequence[int]] | None = None,
    quant_size: float | None = None,
) -> torch.Tensor:
    """Softmax attention inside every window, with contextual relative position encoding.

    Args:
        q, k, v: (T, h, d) per token (q already scaled).
        tables: ``partition_windows`` output for these tokens.
        quantised: (T, 3) ``quantised_window_positions``.
        q_table, k_table, v_table: (2L - 1, 3, h, d).
        shapes, quant_size: the window shape per head group and the position quantisation. When
            given, a bucket of one group uses only the table rows its window can reach: a plane
            window one voxel thick reaches 2 / quant_size - 1 offsets across, not 2L - 1.

    Returns:
        (T, h, d) attention output per token, in float32.
    """
    num_tokens, heads = q.shape[:2]
    span = q_table.shape[0]  # 2L - 1 relative offsets per axis
    # head-major tokens, (h, T + 1, d), the last row zeros for padding: a window's rows are then
    # one gather, and every product below is a batched matrix product over the heads
    q_pad, k_pad, v_pad = (_pad_row(x.float()).transpose(0, 1).contiguous() for x in (q, k, v))
    # the three axes' tables side by side, (h, d, 3 (2L - 1)): one product gives every axis and
    # offset term of a token; relative index r on axis a is column a (2L - 1) + r
    q_rpe, k_rpe, v_rpe = (t.float().permute(2, 3, 1, 0).reshape(heads, t.shape[3], -1) for t in (q_table, k_table, v_table))
    v_rpe = v_rpe.transpose(1, 2)  # (h, 3 (2L - 1), d)
    padded = (q_pad, k_pad, v_pad, _pad_row(quantised))
    all_rows = torch.arange(3 * span, device=q.device)
    full = ((q_rpe, k_rpe, v_rpe), torch.arange(3, device=q.device) * span + (span - 1) // 2)
    reach = [_reachable_rows(shape, quant_size, span, q.device) for shape in shapes] if shapes and quant_size else None
    outputs = []
    for table in tables:
        if _tracing():  # one piece, so that the exported graph keeps the number of windows symbolic
            outputs.append(_attend_windows(table, num_tokens, padded, *full))
            continue
        rpe, axis_offset = full
        group = _single_group(table, len(reach)) if reach is not None else None
        if group is not None:  # a bucket (partition_windows bucketed) holds windows of one group
            rows, axis_offset = reach[group]
            if len(rows) < len(all_rows):
                rpe = (q_rpe[:, :, rows], k_rpe[:, :, rows], v_rpe[:, rows])
        windows, length = table.shape
        # the largest temporaries are (heads, windows, length, 3 length) and (..., table rows)
        step = max(1, CHUNK_ELEMENTS // (heads * length * max(3 * length, rpe[0].shape[-1])))
        for start in range(0, windows, step):
            outputs.append(_attend_windows(table[start : start + step], num_tokens, padded, rpe, axis_offset))
    return torch.cat(outputs)[token_positions(tables, num_tokens)]


def _single_group(table: torch.Tensor, groups: int) -> int | None:
    """The head group of every token in ``table``, or None when it mixes groups (or is empty)."""
    tokens = table[table >= 0]
    if not len(tokens):
        return None
    group = tokens % groups
    return int(group[0]) if bool((group == group[0]).all()) else None


def _reachable_rows(shape: Sequence[int], quant_size: float, span: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The table columns a window of ``shape`` can reach, and where each axis's offset 0 lands.

    A side of ``s`` stage voxels holds ``n = ceil(s / quant_size)`` quantised positions, so
    relative offsets run over ``-(n - 1) .. n - 1``: rows ``L - n .. L + n - 2`` of axis a's
    ``2L - 1``. Returns the kept columns of the side-by-side tables and, per axis, the column of
    offset 0 in the kept set.
    """
    centre = (span - 1) // 2
    rows, zero, kept = [], [], 0
    for axis, side in enumerate(shape):
        n = min(math.ceil(side / quant_size - 1e-6), centre + 1)
        rows.append(axis * span + torch.arange(centre - (n - 1), centre + n, device=device))
        zero.append(kept + n - 1)
        kept += 2 * n - 1
    return torch.cat(rows), torch.tensor(zero, device=device)


def _attend_windows(table: torch.Tensor, num_tokens: int, padded: tuple, rpe: tuple, axis_offset: torch.Tensor) -> torch.Tensor:
    """Attention inside the windows of one (W, L) table; returns (W * L, h, d) in table order.

    ``rpe`` are the side-by-side tables (h, d, R), (h, d, R), (h, R, d) and ``axis_offset`` (3,) the
    column of relative offset 0 of each axis among their R columns. Layout: heads first,
    (h, W, L, ...), so that the position-table products are one batched matrix product per head
    over all the window's tokens, and relative offsets are laid out axis-major, (..., 3, L), so
    that the sum over the three axes runs along contiguous rows.
    """
    q_pad, k_pad, v_pad, quant_pad = padded
    q_rpe, k_rpe, v_rpe = rpe
    heads, dim = q_pad.shape[0], q_pad.shape[2]
    columns = q_rpe.shape[-1]
    index = torch.where(table < 0, torch.full_like(table, num_tokens), table)  # (W, L)
    windows, length = table.shape
    qw, kw, vw = (x[:, index] for x in (q_pad, k_pad, v_pad))  # (h, W, L, d)
    by_token = quant_pad[index]  # (W, L, 3)
    pos = by_token.transpose(1, 2).contiguous()  # (W, 3, L)
    # rel[w, i, a, j]: the column of u_ia - u_ja (key j seen from query i, axis a); rel_t[w, j, a, i]
    # the column of the same offset looked up from key j (the key term's projection). The operands
    # are laid out so that each difference comes out contiguous as (W, L, 3, L), and the reshape
    # below is a view, not a copy of these, the largest integer tensors of the layer.
    rel = ((by_token + axis_offset)[:, :, :, None] - pos[:, None, :, :]).reshape(1, windows, length, 3 * length)
    rel_t = ((pos + axis_offset[:, None])[:, None, :, :] - by_token[:, :, :, None]).reshape(1, windows, length, 3 * length)
    rel, rel_t = rel.expand(heads, -1, -1, -1), rel_t.expand(heads, -1, -1, -1)

    def position_term(x, table_rpe, lookup):
        projected = torch.bmm(x.reshape(heads, windows * length, dim), table_rpe)  # (h, W L, R)
        picked = torch.gather(projected.view(heads, windows, length, columns), -1, lookup)
        return picked.view(heads, windows, length, 3, length).sum(-2)  # (h, W, L, L)

    logits = qw @ kw.transpose(-1, -2) + position_term(qw, q_rpe, rel) + position_term(kw, k_rpe, rel_t).transpose(-1, -2)
    padding = (table < 0)[None, :, None, :]
    attention = torch.softmax(logits.masked_fill(padding, float("-inf")), dim=-1)  # (h, W, L, L)
    # value term: attention weights binned by relative offset per axis, then one product with T_v
    spread = attention.unsqueeze(-2).expand(-1, -1, -1, 3, -1).reshape(heads, windows, length, 3 * length)
    bins = attention.new_zeros(heads, windows, length, columns).scatter_add_(-1, rel, spread)
    out = attention @ vw + torch.bmm(bins.view(heads, windows * length, columns), v_rpe).view(heads, windows, length, dim)
    return out.permute(1, 2, 0, 3).reshape(windows * length, heads, dim)


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
        arguments = (*tokens, tables, quantised, self.q_table, self.k_table, self.v_table, self.shapes, self.quant_size)
        if torch.is_autocast_enabled(q.device.type):
            # the attention arithmetic stays in float32 under mixed precision, as in the official kernels
            with torch.autocast(q.device.type, enabled=False):
                out = window_attention(*arguments)
        else:
            out = window_attention(*arguments)
        return out.reshape(m, self.num_heads, self.head_dim).to(q.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, windows={self.shapes}, shift={self.shift}, heads={self.num_heads}"
