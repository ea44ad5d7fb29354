"""Low-light enhancement with illumination-aware gamma correction (IAGC).

Paper: Y. Wang, Z. Liu, J. Liu, S. Xu, S. Liu, "Low-Light Image Enhancement with Illumination-Aware
Gamma Correction and Complete Image Modelling Network", ICCV 2023 (arXiv:2308.08220; the
network is also called COMO-ViT). There is no official code; this file implements the method
as the paper describes it, and states each choice the paper leaves open.

1. Illumination-aware gamma correction, learned coarse to elaborate (Sec. 3.1):
   ``GlobalGammaEstimator`` predicts one gamma per image from global illumination statistics,
   ``LocalGammaRefiner`` refines it into a per-pixel, per-channel gamma map, and the correction
   is computed by a truncated Taylor series (``backbones.ops.taylor_gamma``).
2. Complete image modelling (Sec. 3.2): a U-shaped Transformer whose ``LocalGlobalBlock``
   attends locally inside windows and globally across window tokens, so that every pixel can
   borrow from the whole image in one block; the cheap local operators are the windows and a
   gated depth-wise convolution feed-forward.
3. Losses: L1 + SSIM (weights are arguments). Metrics: PSNR and SSIM from torchmetrics on RGB in
   [0, 1], averaged per image, with no ground-truth-mean correction.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchvision.utils import make_grid

from backbones.create import create_backbone
from backbones.ops.taylor_gamma import taylor_gamma
from tasks.base import BaseTask

# -- 1. illumination-aware gamma correction ----------------------------------------------------


class GlobalGammaEstimator(nn.Module):
    """Coarse gamma: one exponent per image, from a thumbnail's global illumination statistics.

    The thumbnail makes the estimate independent of the input resolution. Its features are a
    small strided CNN (or any timm backbone, by name) concatenated with each channel's mean and
    standard deviation; an MLP maps them to ``gamma`` in ``[gamma_min, gamma_max]``.
    """

    def __init__(
        self,
        width: int = 16,
        thumbnail: int = 64,
        gamma_min: float = 0.1,
        gamma_max: float = 1.5,
        backbone: Optional[str] = None,
        backbone_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        self.thumbnail = thumbnail
        self.gamma_min, self.gamma_max = gamma_min, gamma_max
        if backbone:
            self.encoder = create_backbone(backbone, num_classes=0, **(backbone_kwargs or {}))
            features = self.encoder.num_features
        else:
            self.encoder = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=2, padding=1),
                nn.GELU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                nn.GELU(),
                nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
                nn.GELU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            features = 4 * width
        self.head = nn.Sequential(nn.Linear(features + 6, 4 * width), nn.GELU(), nn.Linear(4 * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.thumbnail, self.thumbnail)
        thumb = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        statistics = torch.cat([thumb.mean(dim=(2, 3)), thumb.std(dim=(2, 3))], dim=1)
        logit = self.head(torch.cat([self.encoder(thumb), statistics], dim=1))
        gamma = self.gamma_min + (self.gamma_max - self.gamma_min) * torch.sigmoid(logit)
        return gamma.view(-1, 1, 1, 1)


class LocalGammaRefiner(nn.Module):
    """Elaborate gamma: a per-pixel, per-channel factor on the global gamma.

    It sees the input and its coarse correction, and outputs ``gamma_global * exp(delta)`` with
    ``|delta| <= ln(max_ratio)``. The last layer starts at zero, so training starts from the
    global correction and learns where and in which channel to deviate (colour casts).
    """

    def __init__(self, width: int = 16, max_ratio: float = 4.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(6, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.GELU(),
            nn.Conv2d(width, 3, 3, padding=1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)
        self.log_max_ratio = math.log(max_ratio)

    def forward(self, x: torch.Tensor, coarse: torch.Tensor, gamma_global: torch.Tensor) -> torch.Tensor:
        delta = torch.tanh(self.body(torch.cat([x, coarse], dim=1))) * self.log_max_ratio
        return gamma_global * torch.exp(delta)


# -- 2. complete image modelling -------------------------------------------------------------


class LocalGlobalAttention(nn.Module):
    """Local-to-global hierarchical attention on a channels-last map (B, H, W, C).

    Level 1: each pixel attends to the pixels of its ``window_size`` window.
    Level 2: each window, summarised by its mean, attends to every window of the image.
    The windows' global contexts form a coarse (H / w, W / w) map that is interpolated
    bilinearly back to every pixel: adding one constant per window instead would print the
    window grid onto the image as blocks. Cost: ``O(N w^2 + G^2)`` for ``N`` pixels and
    ``G = N / w^2`` windows. H and W must be multiples of ``window_size``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.window_size = num_heads, window_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.global_qkv = nn.Linear(dim, 3 * dim)
        self.global_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (S, L, 3C) -> three (S, heads, L, C / heads) tensors (4D, as ONNX export requires)
        s, length, _ = x.shape
        q, k, v = x.view(s, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        gh, gw = h // ws, w // ws
        windows = x.view(b, gh, ws, gw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * gh * gw, ws * ws, c)

        local = F.scaled_dot_product_attention(*self._heads(self.qkv(windows)))
        local = self.proj(local.transpose(1, 2).reshape(b * gh * gw, ws * ws, c))

        tokens = windows.mean(dim=1).view(b, gh * gw, c)
        context = F.scaled_dot_product_attention(*self._heads(self.global_qkv(tokens)))
        context = self.global_proj(context.transpose(1, 2).reshape(b, gh, gw, c))
        context = F.interpolate(context.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)

        local = local.view(b, gh, gw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return local + context.permute(0, 2, 3, 1)


class GatedConvFeedForward(nn.Module):
    """Channel mixer with a depth-wise 3x3 convolution in the gate (local detail, cheap)."""

    def __init__(self, dim: int, expansion: float = 2.0):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Linear(dim, 2 * hidden)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.project_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.project_in(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        value, gate = x.chunk(2, dim=-1)
        return self.project_out(F.gelu(gate) * value)


class LocalGlobalBlock(nn.Module):
    """Pre-norm Transformer block: local-to-global attention, then the gated conv feed-forward."""

    def __init__(self, dim: int, num_heads: int, window_size: int, ffn_expansion: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = LocalGlobalAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.feed_forward = GatedConvFeedForward(dim, ffn_expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.feed_forward(self.norm2(x))


class Stage(nn.Sequential):
    """Blocks at one resolution; takes and returns NCHW, runs channels-last inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class IAGCNet(nn.Module):
    """Gamma correction (coarse to elaborate), then a local-to-global U-shaped Transformer.

    Any input size works: the image is padded (edge replication) to a multiple of
    ``window_size * 2 ** (levels - 1)`` and the output cropped back. The Transformer sees the
    input and its gamma-corrected version and predicts a residual on the corrected image.

    Returns a dict with ``output`` (unclamped), ``coarse`` (corrected by the global gamma),
    ``corrected`` (by the refined gamma map), ``gamma_global`` (B, 1, 1, 1) and ``gamma_local``
    (B, 3, H, W).
    """

    def __init__(
        self,
        embed_dim: int = 32,
        depths: tuple[int, ...] = (2, 2, 4),
        num_heads: tuple[int, ...] = (1, 2, 4),
        window_size: int = 8,
        ffn_expansion: float = 2.0,
        taylor_order: int = 4,
        gamma_width: int = 16,
        gamma_thumbnail: int = 64,
        gamma_range: tuple[float, float] = (0.1, 1.5),
        backbone: Optional[str] = None,
        backbone_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        if len(depths) != len(num_heads) or len(depths) < 1:
            raise ValueError(f"depths {depths} and num_heads {num_heads} need the same, non-zero length")
        self.taylor_order = taylor_order
        levels = len(depths)
        self.pad_multiple = window_size * 2 ** (levels - 1)
        self.global_gamma = GlobalGammaEstimator(
            gamma_width, gamma_thumbnail, gamma_range[0], gamma_range[1], backbone, backbone_kwargs
        )
        self.local_gamma = LocalGammaRefiner(gamma_width)

        dims = [embed_dim * 2**i for i in range(levels)]

        def stage(level: int, depth: int) -> Stage:
            return Stage(*[LocalGlobalBlock(dims[level], num_heads[level], window_size, ffn_expansion) for _ in range(depth)])

        self.embed = nn.Conv2d(6, embed_dim, 3, padding=1)
        self.encoder = nn.ModuleList(stage(i, depths[i]) for i in range(levels - 1))
        self.downsample = nn.ModuleList(nn.Conv2d(dims[i], dims[i + 1], 2, stride=2) for i in range(levels - 1))
        self.bottleneck = stage(levels - 1, depths[-1])
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(dims[i + 1], dims[i], 2, stride=2) for i in range(levels - 1))
        self.fuse = nn.ModuleList(nn.Conv2d(2 * dims[i], dims[i], 1) for i in range(levels - 1))
        self.decoder = nn.ModuleList(stage(i, depths[i]) for i in range(levels - 1))
        self.head = nn.Conv2d(embed_dim, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        gamma_global = self.global_gamma(x)
        m = self.pad_multiple
        x = F.pad(x, (0, (m - width % m) % m, 0, (m - height % m) % m), mode="replicate")
        coarse = taylor_gamma(x, gamma_global, order=self.taylor_order)
        gamma_local = self.local_gamma(x, coarse, gamma_global)
        corrected = taylor_gamma(x, gamma_local, order=self.taylor_order)

        features = self.embed(torch.cat([x, corrected], dim=1))
        skips = []
        for stage, down in zip(self.encoder, self.downsample):
            features = stage(features)
            skips.append(features)
            features = down(features)
        features = self.bottleneck(features)
        for i in reversed(range(len(self.decoder))):
            features = self.upsample[i](features)
            features = self.decoder[i](self.fuse[i](torch.cat([features, skips[i]], dim=1)))
        output = corrected + self.head(features)

        crop = (..., slice(0, height), slice(0, width))
        return {
            "output": output[crop],
            "coarse": coarse[crop],
            "corrected": corrected[crop],
            "gamma_global": gamma_global,
            "gamma_local": gamma_local[crop],
        }


class EnhanceImage(nn.Module):
    """Inference graph for export: dark image in, enhanced image in [0, 1] out."""

    def __init__(self, network: IAGCNet):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)["output"].clamp(0, 1)


# -- classical baselines (scored on the same split by the leaderboard) -----------------------


def luminance(image: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma of (B, 3, H, W) RGB."""
    return 0.299 * image[:, 0] + 0.587 * image[:, 1] + 0.114 * image[:, 2]


def global_gamma_baseline(image: torch.Tensor, target_mean: float = 0.5) -> torch.Tensor:
    """One gamma per image chosen so that the mean luminance becomes ``target_mean``."""
    mean = luminance(image).mean(dim=(1, 2)).clamp(1e-3, 0.999)
    gamma = (math.log(target_mean) / torch.log(mean)).clamp(0.05, 1.0).view(-1, 1, 1, 1)
    return image.clamp_min(1e-6).pow(gamma)


def clahe_baseline(image: torch.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation (OpenCV) on the L channel of CIELAB."""
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))
    out = []
    for rgb in (image.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy():
        lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB)
        lab[..., 0] = clahe.apply(lab[..., 0])
        out.append(torch.from_numpy(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)))
    return torch.stack(out).permute(0, 3, 1, 2).float().div(255).to(image.device)


# -- 3. the task -------------------------------------------------------------------------------


class LowLightEnhancement(BaseTask):
    """IAGC trained with L1 + SSIM, scored by PSNR and SSIM.

    Network arguments are those of ``IAGCNet``; ``backbone`` names a timm model to use as the
    global gamma estimator's encoder (default: the built-in illumination CNN). Optimiser
    arguments are ``BaseTask``'s.

    Args:
        l1_weight: weight of the L1 loss on the output.
        ssim_weight: weight of ``1 - SSIM`` on the output.
        gamma_weight: weight of the L1 loss on the two gamma-corrected images (coarse and
            refined, averaged). Supervised only through the final output, the gamma stage is
            free to do nothing useful (in our runs the global gamma drifted above 1, darkening
            the image, and the Transformer did all the work); this term makes both gammas
            estimate the illumination, as the paper intends. Set 0 to train the output alone.
    """

    monitor = "val_psnr"
    mode = "max"
    task_name = "low_light"
    method_name = "IAGC"

    def __init__(
        self,
        embed_dim: int = 32,
        depths: tuple[int, ...] = (2, 2, 4),
        num_heads: tuple[int, ...] = (1, 2, 4),
        window_size: int = 8,
        ffn_expansion: float = 2.0,
        taylor_order: int = 4,
        gamma_width: int = 16,
        gamma_thumbnail: int = 64,
        gamma_range: tuple[float, float] = (0.1, 1.5),
        backbone: Optional[str] = None,
        backbone_kwargs: Optional[dict] = None,
        l1_weight: float = 1.0,
        ssim_weight: float = 0.2,
        gamma_weight: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.network = IAGCNet(
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            ffn_expansion=ffn_expansion,
            taylor_order=taylor_order,
            gamma_width=gamma_width,
            gamma_thumbnail=gamma_thumbnail,
            gamma_range=tuple(gamma_range),
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
        )
        self.setup_metrics()

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),
                "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            }
        )

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.network(image)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.network(batch["image"])
        l1 = F.l1_loss(out["output"], batch["target"])
        ssim = structural_similarity_index_measure(out["output"].clamp(0, 1), batch["target"], data_range=1.0)
        gamma_l1 = 0.5 * (F.l1_loss(out["coarse"], batch["target"]) + F.l1_loss(out["corrected"], batch["target"]))
        loss = self.hparams.l1_weight * l1 + self.hparams.ssim_weight * (1 - ssim) + self.hparams.gamma_weight * gamma_l1
        size = batch["image"].shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=size)
        logged = {"train_l1": l1, "train_ssim": ssim, "train_gamma_l1": gamma_l1, "gamma_global": out["gamma_global"].mean()}
        self.log_dict(logged, batch_size=size)
        return loss

    def predict_batch(self, batch: dict) -> torch.Tensor:
        return self.network(batch["image"])["output"].clamp(0, 1)

    def update_metrics(self, metrics: MetricCollection, prediction: torch.Tensor, batch: dict) -> None:
        metrics.update(prediction, batch["target"])

    def example_panels(self, batch: dict, prediction: torch.Tensor) -> list[torch.Tensor]:
        """Dark input | enhanced | reference, side by side."""
        return [
            make_grid([low, enhanced, reference], nrow=3, padding=2, pad_value=1.0)
            for low, enhanced, reference in zip(batch["image"], prediction, batch["target"])
        ]

    # -- export ------------------------------------------------------------------------------
    def inference_module(self) -> nn.Module:
        return EnhanceImage(self.network)

    def example_input(self) -> tuple[torch.Tensor, ...]:
        # batch 2 and sizes that are not multiples of the padding: the exporter specialises on
        # a size-1 axis and can guard on divisibility seen in the example
        return (torch.rand(2, 3, 83, 117),)

    def check_input(self) -> tuple[torch.Tensor, ...]:
        return (torch.rand(3, 3, 64, 48),)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"image": {0: "batch", 2: "height", 3: "width"}}

    # -- leaderboard -------------------------------------------------------------------------
    @property
    def backbone_name(self) -> str:
        return self.hparams.backbone or "illumination CNN"

    def baselines(self) -> dict[str, Callable[[dict], torch.Tensor]]:
        return {
            "dark input": lambda batch: batch["image"],
            "global gamma": lambda batch: global_gamma_baseline(batch["image"]),
            "CLAHE": lambda batch: clahe_baseline(batch["image"]),
        }
