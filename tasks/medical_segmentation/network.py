"""The segmentation networks: TransDAE's U-shaped decoder on any timm encoder, and a plain U-Net.

Paper: B. Azad, P. Adibfar, K. Fu, "TransDAE: Dual Attention Mechanism in a Hierarchical
Transformer for Efficient Medical Image Segmentation", arXiv:2409.02018 (2024), "Decoder" and
"Inter-Scale Interaction Module". Where the paper is silent the layout follows DAE-Former's
decoder: the deepest encoder map is expanded (``PatchExpand``), fused with the skip of the next
scale, refined by two dual-attention blocks, expanded again, and so on; a final expansion by the
first stage's stride and a 1x1 convolution give the class logits at the input resolution.

TransDAE replaces DAE-Former's skip cross-attention by the ``InterScaleInteraction`` module,
which "decomposes large-kernel operations to fuse encoder-decoder features". The paper gives no
kernel sizes; we use the decomposition of Visual Attention Network's large-kernel attention
(M.-H. Guo et al., 2022): a 5x5 depth-wise convolution, a 7x7 depth-wise convolution with
dilation 3 and a 1x1 convolution cover a 21x21 neighbourhood at the cost of a few small kernels.

The encoder is any timm model created with ``features_only=True`` (``transdae`` by default, or
TransNeXt, AFM-Net, a ResNet ...): the decoder reads the channels and strides of its stages from
``feature_info``, so nothing here depends on one backbone. ``UNet`` is the baseline the
leaderboard shows beside TransDAE: the same kind of encoder with a plain convolutional decoder.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

import backbones  # noqa: F401  (registers transdae with timm)
from backbones.create import create_backbone
from backbones.transdae import DualTransformerBlock

DECODERS = ("transdae", "unet")


class PatchExpand(nn.Module):
    """Token up-sampling by an integer ``scale`` (Swin-Unet, DAE-Former): a linear layer makes
    ``scale^2 * out_dim`` channels, a pixel shuffle spreads them over ``scale x scale``
    positions, and a LayerNorm follows. NCHW in and out."""

    def __init__(self, dim: int, out_dim: int, scale: int):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = LayerNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm(F.pixel_shuffle(x, self.scale))


class DecomposedLargeKernel(nn.Module):
    """A large-kernel convolution as depth-wise 5x5, depth-wise dilated 7x7 (dilation 3), 1x1."""

    def __init__(self, dim: int, kernel: int = 5, dilated_kernel: int = 7, dilation: int = 3):
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.depthwise_dilated = nn.Conv2d(
            dim, dim, dilated_kernel, padding=dilation * (dilated_kernel // 2), dilation=dilation, groups=dim
        )
        self.pointwise = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise_dilated(self.depthwise(x)))


class InterScaleInteraction(nn.Module):
    """Fuses a decoder map (coarse scale, up-sampled) with the encoder skip of the same size.

    The two are concatenated and mixed by a 1x1 convolution; a decomposed large kernel then
    computes, from that mixture, an attention map that re-weights it (element-wise product, as
    in large-kernel attention), so each position's fused feature depends on both scales over a
    21x21 neighbourhood. A residual connection and a LayerNorm keep the block easy to train.
    NCHW in and out; the output has ``dim`` channels.
    """

    def __init__(self, decoder_dim: int, skip_dim: int, dim: int):
        super().__init__()
        self.mix = nn.Sequential(nn.Conv2d(decoder_dim + skip_dim, dim, 1), LayerNorm2d(dim), nn.GELU())
        self.large_kernel = DecomposedLargeKernel(dim)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.norm = LayerNorm2d(dim)

    def forward(self, decoder: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        fused = self.mix(torch.cat([decoder, skip], dim=1))
        return self.norm(fused + self.proj(fused * self.large_kernel(fused)))


class DualAttentionStage(nn.Sequential):
    """Dual-attention blocks on an NCHW map (they run channels-last inside)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _scale(coarse: int, fine: int) -> int:
    if coarse % fine:
        raise ValueError(f"encoder strides {fine} -> {coarse} are not an integer ratio; the decoder needs one")
    return coarse // fine


class TransDAEDecoder(nn.Module):
    """Deepest map -> (expand, inter-scale interaction with the skip, dual blocks) per scale -> logits.

    Args:
        channels / reductions: per encoder stage, finest first (from ``feature_info``).
        num_classes: output classes (background included).
        dims: decoder width per scale, finest first, one fewer than the encoder's stages
            (default: the encoder's widths at those scales, as in DAE-Former).
        depth: dual-attention blocks per scale (DAE-Former: 2).
        channel_heads: heads of their channel attention; ``sr_ratios`` their spatial reduction.
    """

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        dims: Optional[Sequence[int]] = None,
        depth: int = 2,
        channel_heads: int = 8,
        sr_ratios: Optional[Sequence[int]] = None,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        levels = len(channels)
        dims = list(dims or channels[:-1]) + [channels[-1]]
        sr_ratios = list(sr_ratios or [1] * (levels - 1))
        if not (len(dims) == levels and len(sr_ratios) == levels - 1):
            raise ValueError(
                f"decoder dims {dims[:-1]} and sr_ratios {sr_ratios} need one entry per decoder scale ({levels - 1})"
            )
        self.expand = nn.ModuleList(
            PatchExpand(dims[i + 1], dims[i], _scale(reductions[i + 1], reductions[i]))
            for i in range(levels - 1)
        )
        self.interaction = nn.ModuleList(InterScaleInteraction(dims[i], channels[i], dims[i]) for i in range(levels - 1))
        self.blocks = nn.ModuleList(
            DualAttentionStage(
                *[
                    DualTransformerBlock(dims[i], channel_heads=channel_heads, sr_ratio=sr_ratios[i], mlp_ratio=mlp_ratio)
                    for _ in range(depth)
                ]
            )
            for i in range(levels - 1)
        )
        self.final_expand = PatchExpand(dims[0], dims[0], reductions[0])
        self.head = nn.Conv2d(dims[0], num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for i in reversed(range(len(features) - 1)):
            x = self.blocks[i](self.interaction[i](self.expand[i](x), features[i]))
        return self.head(self.final_expand(x))


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each with batch norm and ReLU (U-Net's basic unit)."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__(
            nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_chans),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_chans),
            nn.ReLU(inplace=True),
        )


