"""Point-cloud semantic segmentation with ConDaFormer (NeurIPS 2023), S3DIS / ScanNet protocol.

Paper: L. Duan et al., "ConDaFormer: Disassembled Transformer with Local Structure Enhancement
for 3D Point Cloud Understanding", NeurIPS 2023; training and test recipe from the official
configs (github.com/LHDuan/ConDaFormer, ``configs/s3dis/condaformer.py``).

1. Network: ``backbones.condaformer.ConDaFormer`` on voxelized points, input features the
   coordinates (shifted to start at 0 in each cloud) followed by the dataset's features (colour
   [, normals]), then the official head: Linear, BN, ReLU, Linear. ``attention="cubic"`` gives
   the same network with cubic windows, the leaderboard's baseline.
2. Loss: cross-entropy with an ignore label. The paper and its configs use no Lovasz term and
   no class weights; ``class_weights`` can weight the classes (a list, or
   ``inverse_sqrt_frequency`` from the training split's point counts) for data where a few
   classes cover most points.
3. Optimisation: AdamW; parameters of the ConDaFormer blocks train at ``block_lr_scale`` (0.1)
   times the learning rate; multi-step decay at 60 % and 80 % of training (``lr_milestones``)
   after an optional warm-up, as the official configs do.
4. Test protocol: every point of every scene is scored at full resolution by voting. For each
   rotation and scale of ``test_rotations`` x ``test_scales`` and each of ``test_votes`` voxel
   samplings (sampling i keeps the i-th point of every voxel; 0 = as many samplings as the
   fullest voxel has points, so each point is seen), the network's softmax on the kept points is
   added to every point of their voxels. Metrics: mIoU, mAcc, allAcc and per-class IoU over the
   whole split (torchmetrics, which accumulates the confusion counts), ignore label excluded.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from timm.optim import param_groups_weight_decay
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from backbones.condaformer import ConDaFormer, ConDaFormerBlock, SparseStructure
from backbones.ops.voxel_hash import grid_sample
from backbones.point_batch import PointBatch, batch_to_offset, offset_to_batch, split_by_offset
from tasks.base import BaseTask, lr_multiplier
from tasks.point_render import render_points, side_by_side

S3DIS_NAMES = ("ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair", "sofa", "bookcase", "board", "clutter")
SCANNET_NAMES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub", "otherfurniture",
)  # fmt: skip


def class_palette(num_classes: int) -> torch.Tensor:
    from data.point_cloud import class_palette as palette

    return palette(num_classes)


class ClassIoU(MulticlassJaccardIndex):
    """IoU of one class, accumulated over the whole split."""

    def __init__(self, num_classes: int, class_index: int, ignore_index: Optional[int] = None):
        super().__init__(num_classes, average="none", ignore_index=ignore_index)
        self.class_index = class_index

    def compute(self) -> torch.Tensor:
        return super().compute()[self.class_index]


# -- the network -------------------------------------------------------------------------------


class SegmentationHead(nn.Sequential):
    """The official head: Linear, BN, ReLU, Linear."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__(nn.Linear(channels, channels), nn.BatchNorm1d(channels), nn.ReLU(), nn.Linear(channels, num_classes))


def network_inputs(coord: torch.Tensor, feat: torch.Tensor, batch: torch.Tensor, num_clouds: int) -> torch.Tensor:
    """Coordinates shifted to start at 0 in each cloud, then the dataset features."""
    start = torch.full((num_clouds, 3), float("inf"), dtype=coord.dtype, device=coord.device)
    start = start.scatter_reduce(0, batch.unsqueeze(1).expand_as(coord), coord, reduce="amin")
    return torch.cat([coord - start[batch], feat.to(coord.dtype)], dim=1)


