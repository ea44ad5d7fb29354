"""Multi-organ CT segmentation on Synapse: TransDAE (or a U-Net) trained and scored as the papers do.

Paper: B. Azad, P. Adibfar, K. Fu, "TransDAE: Dual Attention Mechanism in a Hierarchical
Transformer for Efficient Medical Image Segmentation", arXiv:2409.02018 (2024); training and
evaluation follow TransUNet / DAE-Former, against which the paper reports.

1. Network (``network.py``): any timm encoder with ``features_only`` (``transdae`` by default)
   and TransDAE's decoder, or the plain U-Net decoder for the baseline.
2. Loss: ``ce_weight`` x cross-entropy + ``dice_weight`` x soft Dice (0.4 / 0.6 in DAE-Former);
   the Dice term is TransUNet's: softmax probabilities, every class including background,
   ``1 - (2 sum(p t) + eps) / (sum(p^2) + sum(t^2) + eps)`` over the batch, averaged over classes.
3. Evaluation (``metrics.py``): each volume is segmented slice by slice at the training size
   ``img_size`` (slices resized bicubically, logits resized back bilinearly, then arg-max), and
   Dice and HD95 are computed per case and per organ in 3D, averaged over cases then organs.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from tasks.base import BaseTask
from tasks.medical_segmentation.figures import dice_bars, overlay_panel
from tasks.medical_segmentation.metrics import CONVENTIONS, CaseAverage, case_scores
from tasks.medical_segmentation.network import SegmentationNetwork

SYNAPSE_ORGANS = ("aorta", "gallbladder", "left kidney", "right kidney", "liver", "pancreas", "spleen", "stomach")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """TransUNet's Dice loss over all classes (background included), averaged over classes."""
    probabilities = logits.float().softmax(dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    denominator = (probabilities * probabilities).sum(dims) + one_hot.sum(dims)
    return (1 - (2 * intersection + eps) / (denominator + eps)).mean()


def metric_name(organ: str) -> str:
    """``left kidney`` -> ``left_kidney`` (a column name)."""
    return re.sub(r"\W+", "_", organ.strip().lower()).strip("_")


class SegmentSlices(nn.Module):
    """Inference graph for export: CT slices (B, 1, H, W) in [0, 1] -> class logits (B, K, H, W)."""

    def __init__(self, network: SegmentationNetwork):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)


