"""TransDAE's hierarchical dual-attention encoder, registered in timm.

Paper: B. Azad, P. Adibfar, K. Fu, "TransDAE: Dual Attention Mechanism in a Hierarchical
Transformer for Efficient Medical Image Segmentation", arXiv:2409.02018 (2024). TransDAE has no
public code; where the paper is silent this file follows its predecessor DAE-Former (R. Azad et
al., "DAE-Former: Dual Attention-guided Efficient Transformer for Medical Image Segmentation",
PRIME @ MICCAI 2023), whose code is public.

The encoder (paper, "Encoder" and "Dual Attention Transformer Block"):

* ``OverlapPatchEmbed``: overlapping strided convolutions make the tokens (kernel 7 / stride 4
  for the first stage, kernel 3 / stride 2 after it), so each stage halves the resolution and
  widens the channels;
* ``EfficientAttention``: spatial attention of linear cost in the number of tokens (Shen et al.,
  "Efficient Attention", WACV 2021): keys are normalised over tokens, queries over channels, and
  the product is taken as ``Q (K^T V)`` instead of ``(Q K^T) V``; keys and values can first be
  shrunk by a strided convolution (the spatial reduction of PVT / SegFormer, ``sr_ratio``);
* ``ChannelAttention``: transposed (cross-covariance) attention between channels with a
  learnable temperature per head (XCiT's form, as DAE-Former uses it);
* ``DualTransformerBlock``: spatial attention, feed-forward, channel attention, feed-forward,
  each pre-normed and residual (DAE-Former's order); the feed-forward is Mix-FFN with a skip
  around its depth-wise convolution.

``transdae`` is the paper-scale variant (DAE-Former's encoder: three stages of width 128, 320,
512, two blocks each); ``transdae_tiny`` is a small one for CPUs and tests. Both follow timm's
contract: ``timm.create_model("transdae", features_only=True)`` returns the stage outputs as
NCHW maps with ``feature_info``, and ``forward_features`` / ``forward_head`` / ``reset_classifier``
serve classification.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["ChannelAttention", "DualTransformerBlock", "EfficientAttention", "MixFFN", "TransDAE"]


class OverlapPatchEmbed(nn.Module):
    """Overlapping patches: a strided convolution with padding ``kernel // 2``, then LayerNorm.

    Takes NCHW and returns channels-last (B, H', W', C) tokens.
    """

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class EfficientAttention(nn.Module):
    """Linear-cost spatial attention on channels-last tokens (B, H, W, C).

    Per head, with ``q`` softmax-normalised over its channels (per token) and ``k`` over the
    tokens (per channel), the output ``q (k^T v)`` equals the "full" ``(q k^T) v`` whose N x M
    attention matrix is never formed: the cost is ``O(N d_k d_v)`` instead of ``O(N M d)``.
    With ``sr_ratio > 1`` the keys and values come from an ``sr_ratio``-times coarser grid
    (a strided convolution and LayerNorm), so ``M = N / sr_ratio^2``.

    Args:
        dim: token width.
        key_dim / value_dim: total query-key and value widths over all heads (DAE-Former: ``dim``).
        num_heads: heads; DAE-Former uses one.
        sr_ratio: spatial reduction of keys and values (1 = none).
    """

    def __init__(self, dim: int, key_dim: int, value_dim: int, num_heads: int = 1, sr_ratio: int = 1):
        super().__init__()
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"key_dim {key_dim} and value_dim {value_dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, key_dim)
        self.key = nn.Linear(dim, key_dim)
        self.value = nn.Linear(dim, value_dim)
        self.reprojection = nn.Linear(value_dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.reduce = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.reduce_norm = nn.LayerNorm(dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, heads, N, c)

    def normalised_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head ``q`` (softmax over channels), ``k`` (softmax over tokens) and ``v``."""
        b, h, w, c = x.shape
        source = x
        if self.sr_ratio > 1:
            source = self.reduce_norm(self.reduce(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        source = source.reshape(b, -1, c)
        q = self._split_heads(self.query(x.reshape(b, h * w, c))).softmax(dim=-1)
        k = self._split_heads(self.key(source)).softmax(dim=-2)
        v = self._split_heads(self.value(source))
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        q, k, v = self.normalised_qkv(x)
        context = k.transpose(-2, -1) @ v  # (B, heads, d_k, d_v): the global context, linear in N
        out = (q @ context).transpose(1, 2).reshape(b, h, w, -1)
        return self.reprojection(out)


class ChannelAttention(nn.Module):
    """Transposed attention between channels, on tokens (B, N, C).

    Per head, queries and keys are the channels' token profiles, L2-normalised over the tokens;
    the ``C/h x C/h`` cosine similarities are scaled by a learnable temperature (one per head)
    and softmaxed. The cost is linear in the number of tokens.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1)
        q = F.normalize(q, dim=-1)  # (B, heads, C/h, N), unit length over the tokens
        k = F.normalize(k, dim=-1)
        attention = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)  # (B, heads, C/h, C/h)
        out = (attention @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj(out)


class MixFFN(nn.Module):
    """Mix-FFN with a skip: ``fc2(GELU(LN(dwconv3x3(fc1 x) + fc1 x)))`` on (B, H, W, C).

    The depth-wise convolution gives the tokens position information in place of an explicit
    positional encoding (SegFormer); DAE-Former adds the skip around it.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(self.act(self.norm(x)))


class DualTransformerBlock(nn.Module):
    """Spatial then channel attention, each followed by Mix-FFN; channels-last (B, H, W, C).

    ``x += EA(LN x); x += FFN(LN x); x += CA(LN x); x += FFN(LN x)``, as in DAE-Former.
    """

    def __init__(
        self,
        dim: int,
        key_dim: Optional[int] = None,
        value_dim: Optional[int] = None,
        attention_heads: int = 1,
        channel_heads: int = 8,
        sr_ratio: int = 1,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.spatial_attention = EfficientAttention(dim, key_dim or dim, value_dim or dim, attention_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp1 = MixFFN(dim, hidden)
        self.norm3 = nn.LayerNorm(dim)
        self.channel_attention = ChannelAttention(dim, channel_heads)
        self.norm4 = nn.LayerNorm(dim)
        self.mlp2 = MixFFN(dim, hidden)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x + self.drop_path(self.spatial_attention(self.norm1(x)))
        x = x + self.drop_path(self.mlp1(self.norm2(x)))
        x = x + self.drop_path(self.channel_attention(self.norm3(x).reshape(b, h * w, c)).view(b, h, w, c))
        return x + self.drop_path(self.mlp2(self.norm4(x)))


class TransDAEStage(nn.Module):
    """Overlapping patch embedding, dual-attention blocks and a final LayerNorm; NCHW in and out."""

    def __init__(self, in_chans: int, dim: int, depth: int, patch_size: int, stride: int, drop_path: Sequence[float], **block_kwargs):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_chans, dim, patch_size, stride)
        self.blocks = nn.Sequential(*[DualTransformerBlock(dim, drop_path=drop_path[i], **block_kwargs) for i in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.patch_embed(x))).permute(0, 3, 1, 2)


class TransDAE(nn.Module):
    """The hierarchical encoder: one ``TransDAEStage`` per entry of ``embed_dims``.

    Args:
        in_chans: input channels (CT slices: 1; DAE-Former repeats them to 3).
        num_classes: classifier outputs (0 = features only); timm's classification contract.
        embed_dims: width of each stage.
        depths: dual-attention blocks per stage.
        sr_ratios: spatial reduction of the efficient attention's keys and values per stage.
        attention_heads: heads of the efficient (spatial) attention.
        channel_heads: heads of the channel attention (each stage width must be divisible by it).
        mlp_ratio: Mix-FFN hidden width relative to the stage width.
        patch_sizes / patch_strides: overlapping patch embedding per stage.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly over all blocks.
        global_pool: classifier pooling.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (128, 320, 512),
        depths: Sequence[int] = (2, 2, 2),
        sr_ratios: Sequence[int] = (4, 2, 1),
        attention_heads: int = 1,
        channel_heads: int = 8,
        mlp_ratio: float = 4.0,
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        patch_strides: Sequence[int] = (4, 2, 2, 2),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        stages = len(embed_dims)
        if not (len(depths) == len(sr_ratios) == stages) or len(patch_sizes) < stages or len(patch_strides) < stages:
            raise ValueError(
                f"embed_dims {tuple(embed_dims)}, depths {tuple(depths)} and sr_ratios {tuple(sr_ratios)} need one "
                f"entry per stage, patch_sizes and patch_strides at least as many"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        blocks_before = 0
        reduction = 1
        channels = in_chans
        self.feature_info = []
        layers = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            layers.append(
                TransDAEStage(
                    channels,
                    dim,
                    depth,
                    patch_sizes[i],
                    patch_strides[i],
                    rates[blocks_before : blocks_before + depth],
                    attention_heads=attention_heads,
                    channel_heads=channel_heads,
                    sr_ratio=sr_ratios[i],
                    mlp_ratio=mlp_ratio,
                )
            )
            blocks_before += depth
            reduction *= patch_strides[i]
            channels = dim
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = channels
        self.head = ClassifierHead(channels, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith("temperature")}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_transdae(variant: str, pretrained: bool = False, **kwargs) -> TransDAE:
    stages = len(kwargs.get("embed_dims", (128, 320, 512)))
    return build_model_with_cfg(
        TransDAE,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=tuple(range(stages)), flatten_sequential=True),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "stages.0.patch_embed.proj",
        "classifier": "head.fc",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"transdae": _cfg(), "transdae_tiny": _cfg()})


@register_model
def transdae(pretrained: bool = False, **kwargs) -> TransDAE:
    """Paper scale (DAE-Former's encoder): widths 128 / 320 / 512, two blocks per stage."""
    args = dict(embed_dims=(128, 320, 512), depths=(2, 2, 2), sr_ratios=(4, 2, 1))
    return _create_transdae("transdae", pretrained, **dict(args, **kwargs))


@register_model
def transdae_tiny(pretrained: bool = False, **kwargs) -> TransDAE:
    """A small variant for CPUs: widths 32 / 64 / 128, one block per stage."""
    args = dict(embed_dims=(32, 64, 128), depths=(1, 1, 1), sr_ratios=(2, 1, 1), channel_heads=4)
    return _create_transdae("transdae_tiny", pretrained, **dict(args, **kwargs))
