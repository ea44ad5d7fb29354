"""The frame segmentor of GraphEcho: an FPN decoder over a 2D backbone (paper Sec. 3.1).

GraphEcho segments every frame with an FPN: the backbone's last four feature maps (C2-C5) are
reduced to ``fpn_dim`` channels by 1x1 lateral convolutions and merged top-down into the pyramid
P2-P5, which is what the graph matching and the domain discriminators see. A semantic branch
brings every level to P2's resolution (3x3 convolution, GroupNorm, ReLU and 2x upsampling per
level), sums them and classifies each pixel; the logits are upsampled to the input size.

The backbone is any timm model that supports ``features_only`` (the official code uses a VGG16
with batch norm for CardiacUDA and a ResNet-50 for CAMUS/EchoNet, both from scratch and on one
grey channel), or, with ``backbone=None``, ``EchoCNN``: a small VGG-style network of the same
shape for CPU-sized runs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.create import create_backbone


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class EchoCNN(nn.Module):
    """A small VGG-style encoder: a stride-2 stem, then one stage per width, each halving the
    resolution (two 3x3 conv-BN-ReLU). With four widths it returns C2-C5 at strides 4 to 32,
    the levels the official VGG16 feeds its FPN; ``feature_info`` mimics timm's."""

    def __init__(self, in_chans: int = 1, widths: Sequence[int] = (16, 32, 48, 64), stem_width: int = 16):
        super().__init__()
        self.stem = conv_bn_relu(in_chans, stem_width, stride=2)
        stages, channels = [], stem_width
        for width in widths:
            stages.append(nn.Sequential(conv_bn_relu(channels, width, stride=2), conv_bn_relu(width, width)))
            channels = width
        self.stages = nn.ModuleList(stages)
        self.channels = list(widths)
        self.reductions = [2 ** (i + 2) for i in range(len(widths))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class FPNSegmentor(nn.Module):
    """Backbone + FPN + semantic branch. Returns ``(logits, [P2, P3, P4, P5])``.

    Args:
        num_classes: output channels (background + one per structure).
        backbone: timm model name (``features_only``); ``None`` builds ``EchoCNN``.
        backbone_kwargs: extra timm arguments (e.g. ``out_indices``), or ``EchoCNN`` arguments.
        in_chans: input channels (echo is grey: 1).
        fpn_dim: channels of P2-P5 (the graph nodes' dimension); 256 in the paper.
        semantic_dim: channels of the semantic branch; 128 in the paper.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: Optional[str] = None,
        backbone_kwargs: Optional[dict] = None,
        in_chans: int = 1,
        fpn_dim: int = 256,
        semantic_dim: int = 128,
    ):
        super().__init__()
        kwargs = dict(backbone_kwargs or {})
        if backbone:
            self.encoder = create_backbone(backbone, features_only=True, in_chans=in_chans, **kwargs)
            channels = self.encoder.feature_info.channels()
            reductions = self.encoder.feature_info.reduction()
        else:
            self.encoder = EchoCNN(in_chans=in_chans, **kwargs)
            channels, reductions = self.encoder.channels, self.encoder.reductions
        if len(channels) < 4:
            raise ValueError(f"backbone {backbone!r} gives {len(channels)} feature levels; the FPN needs 4")
        self.levels = 4
        self.channels = channels[-4:]
        self.strides = reductions[-4:]
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_dim, 1) for c in self.channels)
        # Semantic branch (Panoptic FPN's): level i (P2 = 0) takes max(i, 1) conv-GN-ReLU steps, each
        # followed by a 2x upsampling, to reach P2; the last step narrows to ``semantic_dim``. (The
        # official code shares one such conv across levels and upsamples straight to P2's size.)
        self.semantic = nn.ModuleList()
        for level in range(self.levels):
            steps = max(level, 1)
            blocks = []
            for step in range(steps):
                out = semantic_dim if step == steps - 1 else fpn_dim
                blocks.append(
                    nn.Sequential(nn.Conv2d(fpn_dim, out, 3, padding=1), nn.GroupNorm(group_count(out), out), nn.ReLU(inplace=True))
                )
            self.semantic.append(nn.ModuleList(blocks))
        self.classifier = nn.Conv2d(semantic_dim, num_classes, 1)

    def pyramid(self, image: torch.Tensor) -> list[torch.Tensor]:
        """P2-P5 of a (N, C, H, W) batch of frames (top-down merged lateral maps)."""
        features = self.encoder(image)[-self.levels :]
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        pyramid = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            top = F.interpolate(pyramid[0], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            pyramid.insert(0, top + lateral)
        return pyramid

    def decode(self, pyramid: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Per-pixel class logits at ``size`` from the pyramid."""
        target = pyramid[0].shape[-2:]
        merged = 0
        for index, (level, blocks) in enumerate(zip(pyramid, self.semantic)):
            x = level
            for step, block in enumerate(blocks):
                x = block(x)
                if index == 0:
                    continue
                if step == len(blocks) - 1:  # the last step lands exactly on P2 (odd sizes round)
                    x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
                else:
                    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            merged = merged + x
        return F.interpolate(self.classifier(merged), size=size, mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pyramid = self.pyramid(image)
        return self.decode(pyramid, image.shape[-2:]), pyramid


def group_count(channels: int) -> int:
    """GroupNorm groups: 32 where the channels allow (as in the paper's discriminators), at least
    two channels per group (so that a single 1 x 1 map still normalises)."""
    return max(g for g in range(1, min(32, channels // 2) + 1) if channels % g == 0) if channels > 1 else 1


class SegmentFrames(nn.Module):
    """Inference graph for export: frames (N, 1, H, W) in [0, 1] -> class logits (N, C, H, W)."""

    def __init__(self, segmentor: FPNSegmentor):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.segmentor(image)[0]