class PointSegmenter(nn.Module):
    """ConDaFormer backbone and head: points (concatenated clouds) in, class logits per point out."""

    def __init__(self, backbone: ConDaFormer, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = SegmentationHead(backbone.out_channels, num_classes)

    def forward(self, coord: torch.Tensor, feat: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        inputs = network_inputs(coord, feat, offset_to_batch(offset), len(offset))
        return self.head(self.backbone(PointBatch(coord, inputs, offset)))


class VoxelSegmentationGraph(nn.Module):
    """What ONNX export traces: one voxelized cloud (one point per voxel) and its precomputed
    index tensors in, logits per point out.

    Hashing, sorting and window bucketing have no efficient ONNX form, so
    ``index_inputs`` computes them outside the graph (``SparseStructure.flat``: neighbour
    tables, pooling maps, window tables) and the graph takes them as inputs. Everything else
    (features, positions, pooling, attention, interpolation, head) is in the graph.
    """

    def __init__(self, segmenter: PointSegmenter, index_names: list[str]):
        super().__init__()
        self.segmenter = segmenter
        self.index_names = list(index_names)

    def compute(self, coord: torch.Tensor, feat: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
        backbone = self.segmenter.backbone
        scaled = coord / backbone.voxel_size
        positions = scaled - torch.floor(scaled).amin(0)
        inputs = torch.cat([coord - coord.amin(0), feat], dim=1)
        structure = SparseStructure.from_flat(list(index), backbone.stage_shifts)
        counts = torch.ones_like(coord[:, 0])
        return self.segmenter.head(backbone.forward_voxels(positions, inputs, counts, structure))


def voxel_graph(segmenter: PointSegmenter, index_names: list[str]) -> VoxelSegmentationGraph:
    """A ``VoxelSegmentationGraph`` whose ``forward`` names every input (``coord``, ``feat``, then
    the index tensors), so that the exporter can give each its own dynamic axes."""
    names = ["coord", "feat", *index_names]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD

    def forward(self, *inputs):
        return self.compute(*inputs)

    forward.__signature__ = inspect.Signature([inspect.Parameter("self", kind)] + [inspect.Parameter(n, kind) for n in names])
    graph_class = type("VoxelSegmentationGraph", (VoxelSegmentationGraph,), {"forward": forward})
    return graph_class(segmenter, index_names)


# -- the task ----------------------------------------------------------------------------------


CLASS_WEIGHTINGS = ("inverse_sqrt_frequency",)


def inverse_sqrt_frequency(counts: torch.Tensor) -> torch.Tensor:
    """Class weights 1 / sqrt(share of points), averaging 1 over the classes present (absent: 0).

    The square root keeps a class a thousand times rarer than the floor at ~30x its weight, not
    1000x, which would make the loss a lottery over a handful of points.
    """
    counts = counts.double()
    present = counts > 0
    if not present.any():
        raise ValueError("class_weights='inverse_sqrt_frequency': the training split has no labelled points")
    weights = torch.zeros_like(counts)
    weights[present] = (counts[present] / counts.sum()).rsqrt()
    return (weights / weights[present].mean()).float()


class PointSegmentation(BaseTask):
    """ConDaFormer semantic segmentation of point clouds (or the cubic-window baseline).

    Network arguments are ``ConDaFormer``'s (its input width is 3 + ``in_features``);
    optimiser arguments are ``BaseTask``'s.

    Args:
        num_classes: number of classes.
        class_names: names for per-class metrics and pictures (default: S3DIS's 13 or
            ScanNet's 20 when the count matches, else ``class_<k>``).
        in_features: channels of the batch's ``feat`` (3 for colour, 6 with normals).
        ignore_index: label excluded from loss and metrics.
        block_lr_scale: learning-rate factor of the ConDaFormer blocks' parameters.
        lr_milestones: fractions of training at which the learning rate drops tenfold (the
            official 0.6, 0.8); on top of ``lr_schedule`` (use ``constant``).
        val_votes: voxel samplings averaged in validation.
        test_votes: voxel samplings averaged in test (0: enough for every point to be sampled).
        test_rotations: rotations about the vertical axis in test, in units of pi.
        test_scales: scale factors in test.
        normal_feature_index: first column of normals in ``feat`` (rotated with the points in test).
        method_name: leaderboard name (default: ConDaFormer, or "cubic-window Transformer").
        label_smoothing: of the cross-entropy (0 in the paper).
        class_weights: cross-entropy weight per class: None (the paper), a list of
            ``num_classes`` numbers, or ``"inverse_sqrt_frequency"``: 1 / sqrt(share of the
            training points), scaled to average 1 over the classes present, counted once when
            fitting starts.
    """

    monitor = "val_miou"
    mode = "max"
    task_name = "point_segmentation"
    export_atol = 1e-3

    def __init__(
        self,
        num_classes: int = 13,
        class_names: Optional[list[str]] = None,
        in_features: int = 3,
        attention: str = "plane",
        voxel_size: float = 0.04,
        base_channels: int = 48,
        channels: tuple[int, ...] = (96, 192, 384),
        depths: tuple[int, ...] = (2, 6, 2),
        decoder_channels: tuple[int, ...] = (192, 96, 48),
        head_dim: int = 16,
        window_size: int = 8,
        quant_size: float = 0.25,
        drop_path_rate: float = 0.5,
        mlp_ratio: float = 4.0,
        ignore_index: int = -1,
        block_lr_scale: float = 0.1,
        lr_milestones: Optional[list[float]] = None,
        val_votes: int = 1,
        test_votes: int = 0,
        test_rotations: tuple[float, ...] = (0.0,),
        test_scales: tuple[float, ...] = (1.0,),
        normal_feature_index: Optional[int] = None,
        method_name: Optional[str] = None,
        label_smoothing: float = 0.0,
        class_weights: Optional[list[float] | str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        if isinstance(class_weights, str) and class_weights not in CLASS_WEIGHTINGS:
            raise ValueError(f"class_weights must be a list of {num_classes} numbers or one of {CLASS_WEIGHTINGS}, got {class_weights!r}")
        if isinstance(class_weights, (list, tuple)) and (len(class_weights) != num_classes or min(class_weights) < 0):
            raise ValueError(f"class_weights must hold {num_classes} non-negative numbers, got {list(class_weights)}")
        # cross-entropy weights (None: unweighted); a string is resolved from the data in setup()
        self.register_buffer("class_weight", torch.tensor(class_weights, dtype=torch.float32) if isinstance(class_weights, (list, tuple)) else None, persistent=False)
        if class_names is None:
            class_names = {13: S3DIS_NAMES, 20: SCANNET_NAMES}.get(num_classes, [f"class_{k}" for k in range(num_classes)])
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.class_names = list(class_names)
        self.method_name = method_name or ("ConDaFormer" if attention == "plane" else "cubic-window Transformer")
        backbone = ConDaFormer(
            in_channels=3 + in_features,
            voxel_size=voxel_size,
            base_channels=base_channels,
            channels=tuple(channels),
            depths=tuple(depths),
            decoder_channels=tuple(decoder_channels),
            head_dim=head_dim,
            window_size=window_size,
            quant_size=quant_size,
            attention=attention,
            drop_path_rate=drop_path_rate,
            mlp_ratio=mlp_ratio,
        )
        self.segmenter = PointSegmenter(backbone, num_classes)
        self.setup_metrics()

    @property
    def backbone_name(self) -> str:
        hp = self.hparams
        return f"ConDaFormer-{hp.attention} w{hp.window_size} {list(hp.channels)}x{list(hp.depths)}"

    # -- metrics -------------------------------------------------------------------------------
    def configure_metrics(self) -> MetricCollection:
        k, ignore = self.num_classes, self.hparams.ignore_index
        labels = [name.replace(" ", "_") for name in self.class_names]
        metrics = {
            "miou": MulticlassJaccardIndex(k, average="macro", ignore_index=ignore),
            "macc": MulticlassAccuracy(k, average="macro", ignore_index=ignore),
            "allacc": MulticlassAccuracy(k, average="micro", ignore_index=ignore),
        }
        # one scalar metric per class (so each is logged); they share one confusion matrix
        # with miou through MetricCollection's compute groups
        metrics.update({f"iou_{label}": ClassIoU(k, c, ignore_index=ignore) for c, label in enumerate(labels)})
        return MetricCollection(metrics)

    # -- training ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.class_weights == "inverse_sqrt_frequency":
            counts = self.trainer.datamodule.datasets["train"].class_counts()
            self.class_weight = inverse_sqrt_frequency(counts).to(self.device)

    def forward(self, coord: torch.Tensor, feat: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return self.segmenter(coord, feat, offset)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.segmenter(batch["coord"], batch["feat"], batch["offset"])
        hp = self.hparams
        loss = F.cross_entropy(logits.float(), batch["segment"], weight=self.class_weight, ignore_index=hp.ignore_index, label_smoothing=hp.label_smoothing)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["offset"]))
        return loss

    def configure_optimizers(self) -> dict:
        """AdamW (or the chosen optimiser) with the ConDaFormer blocks at ``block_lr_scale``,
        no weight decay on norms and biases; warm-up, schedule and multi-step decay per step."""
        hp = self.hparams
        block_params = {id(p) for m in self.modules() if isinstance(m, ConDaFormerBlock) for p in m.parameters()}
        groups = []
        for scale, chosen in ((1.0, False), (hp.block_lr_scale, True)):
            module = nn.Module()
            named = [(n, p) for n, p in self.named_parameters() if (id(p) in block_params) == chosen]
            module.params = nn.ParameterList([p for _, p in named])
            for group in param_groups_weight_decay(module, hp.weight_decay):
                if group["params"]:
                    groups.append({**group, "lr": hp.lr * scale})
        optimiser = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[hp.optimizer]
        extra = {"momentum": 0.9} if hp.optimizer == "sgd" else {}
        optimizer = optimiser(groups, lr=hp.lr, **extra)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        base = lr_multiplier(hp.lr_schedule, total, hp.warmup_steps, hp.min_lr_ratio)
        milestones = [m * total for m in (hp.lr_milestones or [])]

        def factor(step: int) -> float:
            return base(step) * 0.1 ** sum(step >= m for m in milestones)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- inference: voting over voxel samplings --------------------------------------------------
    def _testing(self) -> bool:
        trainer = self._trainer
        return trainer is None or not (trainer.validating or trainer.sanity_checking or trainer.training)

    @torch.no_grad()
    def predict_batch(self, batch: dict) -> torch.Tensor:
        """Class probabilities (N, K) of every point, averaged over the voting passes."""
        hp = self.hparams
        coord, feat, offset = batch["coord"].float(), batch["feat"].float(), batch["offset"]
        batch_index = offset_to_batch(offset)
        clouds = len(offset)
        testing = self._testing()
        rotations = hp.test_rotations if testing else (0.0,)
        scales = hp.test_scales if testing else (1.0,)
        votes = hp.test_votes if testing else hp.val_votes
        probabilities = coord.new_zeros(len(coord), self.num_classes)
        passes = 0
        for angle in rotations:
            c, s = math.cos(angle * math.pi), math.sin(angle * math.pi)
            rotation = coord.new_tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
            turned_feat = feat
            if hp.normal_feature_index is not None and angle:
                i = hp.normal_feature_index
                turned_feat = torch.cat([feat[:, :i], feat[:, i : i + 3] @ rotation.T, feat[:, i + 3 :]], 1)
            for scale in scales:
                turned = coord @ rotation.T * scale
                samplings = votes or self._max_points_per_voxel(turned, batch_index, clouds)
                for index in range(samplings):
                    kept, inverse = grid_sample(turned, batch_index, hp.voxel_size, index=index, num_clouds=clouds)
                    sub_offset = batch_to_offset(batch_index[kept], clouds)
                    logits = self.segmenter(turned[kept], turned_feat[kept], sub_offset)
                    probabilities += torch.softmax(logits.float(), dim=1)[inverse]
                    passes += 1
        return probabilities / passes

    def _max_points_per_voxel(self, coord: torch.Tensor, batch_index: torch.Tensor, clouds: int) -> int:
        from backbones.ops.voxel_hash import grid_coordinates, pack_keys

        grid = torch.floor(grid_coordinates(coord, batch_index, self.hparams.voxel_size, clouds)).long()
        _, counts = torch.unique(pack_keys(batch_index, grid), return_counts=True)
        return int(counts.max())

    def update_metrics(self, metrics: MetricCollection, prediction: torch.Tensor, batch: dict) -> None:
        metrics.update(prediction, batch["segment"])

    # -- pictures ------------------------------------------------------------------------------
    def example_panels(self, batch: dict, prediction: torch.Tensor) -> list[torch.Tensor]:
        """Per scene: input colours | predicted classes | ground truth, seen obliquely from
        above with the ceiling cut away."""
        palette = class_palette(self.num_classes)
        panels = []
        labels = prediction.argmax(1).cpu()
        segment = batch.get("segment")
        for i, (coord, feat, predicted) in enumerate(
            zip(split_by_offset(batch["coord"], batch["offset"]), split_by_offset(batch["feat"], batch["offset"]), split_by_offset(labels, batch["offset"]))
        ):
            colour = feat[:, :3] if feat.shape[1] >= 3 else torch.full_like(coord, 0.6)
            views = [render_points(coord, colour), render_points(coord, palette[predicted])]
            if segment is not None:
                truth = split_by_offset(segment.cpu(), batch["offset"])[i]
                shown = palette[truth.clamp_min(0)]
                shown[truth < 0] = 0.85
                views.append(render_points(coord, shown))
            panels.append(side_by_side(views))
        return panels

    def report_figures(self, metrics: MetricCollection) -> list[tuple[str, torch.Tensor]]:
        """Per-class IoU as a bar chart, bars in each class's colour."""
        values = metrics.compute()
        iou = [float(values.get(f"{metrics.prefix or ''}iou_{name.replace(' ', '_')}", float("nan"))) for name in self.class_names]
        return [(f"{self.method_name}: IoU per class (test)", iou_bar_chart(self.class_names, iou, class_palette(self.num_classes)))]

    # -- export --------------------------------------------------------------------------------
    def _structure(self, coord: torch.Tensor) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
        """Index inputs of the voxel graph for one cloud, and the points kept (one per voxel)."""
        backbone = self.segmenter.backbone
        batch = torch.zeros(len(coord), dtype=torch.long, device=coord.device)
        kept, _ = grid_sample(coord, batch, backbone.voxel_size, index=0, num_clouds=1)
        _, voxels = backbone.voxelize(coord[kept], torch.tensor([len(kept)], device=coord.device))
        if len(voxels.keys) != len(kept):
            raise RuntimeError("grid-sampled points must occupy one voxel each")
        names, tensors = backbone.build_structure(voxels, bucketed=False).flat()
        # the graph works on voxels in key order: reorder the kept points the same way
        order = torch.empty_like(voxels.inverse)
        order[voxels.inverse] = torch.arange(len(kept), device=coord.device)
        return names, tensors, kept[order]

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("coord", "feat", *self._index_names())

    output_names = ("logits",)

    def _index_names(self) -> list[str]:
        names = ["neighbours_0"]
        for s, shifts in enumerate(self.segmenter.backbone.stage_shifts, start=1):
            names += [f"parent_{s}", f"children_{s}", f"neighbours_{s}"]
            names += [f"windows_{s}_{'shifted' if shift else 'plain'}" for shift in sorted(shifts)]
        return names

    def inference_module(self) -> nn.Module:
        return voxel_graph(self.segmenter, self._index_names())

    def inference_inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """The graph's inputs for the first scene of a batch (voxelized by one sampling)."""
        coord = split_by_offset(batch["coord"], batch["offset"])[0].float()
        feat = split_by_offset(batch["feat"], batch["offset"])[0].float()
        _, tensors, kept = self._structure(coord)
        return (coord[kept], feat[kept], *tensors)

    def _synthetic_inputs(self, seed: int, rays: int) -> tuple[torch.Tensor, ...]:
        from data.builtin_rooms import generate_room, scan_room

        room = generate_room(np.random.default_rng([seed, 99]))
        coord, colour, _ = scan_room(room, rays, scans=1)
        coord = torch.from_numpy(coord)
        feat = torch.cat([torch.from_numpy(colour).float() / 255, torch.zeros(len(coord), self.hparams.in_features - 3)], 1)
        return self.inference_inputs({"coord": coord, "feat": feat[:, : self.hparams.in_features], "offset": torch.tensor([len(coord)])})

    def example_input(self) -> tuple[torch.Tensor, ...]:
        return self._synthetic_inputs(seed=1, rays=12000)

    def check_input(self) -> tuple[torch.Tensor, ...]:
        return self._synthetic_inputs(seed=2, rays=9000)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {"coord": {0: "points"}, "feat": {0: "points"}, "neighbours_0": {0: "points"}}
        for name in self._index_names()[1:]:
            kind, s = name.rsplit("_", 1)[0], name.split("_")[1]
            level = int(s)
            if kind == "parent":
                axes[name] = {0: "points" if level == 1 else f"voxels_{level - 1}"}
            elif kind in ("children", "neighbours"):
                axes[name] = {0: f"voxels_{level}"}
            else:  # windows_<s>_<shift>
                axes[name] = {0: f"{name}_count", 1: f"{name}_length"}
        return axes


def iou_bar_chart(names: list[str], values: list[float], palette: torch.Tensor, width: int = 520) -> torch.Tensor:
    """Horizontal bars, one per class, with the value written at the end (PIL, no plotting library)."""
    row, left = 18, 130
    height = row * len(names) + 16
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, (name, value) in enumerate(zip(names, values)):
        y = 8 + i * row
        draw.text((4, y + 2), name[:20], fill=(0, 0, 0))
        if math.isfinite(value):
            colour = tuple(int(c * 255) for c in palette[i].tolist())
            draw.rectangle([left, y + 2, left + int(value * (width - left - 50)), y + row - 3], fill=colour, outline=(60, 60, 60))
            draw.text((left + int(value * (width - left - 50)) + 4, y + 2), f"{value:.2f}", fill=(0, 0, 0))
        else:
            draw.text((left, y + 2), "absent", fill=(120, 120, 120))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255

