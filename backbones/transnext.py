"""TransNeXt: robust foveal visual perception for vision Transformers, registered with timm.

Paper: D. Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", CVPR 2024
(arXiv:2311.17132). Official code: github.com/DaiShiResearch/TransNeXt (a CUDA extension and a
native PyTorch version, both built for one input size).

What this file implements, in the paper's order:

1. Aggregated Attention (Sec. 3.2, Eq. 9): every query attends in one softmax to two key sets,
   its 3 x 3 sliding-window neighbourhood (pixel-focused attention, Sec. 3.1; neighbours outside
   the image are masked) and a pooled view of the whole map (the map through a 1 x 1 conv and
   GELU, average-pooled to a fixed grid, layer-normed). Queries and keys are L2-normalised; the
   queries get a learnable query embedding and are scaled by ``softplus(temperature)`` times the
   log of the number of keys each query sees ("length-scaled cosine attention"). The pooled keys
   get a continuous relative position bias from a 2-layer MLP over log-spaced offsets, the local
   keys a learned bias per window position. Learnable tokens add query-dependent affinities to
   the local value weights (the learnable-token-interaction term). The last stage uses plain
   multi-head attention with the same cosine scaling and position-bias MLP.
2. Convolutional GLU (Sec. 3.3): a gated channel mixer whose gate passes a depth-wise 3 x 3
   convolution and GELU.
3. The four variants of Table 1 (Micro, Tiny, Small, Base), a hierarchy of four stages with
   overlapping patch embeddings at strides 4, 8, 16, 32.

Differences from the official code, all at run time, none in the weights:

* Nothing depends on the input size at construction. The pooled grid has a fixed side
  ``pool_size`` (7, the paper's 224 x 224 setting and its "linear inference mode"), the window
  mask, the per-query length scale and the position-bias lookup are computed from the input's
  size in each forward pass. At 224 x 224 this is exactly the official model; at other sizes it
  is the official "linear inference mode" (``--fixed-pool-size 7``), so memory and time grow
  linearly with the number of pixels in stages 1-3 (stage 4's plain attention is quadratic in its
  tokens, 1/1024 of the pixels).
* The sliding window is computed by shifting padded keys and values, nine multiply-reduce steps
  over whole maps, not by unfolding them into a 9x larger tensor.

Parameters and multiply-accumulates at 224 x 224 (``python benchmarks/transnext_throughput.py flops``;
``torch.utils.flop_counter`` counts matrix products and convolutions, the window's element-wise dot
products are added analytically; the paper counts with fvcore, which also sees e.g. the official
position-bias tables, hence about 3 % more):

    variant   params (this / paper)   GMACs (this / paper GFLOPs)
    micro     12.81 M / 12.8 M        2.61 / 2.7
    tiny      28.26 M / 28.2 M        5.67 / 5.7
    small     49.74 M / 49.7 M        10.21 / 10.3
    base      89.72 M / 89.7 M        18.21 / 18.4

Official checkpoints load through ``checkpoint_filter_fn`` from a local file
(``timm.create_model("transnext_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=path))``);
nothing is ever downloaded.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, LayerNorm, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import nn

__all__ = ["TransNeXt", "AggregatedAttention", "ConvolutionalGLU", "checkpoint_filter_fn"]


# -- geometry that depends on the input size (computed per forward pass) ---------------------


def _tracing() -> bool:
    """True while torch.export / dynamo trace the model (the ONNX exporter does)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def pooled_axis_offsets(length, pooled, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets from each query position to each pooled key position along one axis.

    Adaptive average pooling of ``length`` positions to ``pooled`` bins puts key ``j`` at the
    centre of its bin ``[start_j, end_j)``, i.e. at ``(start_j + end_j - 1) / 2`` (the official
    code pools ``arange(length)`` to get the same centres). Every offset is therefore a multiple
    of 1/2. Returns the distinct offsets ``(G,)`` and, for every (query, key) pair, its index into
    them ``(length, pooled)``, so that the position-bias MLP runs once per distinct offset.

    Eagerly the offsets are deduplicated exactly (``torch.unique``); while tracing for export the
    whole half-integer range is used instead (a static-shape superset with the same values).
    """
    query = torch.arange(length, device=device)
    key = torch.arange(pooled, device=device)
    start = torch.div(key * length, pooled, rounding_mode="floor")
    end = torch.div((key + 1) * length + pooled - 1, pooled, rounding_mode="floor")
    twice_offset = 2 * query[:, None] - (start + end - 1)[None, :]
    if not _tracing():
        values, index = torch.unique(twice_offset, return_inverse=True)
        return values.float() / 2, index
    lowest = -(((pooled - 1) * length) // pooled + length - 1)  # last query 0 to the last bin centre
    highest = 2 * (length - 1) - ((length + pooled - 1) // pooled - 1)  # last query to the first centre
    values = torch.arange(lowest, highest + 1, device=device)
    return values.float() / 2, twice_offset - lowest


def adaptive_average_pool(x: torch.Tensor, size: tuple) -> torch.Tensor:
    """Adaptive average pooling of a channels-last map (B, H, W, C) to (B, Ph, Pw, C).

    While tracing for export it is written as two products with bin-averaging matrices: the
    exporter's own decomposition of adaptive pooling bakes the traced sizes into its indices.
    """
    if not _tracing():
        return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1)

    def bins(length, count) -> torch.Tensor:  # (count, length): row j averages [start_j, end_j)
        position, index = torch.arange(length, device=x.device), torch.arange(count, device=x.device)
        start = torch.div(index * length, count, rounding_mode="floor")
        end = torch.div((index + 1) * length + count - 1, count, rounding_mode="floor")
        inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
        return inside.to(x.dtype) / (end - start)[:, None].to(x.dtype)

    return torch.einsum("ph,bhwc,qw->bpqc", bins(x.shape[1], size[0]), x, bins(x.shape[2], size[1]))


def log_spaced(offsets: torch.Tensor, pretrain_length: int) -> torch.Tensor:
    """The position-bias MLP's input: offsets in units of the pre-training grid, log-spaced.

    As in the paper (after Swin V2): ``x = 8 d / (L - 1)`` for a pre-training grid of side ``L``,
    then ``sign(x) log2(1 + |x|) / log2(8)``, so nearby offsets are resolved finely and far ones
    extrapolate smoothly to resolutions never seen in training.
    """
    x = offsets * (8.0 / max(pretrain_length - 1, 1))
    return torch.sign(x) * torch.log2(x.abs() + 1.0) / 3.0


class StageGeometry(NamedTuple):
    """What every block of a stage needs to know about the current input size."""

    coords_h: torch.Tensor  # (Gh,) distinct vertical offsets, log-spaced
    coords_w: torch.Tensor  # (Gw,) distinct horizontal offsets, log-spaced
    bias_index: torch.Tensor  # (N * P,) index into the (Gh, Gw) offset grid for each (query, pooled key) pair
    pooled_size: tuple  # (Ph, Pw) side of the pooled key grid, P = Ph * Pw
    length_scale: torch.Tensor  # (H, W) log of the number of keys each query sees
    off_image: Optional[torch.Tensor]  # (N, window ** 2) True where a window neighbour is off the image


def stage_geometry(
    height,
    width,
    pooled_size: tuple,
    pretrain_size: tuple[int, int],
    window_size: Optional[int],
    device: torch.device,
) -> StageGeometry:
    """Position-bias lookup, key counts and window mask for an ``height x width`` map."""
    values_h, index_h = pooled_axis_offsets(height, pooled_size[0], device)
    values_w, index_w = pooled_axis_offsets(width, pooled_size[1], device)
    coords_h, coords_w = log_spaced(values_h, pretrain_size[0]), log_spaced(values_w, pretrain_size[1])
    bias_index = (index_h[:, None, :, None] * values_w.shape[0] + index_w[None, :, None, :]).reshape(-1)
    pooled_count = pooled_size[0] * pooled_size[1]
    if window_size is None:  # plain attention: every query sees every key
        count = torch.ones(height, width, device=device) * pooled_count
        return StageGeometry(coords_h, coords_w, bias_index, pooled_size, torch.log(count), None)
    radius = window_size // 2
    shifts = torch.arange(-radius, radius + 1, device=device)

    def inside(length) -> torch.Tensor:  # (length, window): the neighbour at this shift is on the map
        position = torch.arange(length, device=device)[:, None] + shifts[None, :]
        return (position >= 0) & (position < length)

    valid = (inside(height)[:, None, :, None] & inside(width)[None, :, None, :]).reshape(height * width, -1)
    count = valid.sum(dim=1).float().view(height, width) + pooled_count
    return StageGeometry(coords_h, coords_w, bias_index, pooled_size, torch.log(count), ~valid)


# -- building blocks ---------------------------------------------------------------------------


class ConvolutionalGLU(nn.Module):
    """Convolutional GLU (Sec. 3.3): ``fc2(GELU(dwconv3x3(a)) * b)`` with ``a, b = fc1(x)``.

    The gating branch sees its 3 x 3 neighbourhood, which gives every token positional
    information from its neighbours (the paper's reason to drop explicit position embeddings in
    the channel mixer). The hidden width is 2/3 of ``hidden_features`` so that the two fc1
    outputs cost what one ordinary MLP hidden layer does. Works on channels-last maps (B, H, W, C).
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        hidden = int(2 * hidden_features / 3)
        self.fc1 = nn.Linear(in_features, 2 * hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fc1 as two products, so that the gate is a dense channels-last map: the depth-wise
        # convolution then runs in that layout without copies
        (weight_gate, weight_value), (bias_gate, bias_value) = self.fc1.weight.chunk(2), self.fc1.bias.chunk(2)
        gate = F.linear(x, weight_gate, bias_gate).permute(0, 3, 1, 2)
        gate = self.dwconv(gate.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        x = self.drop(self.act(gate) * F.linear(x, weight_value, bias_value))
        return self.drop(self.fc2(x))


def normalize_planes(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise (B, heads, head_dim, H, W) planes along head_dim, as ``F.normalize(x, dim=2)``.

    ``F.normalize`` reduces with ``linalg.vector_norm`` over a strided axis, which on CPU is about
    7x slower than summing the contiguous planes' squares; the result is the same (eps 1e-12).
    """
    return x * x.square().sum(2, keepdim=True).clamp_min(1e-24).rsqrt()


def _inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


class _CosineAttentionBase(nn.Module):
    """What both attentions share: cosine similarity with a learnable query embedding, a
    learnable temperature, and an MLP that turns log-spaced offsets into a per-head bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # softplus(temperature) starts at 1 / 0.24, as in the official code
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), _inverse_softplus(1 / 0.24)))
        self.query_embedding = nn.Parameter(trunc_normal_(torch.empty(num_heads, 1, self.head_dim), std=0.02))
        self.cpb_fc1 = nn.Linear(2, 512)
        self.cpb_act = nn.ReLU()
        self.cpb_fc2 = nn.Linear(512, num_heads)

    def position_bias(self, geometry: StageGeometry) -> torch.Tensor:
        """(heads, N, P): the bias MLP on each distinct offset, gathered for every (query, key) pair."""
        # cpb_fc1 on every (dy, dx) pair of the grid, as a sum of its two columns' contributions
        weight, bias = self.cpb_fc1.weight, self.cpb_fc1.bias
        rows = torch.addcmul(bias, geometry.coords_h[:, None], weight[:, 0])
        hidden = self.cpb_act(rows[:, None, :] + geometry.coords_w[:, None] * weight[:, 1])
        table = self.cpb_fc2(hidden.flatten(0, 1)).t()
        pooled = geometry.pooled_size[0] * geometry.pooled_size[1]
        return table.index_select(1, geometry.bias_index).view(self.num_heads, -1, pooled)

    def query_scale(self, geometry: StageGeometry) -> torch.Tensor:
        """(heads, 1, H, W): softplus(temperature) times the log of the number of keys."""
        return F.softplus(self.temperature).view(self.num_heads, 1, 1, 1) * geometry.length_scale


class AggregatedAttention(_CosineAttentionBase):
    """Aggregated attention (Sec. 3.2): a sliding window and a pooled view in one softmax.

    For query ``q_i`` with window neighbours ``N(i)`` and pooled keys ``P``:

        s_ij  = (q^_i + e) . k^_j * tau_i + b_j     (k^, q^ L2-normalised, e the query embedding,
                                                     tau_i = softplus(t) log(|N(i)| + |P|))
        a_i   = softmax over j in N(i) u P of s_ij  (off-image neighbours masked out)
        out_i = sum_{j in N(i)} (a_ij + q^_i . T_j + c_j) v_j + sum_{j in P} a_ij v_j

    where ``T`` are the learnable tokens and ``c`` their bias. Input and output are channels-last
    maps (B, H, W, C). No Python loop runs over pixels or windows; the nine window positions are
    nine shifted views of the zero-padded key and value maps.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 3,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads)
        if window_size % 2 != 1:
            raise ValueError(f"window_size must be odd, got {window_size}")
        self.window_size = window_size
        local_len = window_size**2
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # the pooled view: 1 x 1 conv (a linear layer on channels-last maps), GELU, pool, norm
        self.sr = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim)
        self.relative_pos_bias_local = nn.Parameter(trunc_normal_(torch.empty(num_heads, local_len), std=0.0004))
        self.learnable_tokens = nn.Parameter(trunc_normal_(torch.empty(num_heads, self.head_dim, local_len), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, local_len))

    def logits(self, x: torch.Tensor, geometry: StageGeometry) -> tuple[torch.Tensor, ...]:
        """Similarities of every query to its window keys and to the pooled keys.

        Returns the logits ``(B, heads, N, window**2 + P)`` (window first, row-major; off-image
        neighbours are -inf), and the normalised queries ``(B, heads, head_dim, H, W)``, the
        zero-padded values and the pooled values that ``forward`` aggregates.
        """
        batch, height, width, channels = x.shape
        heads, head_dim, radius = self.num_heads, self.head_dim, self.window_size // 2
        tokens, local_len = height * width, self.window_size**2

        # queries, keys and values as "planes" (B, heads, head_dim, H, W), straight from one
        # product with the transposed map: the window loop below then works on whole planes
        weight = torch.cat([self.q.weight, self.kv.weight])
        pixels = x.reshape(batch, tokens, channels).transpose(1, 2)
        if self.q.bias is None:
            qkv = weight @ pixels
        else:
            qkv = torch.baddbmm(torch.cat([self.q.bias, self.kv.bias])[:, None], weight.expand(batch, -1, -1), pixels)
        query, key, value = qkv.view(batch, 3, heads, head_dim, height, width).unbind(1)
        query = normalize_planes(query)
        scaled_query = (query + self.query_embedding.view(heads, head_dim, 1, 1)) * self.query_scale(geometry)
        key_padded = F.pad(normalize_planes(key), (radius,) * 4)
        value_padded = F.pad(value, (radius,) * 4)

        # pixel-focused attention: the window's keys are shifted views of the zero-padded map;
        # neighbours off the image get -inf through the bias (the paper masks them)
        local = torch.stack(
            [(scaled_query * key_padded[..., dy : dy + height, dx : dx + width]).sum(2) for dy, dx in self._shifts()],
            dim=-1,
        )
        local_bias = self.relative_pos_bias_local[:, None, :].masked_fill(geometry.off_image, float("-inf"))
        local = local.view(batch, heads, tokens, local_len) + local_bias

        # the pooled view of the whole map: (B, heads, P, head_dim) keys and values
        pooled = adaptive_average_pool(self.act(self.sr(x)), geometry.pooled_size)
        pooled = self.norm(pooled.flatten(1, 2))
        key_pool, value_pool = self.kv(pooled).view(batch, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        query_rows = scaled_query.view(batch, heads, head_dim, tokens).transpose(-1, -2)
        pool = query_rows @ F.normalize(key_pool, dim=-1).transpose(-1, -2) + self.position_bias(geometry)
        return torch.cat([local, pool], dim=-1), query, value_padded, value_pool

    def forward(self, x: torch.Tensor, geometry: StageGeometry) -> torch.Tensor:
        batch, height, width, channels = x.shape
        heads, head_dim, local_len, tokens = self.num_heads, self.head_dim, self.window_size**2, height * width
        logits, query, value_padded, value_pool = self.logits(x, geometry)

        # one softmax over both key sets, then each set aggregates its own values
        attn = self.attn_drop(logits.softmax(dim=-1))
        attn_local, attn_pool = attn[..., :local_len], attn[..., local_len:]
        token_affinity = self.learnable_tokens.transpose(1, 2) @ query.view(batch, heads, head_dim, tokens)
        weight_local = token_affinity + attn_local.transpose(-1, -2) + self.learnable_bias.view(heads, local_len, 1)
        weight_local = weight_local.view(batch, heads, local_len, 1, height, width)
        out = (value_pool.transpose(-1, -2) @ attn_pool.transpose(-1, -2)).view(batch, heads, head_dim, height, width)
        for index, (dy, dx) in enumerate(self._shifts()):
            out = out.addcmul_(weight_local[:, :, index], value_padded[..., dy : dy + height, dx : dx + width])

        # output projection on the transposed planes, back to a channels-last map
        rows = out.view(batch, channels, tokens).transpose(1, 2)
        out = torch.baddbmm(self.proj.bias, rows, self.proj.weight.t().expand(batch, -1, -1))
        return self.proj_drop(out.view(batch, height, width, channels))

    def _shifts(self) -> list[tuple[int, int]]:
        """Window positions as (row, column) offsets into the padded map, row-major like unfold."""
        return [(dy, dx) for dy in range(self.window_size) for dx in range(self.window_size)]


class Attention(_CosineAttentionBase):
    """The last stage's plain multi-head attention, with the same length-scaled cosine
    similarity, query embedding and continuous position bias (every token is a key)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, geometry: StageGeometry) -> torch.Tensor:
        batch, height, width, channels = x.shape
        tokens = height * width
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        scale = self.query_scale(geometry).view(self.num_heads, tokens, 1)
        query = (F.normalize(query, dim=-1) + self.query_embedding) * scale
        bias = self.position_bias(geometry).to(query.dtype)
        out = F.scaled_dot_product_attention(
            query,
            F.normalize(key, dim=-1),
            value,
            attn_mask=bias,
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=1.0,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, height, width, channels)))