class UNetDecoder(nn.Module):
    """U-Net decoder (Ronneberger et al., 2015): up-sample, concatenate the skip, two convolutions.

    Up-sampling is nearest-neighbour by the ratio of the encoder strides; a last block at the
    input resolution follows the up-sampling by the first stage's stride.
    """

    def __init__(self, channels: Sequence[int], reductions: Sequence[int], num_classes: int, dims: Optional[Sequence[int]] = None):
        super().__init__()
        levels = len(channels)
        dims = list(dims or channels[:-1]) + [channels[-1]]
        if len(dims) != levels:
            raise ValueError(f"decoder dims {dims[:-1]} need one entry per decoder scale ({levels - 1})")
        self.scales = [_scale(reductions[i + 1], reductions[i]) for i in range(levels - 1)] + [reductions[0]]
        self.blocks = nn.ModuleList(
            ConvBlock(dims[i + 1] + channels[i], dims[i]) for i in range(levels - 1)
        )
        self.final = ConvBlock(dims[0], dims[0])
        self.head = nn.Conv2d(dims[0], num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for i in reversed(range(len(features) - 1)):
            x = F.interpolate(x, scale_factor=self.scales[i], mode="nearest")
            x = self.blocks[i](torch.cat([x, features[i]], dim=1))
        if self.scales[-1] > 1:
            x = F.interpolate(x, scale_factor=self.scales[-1], mode="nearest")
        return self.head(self.final(x))


class SegmentationNetwork(nn.Module):
    """A timm encoder (``features_only``) and a decoder: CT slice in [0, 1] -> class logits.

    The slice is normalised as DAE-Former does (mean 0.5, std 0.5), repeated to the encoder's
    input channels if it wants more than one, and padded (edge replication) to a multiple of
    the encoder's largest stride; the logits are cropped back, so any slice size works.

    Args:
        backbone: a timm model name (any registered 2D backbone).
        backbone_kwargs: passed to ``timm.create_model`` (``out_indices``, widths, ``in_chans`` ...).
        decoder: ``"transdae"`` (inter-scale interaction + dual attention) or ``"unet"``.
        num_classes: classes including background (Synapse: 9).
        decoder_dims: decoder width per decoder scale, finest first (one fewer than the encoder's
            stages; default: the encoder's widths there).
        decoder_depth / decoder_channel_heads / decoder_sr_ratios: TransDAE decoder blocks.
        pretrained: load the backbone's timm weights (TransDAE trains from scratch).
    """

    def __init__(
        self,
        backbone: str = "transdae",
        backbone_kwargs: Optional[dict] = None,
        decoder: str = "transdae",
        num_classes: int = 9,
        decoder_dims: Optional[Sequence[int]] = None,
        decoder_depth: int = 2,
        decoder_channel_heads: int = 8,
        decoder_sr_ratios: Optional[Sequence[int]] = None,
        pretrained: bool = False,
    ):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        kwargs = {"in_chans": 1, **(backbone_kwargs or {})}
        self.in_chans = kwargs["in_chans"]
        self.encoder = create_backbone(backbone, pretrained=pretrained, features_only=True, **kwargs)
        channels = self.encoder.feature_info.channels()
        reductions = self.encoder.feature_info.reduction()
        self.pad_multiple = max(reductions)
        if decoder == "transdae":
            self.decoder = TransDAEDecoder(
                channels, reductions, num_classes, decoder_dims, decoder_depth, decoder_channel_heads, decoder_sr_ratios
            )
        else:
            self.decoder = UNetDecoder(channels, reductions, num_classes, decoder_dims)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        m = self.pad_multiple
        # Edge replication and the crop back are index look-ups (clamped and plain ranges) rather
        # than F.pad and slicing: their sizes are exact for any size, so the exporter keeps the
        # axes dynamic without having to prove that the padding is never negative.
        padded_height, padded_width = (height + m - 1) // m * m, (width + m - 1) // m * m
        rows = torch.arange(padded_height, device=image.device).clamp(max=height - 1)
        cols = torch.arange(padded_width, device=image.device).clamp(max=width - 1)
        x = ((image - 0.5) / 0.5).index_select(-2, rows).index_select(-1, cols)
        if self.in_chans != x.shape[1]:
            x = x.expand(-1, self.in_chans, -1, -1)
        logits = self.decoder(self.encoder(x))
        device = logits.device
        return logits.index_select(-2, torch.arange(height, device=device)).index_select(-1, torch.arange(width, device=device))
