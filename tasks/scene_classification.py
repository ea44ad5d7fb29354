"""Remote-sensing scene classification: AFM-Net, or any timm backbone, on class-folder datasets.

Paper: Y. Tang et al., "AFM-Net: Advanced Fusing Hierarchical CNN Visual Priors with Global
Sequence Modeling for Remote Sensing Image Scene Classification", 2025 (arXiv:2510.27155).
The network is ``backbones.afmnet``; this file is the training and evaluation protocol:

1. **Network**: ``backbone`` names any timm-registered 2D model (``afmnet_base`` by default),
   built with ``num_classes`` outputs. ``head="moe"`` replaces a backbone's own classifier by
   AFM-Net's Mixture-of-Experts classifier (for TransNeXt or ResNet rows with the MoE head).
   Images arrive in [0, 1] and are normalised inside the network (ImageNet statistics, as the
   official code), so the exported graph takes plain RGB.
2. **Loss**: cross-entropy (optionally label-smoothed) plus ``aux_loss_weight`` times the
   load-balancing loss of every Mixture-of-Experts layer in the network (each stores the loss
   of its last training forward in ``aux_loss``, see ``MixtureOfExperts``).
3. **Metrics** (torchmetrics, so they reduce across processes): overall accuracy (``oa``),
   average accuracy (``aa``: the mean of per-class accuracies) and Cohen's kappa; at test, the
   per-class accuracies and a confusion-matrix picture.
4. **Baseline** on the same split: nearest neighbour on colour histograms, fitted on the
   training split (``ColourHistogramNearestNeighbour``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCohenKappa

import backbones  # noqa: F401  (registers AFM-Net with timm)
from backbones.afmnet import MixtureOfExperts
from backbones.create import create_backbone
from data.errors import LayoutError
from tasks.base import BaseTask

HEADS = ("backbone", "moe")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- 1. network -------------------------------------------------------------------------------


class SceneClassifier(nn.Module):
    """Normalisation, a timm backbone, and (with ``head="moe"``) the Mixture-of-Experts head.

    Maps (B, 3, H, W) RGB in [0, 1] to (B, num_classes) logits.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        backbone_kwargs: Optional[dict] = None,
        head: str = "backbone",
        moe_kwargs: Optional[dict] = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        kwargs = dict(backbone_kwargs or {})
        if head == "backbone":
            self.backbone = create_backbone(backbone, num_classes=num_classes, **kwargs)
            self.head = nn.Identity()
        else:
            self.backbone = create_backbone(backbone, num_classes=0, **kwargs)
            width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
            self.head = nn.Sequential(MixtureOfExperts(width, **(moe_kwargs or {})), nn.Linear(width, num_classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone((image - self.mean) / self.std))


class ClassProbabilities(nn.Module):
    """Inference graph for export: RGB in [0, 1] in, class probabilities out."""

    def __init__(self, network: SceneClassifier):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image).softmax(dim=-1)


# -- 4. classical baseline --------------------------------------------------------------------


def colour_histograms(images: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """Per-channel histograms of (B, 3, H, W) images in [0, 1], each channel summing to 1: (B, 3 * bins)."""
    index = (images.clamp(0, 1) * bins).long().clamp_max(bins - 1)  # (B, C, H, W)
    index = index + torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1) * bins
    counts = torch.zeros(images.shape[0], images.shape[1] * bins, device=images.device)
    counts.scatter_add_(1, index.flatten(1), torch.ones_like(index.flatten(1), dtype=counts.dtype))
    return counts / (images.shape[2] * images.shape[3])