class TransNeXtBlock(nn.Module):
    """Pre-norm block: token mixer (aggregated or plain attention), then the convolutional GLU."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: Optional[int],
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        if window_size is None:
            self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        else:
            self.attn = AggregatedAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = ConvolutionalGLU(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, geometry: StageGeometry) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), geometry))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: a strided convolution wider than its stride, then LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW in, channels-last out
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class TransNeXtStage(nn.Module):
    """Patch embedding, blocks and a final LayerNorm at one resolution. NCHW in and out.

    ``window_size=None`` makes the stage use plain attention (the paper's stage 4).
    """

    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: Optional[int],
        pool_size: int,
        pretrain_size: tuple[int, int],
        patch_size: int,
        stride: int,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Union[float, list[float]] = 0.0,
    ):
        super().__init__()
        self.window_size = window_size
        self.pool_size = pool_size
        self.pretrain_size = pretrain_size  # side of this stage's map at the pre-training resolution
        self.grad_checkpointing = False
        drop_path = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.patch_embed = OverlapPatchEmbed(in_chans, dim, patch_size, stride)
        self.blocks = nn.ModuleList(
            TransNeXtBlock(dim, num_heads, mlp_ratio, window_size, qkv_bias, proj_drop, attn_drop, drop_path[i])
            for i in range(depth)
        )
        self.norm = LayerNorm(dim, eps=1e-6)

    def geometry(self, height, width, device: torch.device) -> StageGeometry:
        if self.window_size is None:
            pooled = (height, width)  # every token is a key
        else:
            pooled = (torch.sym_min(self.pool_size, height), torch.sym_min(self.pool_size, width))
        return stage_geometry(height, width, pooled, self.pretrain_size, self.window_size, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        geometry = self.geometry(x.shape[1], x.shape[2], x.device)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, geometry)
            else:
                x = block(x, geometry)
        return self.norm(x).permute(0, 3, 1, 2)


class TransNeXt(nn.Module):
    """TransNeXt (Shi, CVPR 2024): four stages of aggregated attention and convolutional GLU.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        global_pool: ``'avg'`` or ``''`` (no pooling; ``forward`` then returns the map).
        embed_dims, depths, num_heads, mlp_ratios: per stage, Table 1 of the paper.
        sr_ratios: per-stage spatial-reduction ratios of the official code; a stage with ratio 1
            uses plain attention, the others aggregated attention.
        window_size: side of the sliding window (odd).
        pool_size: side of the pooled key grid in every aggregated-attention stage. 7 is the
            paper's setting at 224 x 224 and its "linear inference mode" at other sizes; the
            384 x 384 fine-tuned checkpoints were trained with 12.
        pretrain_size: input side the weights were pre-trained at; the position-bias MLP's
            coordinates are expressed in units of that grid (224 for every official checkpoint
            except Micro-AAAA's 256).
        qkv_bias, drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: as in timm.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: tuple[int, ...] = (48, 96, 192, 384),
        depths: tuple[int, ...] = (2, 2, 15, 2),
        num_heads: tuple[int, ...] = (2, 4, 8, 16),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        window_size: int = 3,
        pool_size: int = 7,
        pretrain_size: int = 224,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.output_fmt = "NCHW"
        pretrain_size = to_2tuple(pretrain_size)
        total = sum(depths)  # stochastic depth rises linearly from 0 to drop_path_rate over all blocks
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        drop_paths = [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(len(depths))]
        self.feature_info = []
        stages = []
        previous = in_chans
        for i, dim in enumerate(embed_dims):
            stride = 4 * 2**i
            stages.append(
                TransNeXtStage(
                    in_chans=previous,
                    dim=dim,
                    depth=depths[i],
                    num_heads=num_heads[i],
                    mlp_ratio=mlp_ratios[i],
                    window_size=window_size if sr_ratios[i] > 1 else None,
                    pool_size=pool_size,
                    pretrain_size=(pretrain_size[0] // stride, pretrain_size[1] // stride),
                    patch_size=7 if i == 0 else 3,
                    stride=4 if i == 0 else 2,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_paths[i],
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
            previous = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The official initialisation: truncated normal linears, He-normal (fan-out) convolutions."""
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- timm's model contract ---------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Temperatures, query embeddings and position biases, as the official training excludes."""
        keywords = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature")
        return {name for name, _ in self.named_parameters() if any(word in name for word in keywords)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stages\.0\.patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.(?:patch_embed|norm)", (99999,)),
            ],
        )  # fmt: skip

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Stage outputs (already layer-normed by each stage) as NCHW maps, timm's API."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: Union[int, list[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.head.reset(0, "", in_features=self.num_features)
        elif prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -- official checkpoints ----------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: dict, model: TransNeXt) -> dict:
    """Map an official TransNeXt state dict onto this implementation's names and shapes.

    Official names are flat per stage (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``, ``head``);
    here they sit under ``stages.{i-1}``. The pooled view's 1 x 1 convolution ``sr`` becomes a
    linear layer (weight ``(C, C, 1, 1)`` -> ``(C, C)``) and ``mlp.dwconv.dwconv`` loses a level.
    Non-persistent buffers of the official model (position tables, masks) are never stored.
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if "stages.0.patch_embed.proj.weight" in state_dict:
        return state_dict  # already in this layout
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed.", key)
        key = re.sub(r"^block(\d+)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.", key)
        key = re.sub(r"^norm(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm.", key)
        key = re.sub(r"^head\.", "head.fc.", key)
        key = key.replace("mlp.dwconv.dwconv.", "mlp.dwconv.")
        if key.endswith("attn.sr.weight") and value.ndim == 4:
            value = value.flatten(1)
        out[key] = value
    return out


# -- variants (timm registry) ------------------------------------------------------------------


def _cfg(origin_url: str = "", **kwargs) -> dict:
    return {
        "url": "",  # never downloaded: load a local copy of ``origin_url`` with pretrained_cfg_overlay
        "origin_url": origin_url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.95,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "stages.0.patch_embed.proj",
        "classifier": "head.fc",
        "fixed_input_size": False,
        "license": "apache-2.0",
        "paper_ids": "arXiv:2311.17132",
        "paper_name": "TransNeXt: Robust Foveal Visual Perception for Vision Transformers",
        **kwargs,
    }


def _official(size: str, name: str) -> str:
    return f"https://huggingface.co/DaiShiResearch/transnext-{size}/resolve/main/{name}.pth"


_NOTE_384 = ("fine-tuned at 384 with a 12 x 12 pooled grid: build with pool_size=12",)
default_cfgs = generate_default_cfgs(
    {
        "transnext_micro.in1k": _cfg(_official("micro-224-1k", "transnext_micro_224_1k")),
        "transnext_tiny.in1k": _cfg(_official("tiny-224-1k", "transnext_tiny_224_1k")),
        "transnext_small.in1k": _cfg(_official("small-224-1k", "transnext_small_224_1k")),
        "transnext_small.in1k_384": _cfg(
            _official("small-384-1k-ft-1k", "transnext_small_384_1k_ft_1k"),
            input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, notes=_NOTE_384,
        ),
        "transnext_base.in1k": _cfg(_official("base-224-1k", "transnext_base_224_1k")),
        "transnext_base.in1k_384": _cfg(
            _official("base-384-1k-ft-1k", "transnext_base_384_1k_ft_1k"),
            input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, notes=_NOTE_384,
        ),
        "transnext_test": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
    }
)  # fmt: skip


def _create_transnext(variant: str, pretrained: bool = False, **kwargs) -> TransNeXt:
    if pretrained:
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        cfg = kwargs.get("pretrained_cfg")
        given = overlay.get("file") or overlay.get("state_dict") or (isinstance(cfg, dict) and cfg.get("file"))
        if not given:
            origin = default_cfgs[variant].cfgs[default_cfgs[variant].tags[0]].origin_url or "the official release"
            raise RuntimeError(
                f"{variant}: pretrained=True needs a local copy of the official weights (nothing is downloaded); "
                f"get {origin} and pass pretrained_cfg_overlay=dict(file='path/to/it.pth')"
            )
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        TransNeXt,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


@register_model
def transnext_micro(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Micro: 12.8 M parameters, 82.5 % ImageNet-1K top-1 at 224."""
    args = dict(embed_dims=(48, 96, 192, 384), depths=(2, 2, 15, 2), num_heads=(2, 4, 8, 16))
    return _create_transnext("transnext_micro", pretrained, **dict(args, **kwargs))


@register_model
def transnext_tiny(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Tiny: 28.2 M parameters, 84.0 % ImageNet-1K top-1 at 224."""
    args = dict(embed_dims=(72, 144, 288, 576), depths=(2, 2, 15, 2), num_heads=(3, 6, 12, 24))
    return _create_transnext("transnext_tiny", pretrained, **dict(args, **kwargs))


@register_model
def transnext_small(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Small: 49.7 M parameters, 84.7 % ImageNet-1K top-1 at 224."""
    args = dict(embed_dims=(72, 144, 288, 576), depths=(5, 5, 22, 5), num_heads=(3, 6, 12, 24))
    return _create_transnext("transnext_small", pretrained, **dict(args, **kwargs))


@register_model
def transnext_base(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Base: 89.7 M parameters, 84.8 % ImageNet-1K top-1 at 224."""
    args = dict(embed_dims=(96, 192, 384, 768), depths=(5, 5, 23, 5), num_heads=(4, 8, 16, 32))
    return _create_transnext("transnext_base", pretrained, **dict(args, **kwargs))


@register_model
def transnext_test(pretrained: bool = False, **kwargs) -> TransNeXt:
    """A tiny TransNeXt for tests (like timm's ``test_*`` models): every mechanism, ~0.1 M parameters."""
    args = dict(
        embed_dims=(16, 24, 32, 48), depths=(1, 1, 2, 1), num_heads=(2, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
        pool_size=2, pretrain_size=64,
    )  # fmt: skip
    return _create_transnext("transnext_test", pretrained, **dict(args, **kwargs))