class MedicalSegmentation(BaseTask):
    """TransDAE (default) or U-Net multi-organ segmentation, scored by Synapse's protocol.

    Network arguments are ``SegmentationNetwork``'s; optimiser arguments are ``BaseTask``'s.

    Args:
        img_size: slice size the network is trained at; evaluation resizes slices to it. Must
            equal the datamodule's ``img_size`` (checked on the first training batch).
        organs: names of classes 1 .. num_classes - 1 (default: Synapse's eight organs).
        ce_weight / dice_weight: loss weights (DAE-Former: 0.4 / 0.6).
        metric_convention: ``transunet`` or ``nan``, how empty masks score (``metrics.py``).
        inference_batch_size: slices per forward pass when segmenting a volume.
    """

    monitor = "val_dice"
    mode = "max"
    task_name = "medical_segmentation"

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
        img_size: int = 224,
        organs: Optional[Sequence[str]] = None,
        ce_weight: float = 0.4,
        dice_weight: float = 0.6,
        metric_convention: str = "transunet",
        inference_batch_size: int = 16,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if metric_convention not in CONVENTIONS:
            raise ValueError(f"metric_convention must be one of {CONVENTIONS}, got {metric_convention!r}")
        if organs is None:
            organs = SYNAPSE_ORGANS if num_classes == len(SYNAPSE_ORGANS) + 1 else [f"organ {i}" for i in range(1, num_classes)]
        if len(organs) != num_classes - 1:
            raise ValueError(f"organs names {len(organs)} classes; num_classes {num_classes} needs {num_classes - 1}")
        self.organs = list(organs)
        self.network = SegmentationNetwork(
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
            decoder=decoder,
            num_classes=num_classes,
            decoder_dims=tuple(decoder_dims) if decoder_dims else None,
            decoder_depth=decoder_depth,
            decoder_channel_heads=decoder_channel_heads,
            decoder_sr_ratios=tuple(decoder_sr_ratios) if decoder_sr_ratios else None,
            pretrained=pretrained,
        )
        self.setup_metrics()

    # -- metrics -----------------------------------------------------------------------------
    def configure_metrics(self) -> MetricCollection:
        metrics = {"dice": CaseAverage("dice"), "hd95": CaseAverage("hd95")}
        for i, organ in enumerate(self.organs):
            metrics[f"dice_{metric_name(organ)}"] = CaseAverage("dice", organ=i)
        # every metric keeps its own copy of the per-case values: shared compute-group states
        # would be synchronised once per metric under DDP
        return MetricCollection(metrics, compute_groups=False)

    # -- training ----------------------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, mask = batch["image"], batch["mask"]
        if batch_idx == 0 and image.shape[-1] != self.hparams.img_size:
            raise ValueError(
                f"training slices are {tuple(image.shape[-2:])} but the task's img_size is {self.hparams.img_size}; "
                "set model.init_args.img_size to the datamodule's img_size"
            )
        logits = self.network(image).float()
        ce = F.cross_entropy(logits, mask)
        dice = soft_dice_loss(logits, mask)
        loss = self.hparams.ce_weight * ce + self.hparams.dice_weight * dice
        size = image.shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({"train_ce": ce, "train_dice_loss": dice}, batch_size=size)
        return loss

    # -- the Synapse protocol ----------------------------------------------------------------
    def segment_volume(self, volume: torch.Tensor) -> torch.Tensor:
        """Labels (D, H, W) of one volume (D, H, W) in [0, 1], slice by slice at ``img_size``."""
        depth, height, width = volume.shape
        size = self.hparams.img_size
        labels = torch.empty(volume.shape, dtype=torch.long, device=volume.device)
        for start in range(0, depth, self.hparams.inference_batch_size):
            slices = volume[start : start + self.hparams.inference_batch_size].unsqueeze(1)
            resized = (height, width) != (size, size)
            if resized:
                slices = F.interpolate(slices, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
            logits = self.network(slices).float()
            if resized:
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            labels[start : start + len(slices)] = logits.argmax(dim=1)
        return labels

    def predict_batch(self, batch: dict) -> torch.Tensor:
        return torch.stack([self.segment_volume(volume) for volume in batch["image"]])

    def update_metrics(self, metrics: MetricCollection, prediction: torch.Tensor, batch: dict) -> None:
        dice, hd95 = [], []
        for labels, truth, spacing in zip(prediction, batch["mask"], batch["spacing"]):
            case_dice, case_hd95 = case_scores(
                labels.cpu().numpy(),
                truth.cpu().numpy(),
                self.hparams.num_classes,
                spacing=spacing.tolist(),
                convention=self.hparams.metric_convention,
            )
            dice.append(torch.from_numpy(case_dice).float())  # float32: some devices have no float64
            hd95.append(torch.from_numpy(case_hd95).float())
        device = prediction.device
        metrics.update(index=batch["index"].to(device), dice=torch.stack(dice).to(device), hd95=torch.stack(hd95).to(device))

    # -- pictures ----------------------------------------------------------------------------
    def example_panels(self, batch: dict, prediction: torch.Tensor) -> list[torch.Tensor]:
        """Per volume, the slice showing the most organs: CT | ground truth | prediction + legend."""
        panels = []
        for i, (volume, labels) in enumerate(zip(batch["image"], prediction)):
            truth = batch["mask"][i] if "mask" in batch else None
            reference = truth if truth is not None else labels
            organs = torch.stack([(reference == k).flatten(1).any(1) for k in range(1, self.hparams.num_classes)]).sum(0)
            foreground = (reference > 0).flatten(1).sum(1)
            index = max(range(len(reference)), key=lambda z: (int(organs[z]), int(foreground[z])))
            title = f"{batch['name'][i]} slice {index}"
            panels.append(overlay_panel(volume[index], None if truth is None else truth[index], labels[index], self.organs, title))
        return panels

    def report_figures(self, metrics: MetricCollection) -> list[tuple[str, torch.Tensor]]:
        computed = {name: float(value) for name, value in metrics.compute().items()}
        values = {}
        for organ in self.organs:
            key = next((name for name in computed if name.endswith(f"dice_{metric_name(organ)}")), None)
            values[organ] = computed[key] if key is not None else math.nan
        return [(f"{self.method_name}: mean Dice per organ", dice_bars(values))]

    # -- export ------------------------------------------------------------------------------
    def inference_module(self) -> nn.Module:
        return SegmentSlices(self.network)

    def example_input(self) -> tuple[torch.Tensor, ...]:
        # batch 2 and sizes that are no multiple of the encoder's stride: the exporter must not
        # specialise on a size-1 axis or on divisibility seen in the example
        return (torch.rand(2, 1, 83, 117),)

    def check_input(self) -> tuple[torch.Tensor, ...]:
        return (torch.rand(3, 1, 64, 48),)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"image": {0: "batch", 2: "height", 3: "width"}}

    @property
    def dynamic_axis_min(self) -> dict[str, int]:
        # the deepest feature map must keep at least two rows and columns: the exporter can only
        # keep the axes dynamic for the reshapes of attention where no side collapses to one
        side = self.network.pad_multiple + 1
        return {"height": side, "width": side}

    def inference_inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """The middle slice of each test volume, at the training size (what the graph sees)."""
        volumes = batch["image"]
        middle = volumes[:, volumes.shape[1] // 2].unsqueeze(1)
        size = self.hparams.img_size
        return (F.interpolate(middle, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1),)

    # -- leaderboard -------------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        return "TransDAE" if self.hparams.decoder == "transdae" else "U-Net"

    @property
    def backbone_name(self) -> str:
        return self.hparams.backbone

    def baselines(self) -> dict[str, Callable[[dict], torch.Tensor]]:
        return {}