class ColourHistogramNearestNeighbour:
    """The colour-only baseline: the class of the training image whose colour histogram is closest.

    Fitted on the un-augmented training split at the network's input size; histograms have
    ``bins`` bins per RGB channel, compared by L1 distance (ties go to the first training image
    in file order, so the result is deterministic). Predictions are one-hot probabilities.
    """

    def __init__(self, histograms: torch.Tensor, labels: torch.Tensor, num_classes: int, bins: int = 16):
        self.histograms, self.labels, self.num_classes, self.bins = histograms, labels, num_classes, bins

    @classmethod
    def fit(cls, loader: DataLoader, num_classes: int, bins: int = 16) -> "ColourHistogramNearestNeighbour":
        histograms, labels = [], []
        for batch in loader:
            histograms.append(colour_histograms(batch["image"], bins))
            labels.append(torch.as_tensor(batch["label"]))
        return cls(torch.cat(histograms), torch.cat(labels), num_classes, bins)

    def __call__(self, batch: dict) -> torch.Tensor:
        query = colour_histograms(batch["image"], self.bins).to(self.histograms.device)
        nearest = torch.cdist(query, self.histograms, p=1).argmin(dim=1)
        return F.one_hot(self.labels[nearest], self.num_classes).float().to(batch["image"].device)


# -- pictures ----------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def confusion_matrix_image(confmat: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """A (3, H, W) picture of a confusion matrix: rows are true classes, columns predictions,
    cells shaded by the row-normalised rate (counts written when they fit), per-class accuracy
    in the right-hand column and overall / average accuracy in the title."""
    counts = confmat.detach().cpu().double()
    k = counts.shape[0]
    names = list(class_names) if len(class_names) == k else [str(i) for i in range(k)]
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    cell = 26 if k <= 24 else 16
    font = _font(11 if cell >= 26 else 8)
    label_width = 8 + max(int(font.getlength(n)) for n in names)
    top = 34 + label_width  # room for the title and the rotated column labels
    width, height = label_width + (k + 1) * cell + 12, top + k * cell + 10
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    total = counts.sum().clamp_min(1)
    oa, aa = float(counts.trace() / total), float(rates.diagonal().mean())
    draw.text((6, 6), f"confusion matrix (rows: true, columns: predicted)   OA {100 * oa:.1f} %   AA {100 * aa:.1f} %", fill="black", font=_font(12))
    for j, name in enumerate(names + ["accuracy"]):  # column labels, written upwards
        label = Image.new("RGB", (label_width, cell), "white")
        ImageDraw.Draw(label).text((4, (cell - 10) // 2), name, fill="black", font=font)
        image.paste(label.rotate(90, expand=True), (label_width + j * cell, 30))
    for i, name in enumerate(names):
        y = top + i * cell
        draw.text((4, y + (cell - 10) // 2), name, fill="black", font=font)
        for j in range(k + 1):
            x = label_width + j * cell
            rate = float(rates[i, i]) if j == k else float(rates[i, j])
            shade = int(255 * (1 - rate))
            colour = (shade, 255 - (255 - shade) // 3, 255) if j < k else (shade, 255, shade)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=(220, 220, 220))
            text = f"{100 * rate:.0f}" if j == k else (f"{int(counts[i, j])}" if counts[i, j] > 0 else "")
            if text and cell >= 26:
                draw.text((x + 3, y + 7), text, fill="white" if rate > 0.55 else "black", font=font)
    pixels = torch.from_numpy(np.asarray(image).copy())
    return pixels.permute(2, 0, 1).float() / 255


def labelled_panel(image: torch.Tensor, truth: str, predicted: str, confidence: float, side: int = 160) -> torch.Tensor:
    """The image (scaled to ``side``) above its true and predicted class, green when right, red when wrong."""
    pixels = (image.detach().float().clamp(0, 1).cpu() * 255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR)
    panel = Image.new("RGB", (side, side + 34), "white")
    panel.paste(picture, (0, 0))
    draw = ImageDraw.Draw(panel)
    font = _font(11)
    draw.text((3, side + 2), f"true: {truth}", fill="black", font=font)
    colour = (0, 140, 0) if truth == predicted else (200, 0, 0)
    draw.text((3, side + 17), f"pred: {predicted} ({100 * confidence:.0f} %)", fill=colour, font=font)
    return torch.from_numpy(np.asarray(panel).copy()).permute(2, 0, 1).float() / 255


# -- the task ----------------------------------------------------------------------------------


class SceneClassification(BaseTask):
    """Scene classification trained with cross-entropy + MoE balancing, scored by OA, AA and kappa.

    Args:
        num_classes: classes of the dataset (checked against the datamodule's class folders).
        backbone: a timm model name (``afmnet_tiny``, ``afmnet_small``, ``afmnet_base``,
            ``resnet18``, ``transnext_micro``, ...).
        backbone_kwargs: extra arguments for ``timm.create_model``.
        head: ``backbone`` (the backbone's own classifier; AFM-Net's is the MoE) or ``moe``
            (AFM-Net's Mixture-of-Experts classifier on the backbone's pooled features).
        moe_experts / moe_top_k / moe_shared_experts / moe_hidden: that head's experts.
        label_smoothing: cross-entropy label smoothing.
        aux_loss_weight: weight of the experts' load-balancing loss (1 for uniform routing;
            0.01 is DeepSeek-V2's and the official code's alpha).
        image_size: side of the network input (the export's size; must equal the datamodule's).
        mean / std: input normalisation.
        **kwargs: ``BaseTask`` arguments (optimiser, schedule, examples).
    """

    monitor = "val_oa"
    mode = "max"
    task_name = "scene_classification"

    def __init__(
        self,
        num_classes: int,
        backbone: str = "afmnet_base",
        backbone_kwargs: Optional[dict] = None,
        head: str = "backbone",
        moe_experts: int = 16,
        moe_top_k: int = 2,
        moe_shared_experts: int = 1,
        moe_hidden: int = 512,
        label_smoothing: float = 0.0,
        aux_loss_weight: float = 0.01,
        image_size: int = 224,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        **kwargs,
    ):
        super().__init__(**kwargs)
        moe_kwargs = dict(num_experts=moe_experts, top_k=moe_top_k, num_shared_experts=moe_shared_experts, hidden_dim=moe_hidden)
        self.network = SceneClassifier(num_classes, backbone, backbone_kwargs, head, moe_kwargs, mean, std)
        self.class_names: list[str] = []
        self._histogram_baseline: Optional[ColourHistogramNearestNeighbour] = None
        self.setup_metrics()

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    def configure_metrics(self) -> MetricCollection:
        k = self.num_classes
        return MetricCollection(
            {
                "oa": MulticlassAccuracy(k, average="micro"),
                "aa": MulticlassAccuracy(k, average="macro"),
                "kappa": MulticlassCohenKappa(k),
            }
        )

    # -- class names travel with the checkpoint -----------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = list(getattr(datamodule, "class_names", []) or [])
        if names:
            if len(names) != self.num_classes:
                raise LayoutError(
                    getattr(datamodule, "split_folder", "dataset"),
                    f"the dataset has {len(names)} classes but the model is configured for {self.num_classes}: "
                    f"set --model.init_args.num_classes {len(names)}",
                )
            self.class_names = names
        size = getattr(datamodule, "image_size", self.hparams.image_size)
        if size != self.hparams.image_size:
            raise ValueError(f"data.image_size ({size}) differs from model.image_size ({self.hparams.image_size})")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["class_names"] = list(self.class_names)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = list(checkpoint.get("class_names", []))
        if saved and self.class_names and saved != self.class_names:
            raise LayoutError("checkpoint", f"was trained on classes {saved}, but the dataset has {self.class_names}")
        self.class_names = saved or self.class_names

    def on_predict_start(self) -> None:
        # the datamodule writes class names; for predict it learns them from the checkpoint
        if self.trainer.datamodule is not None and self.class_names:
            self.trainer.datamodule.class_names = list(self.class_names)

    # -- training -----------------------------------------------------------------------------
    def _experts(self) -> list[MixtureOfExperts]:
        return [m for m in self.network.modules() if isinstance(m, MixtureOfExperts)]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        experts = self._experts()
        for moe in experts:
            moe.aux_loss = None
        logits = self.network(batch["image"])
        ce = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.hparams.label_smoothing)
        aux = sum((moe.aux_loss for moe in experts if moe.aux_loss is not None), torch.zeros((), device=ce.device))
        loss = ce + self.hparams.aux_loss_weight * aux
        size = batch["image"].shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=size)
        accuracy = (logits.argmax(dim=1) == batch["label"]).float().mean()
        self.log_dict({"train_ce": ce, "train_balance": aux, "train_accuracy": accuracy}, batch_size=size)
        return loss

    def no_weight_decay(self) -> set[str]:
        """Position embeddings and SSM parameters of the backbone are not decayed (timm's rule)."""
        backbone = self.network.backbone
        names = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
        return {f"network.backbone.{name}" for name in names}

    # -- evaluation ---------------------------------------------------------------------------
    def predict_batch(self, batch: dict) -> torch.Tensor:
        return self.network(batch["image"]).float().softmax(dim=-1)

    def update_metrics(self, metrics: MetricCollection, prediction: torch.Tensor, batch: dict) -> None:
        metrics.update(prediction, batch["label"])

    def on_test_epoch_end(self) -> None:
        """Log each class's accuracy and save the confusion matrix (from the kappa metric's state,
        synchronised across processes)."""
        kappa = self.test_metrics["kappa"]
        with kappa.sync_context(should_unsync=True):
            confmat = kappa.confmat.clone()
        accuracy = confmat.diagonal().float() / confmat.sum(dim=1).clamp_min(1)
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        self.log_dict({f"test_class_accuracy/{name}": value for name, value in zip(names, accuracy)}, sync_dist=False)
        self.save_image("test_confusion_matrix", confusion_matrix_image(confmat, names))
        super().on_test_epoch_end()

    def report_figures(self, metrics: MetricCollection) -> list[tuple[str, torch.Tensor]]:
        confmat = metrics["kappa"].confmat
        return [(f"{self.method_name}: confusion matrix on the test split", confusion_matrix_image(confmat, self.class_names))]

    def example_panels(self, batch: dict, prediction: torch.Tensor) -> list[torch.Tensor]:
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        confidence, predicted = prediction.float().max(dim=1)
        return [
            labelled_panel(image, names[int(label)], names[int(p)], float(c))
            for image, label, p, c in zip(batch["image"], batch["label"], predicted, confidence)
        ]

    # -- export -------------------------------------------------------------------------------
    def inference_module(self) -> nn.Module:
        return ClassProbabilities(self.network)

    def example_input(self) -> tuple[torch.Tensor, ...]:
        size = self.hparams.image_size
        return (torch.rand(2, 3, size, size),)

    def check_input(self) -> tuple[torch.Tensor, ...]:
        size = self.hparams.image_size
        return (torch.rand(3, 3, size, size),)

    # -- leaderboard --------------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        backbone = self.hparams.backbone
        name = "AFM-Net" if backbone.startswith("afmnet") else backbone
        return name + (" + MoE head" if self.hparams.head == "moe" else "")

    @property
    def backbone_name(self) -> str:
        return self.hparams.backbone

    def fit_baselines(self, datamodule) -> None:
        """Fit the colour-histogram baseline on the datamodule's un-augmented training split."""
        self._histogram_baseline = ColourHistogramNearestNeighbour.fit(datamodule.plain_train_dataloader(), self.num_classes)

    def baselines(self) -> dict[str, Callable[[dict], torch.Tensor]]:
        if self._histogram_baseline is None:
            raise RuntimeError("fit_baselines(datamodule) must run before the baselines are scored")
        return {"colour histogram 1-NN": self._histogram_baseline}
