"""GraphEcho: echocardiogram video segmentation with unsupervised domain adaptation.

Paper: J. Yang, X. Ding, Z. Zheng, X. Xu, X. Li, "GraphEcho: Graph-Driven Unsupervised Domain
Adaptation for Echocardiogram Video Segmentation", ICCV 2023 (arXiv:2309.11145); official code
xmed-lab/GraphEcho. One training step (Sec. 3, Fig. 2):

1. labelled source clips and unlabelled target clips go through the frame segmentor
   (``segmentor.FPNSegmentor``); the source's annotated frames get the segmentation loss,
   Dice + BCE on one-hot masks (weights 1 and 1, as the official CardiacUDA script);
2. SCGM (``graph_matching``) matches the structures' graph nodes across domains, with confident
   target predictions as pseudo-masks, and four pyramid-level discriminators align the
   features adversarially (weight 0.1 each);
3. TCC (``temporal_cycle``) asks the frames of one heartbeat to find their counterparts in the
   next, in every clip (on by default; the official code ships it switched off).

Source and target frames share one forward pass, so that batch normalisation sees in training
the mixture of domains its running statistics hold at test time (the official code runs two
passes, which trains each domain under its own batch statistics and tests it under the mixture).

Evaluation segments every frame of the target's test videos and reports Dice per structure and
its mean, pooled over pixels (``dice*``) and per video (``video_dice``), background excluded
(``metrics``). ``adaptation`` switches the parts on and off, for the ablations the paper reports:
``none`` (source only, or the target-supervised upper bound when the datamodule's source is the
target), ``scgm``, ``tcc``, ``full``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchvision.utils import make_grid

from tasks.base import BaseTask
from tasks.echo_uda.graph_matching import FeatureDiscriminator, SpatialCrossDomainGraphMatching
from tasks.echo_uda.metrics import PooledDice, VideoDice
from tasks.echo_uda.segmentor import FPNSegmentor, SegmentFrames
from tasks.echo_uda.temporal_cycle import FrameEmbedder, cycle_back_loss

ADAPTATIONS = ("none", "scgm", "tcc", "full")
#: overlay colours of structures 1, 2, ... (LV red, LA green, RA blue, RV yellow for CardiacUDA)
COLOURS = ((0.9, 0.2, 0.2), (0.2, 0.85, 0.3), (0.25, 0.45, 1.0), (0.95, 0.85, 0.2), (0.8, 0.3, 0.9), (0.2, 0.85, 0.85))


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, dice_weight: float = 1.0, bce_weight: float = 1.0) -> torch.Tensor:
    """The official CardiacUDA loss: soft Dice (softmax over channels, squared denominator,
    smooth 1, per frame, averaged over every channel) + BCE of the logits with one-hot masks.
    (The official Dice numerator lacks the factor 2, which bounds that loss below by 0.5 and
    halves its gradient; this is the standard V-Net form.)"""
    one_hot = F.one_hot(masks, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    probability = logits.softmax(dim=1).flatten(2)
    target = one_hot.flatten(2)
    dice = 1 - (2 * (probability * target).sum(-1) + 1) / ((probability.pow(2) + target.pow(2)).sum(-1) + 1)
    return dice_weight * dice.mean() + bce_weight * F.binary_cross_entropy_with_logits(logits, one_hot)


def load_segmentor(path: str | Path, structures: Sequence[str]) -> FPNSegmentor:
    """The frame segmentor of an ``EchoVideoSegmentation`` checkpoint, in eval mode."""
    from data.errors import LayoutError

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    if list(hparams.get("structures", ())) != list(structures):
        raise LayoutError(path, f"segments {list(hparams.get('structures', ()))}, not {list(structures)}")
    segmentor = FPNSegmentor(
        len(structures) + 1, hparams["backbone"], hparams["backbone_kwargs"], 1, hparams["fpn_dim"], hparams["semantic_dim"]
    )
    prefix = "segmentor."
    segmentor.load_state_dict({k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    return segmentor.eval()


def caption_tile(text: str, height: int, width: int) -> torch.Tensor:
    """A white (3, height, width) tile with ``text`` written on it, one word per line."""
    import cv2
    import numpy as np

    canvas = np.full((height, width), 255, np.uint8)
    words = text.split()
    scale = max(0.3, min(0.5, width / 220))
    for line, word in enumerate(words):
        y = int(height / 2 + (line - (len(words) - 1) / 2) * 16 * scale / 0.4) + 4
        cv2.putText(canvas, word, (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 0, 1, cv2.LINE_AA)
    return torch.from_numpy(canvas.astype(np.float32) / 255.0).expand(3, height, width)


def overlay(frame: torch.Tensor, labels: torch.Tensor, alpha: float = 0.45) -> torch.Tensor:
    """A grey frame (H, W) in [0, 1] as RGB with structure ``labels`` (H, W) tinted."""
    rgb = frame.float().clamp(0, 1).expand(3, *frame.shape).clone()
    for index, colour in enumerate(COLOURS, start=1):
        region = labels == index
        if region.any():
            tint = torch.tensor(colour, device=rgb.device).view(3, 1)
            rgb[:, region] = (1 - alpha) * rgb[:, region] + alpha * tint
    return rgb


class EchoVideoSegmentation(BaseTask):
    """GraphEcho on source/target echo clips (see the module docstring).

    Args:
        structures: structure names, in output-channel order after background (must match the
            datamodule's).
        adaptation: ``full`` (SCGM + TCC), ``scgm``, ``tcc`` or ``none``.
        method_name: the leaderboard row's name (e.g. ``GraphEcho``, ``source only``).
        backbone, backbone_kwargs: timm backbone (``features_only``) or ``None`` for EchoCNN.
        fpn_dim, semantic_dim: FPN and semantic-branch channels (256 and 128 in the paper).
        dice_weight, bce_weight: segmentation loss terms.
        nodes_per_level, bg_ratio, node_weight, matching_weight, quadratic_weight,
            node_discriminator_weight, reversal_strength, sinkhorn_iterations: SCGM, as
            ``SpatialCrossDomainGraphMatching`` (official values by default).
        feature_discriminator_weight: weight of each pyramid level's adversarial loss (0.1).
        discriminator_layers: conv-GN-ReLU layers of each feature discriminator (4).
        pseudo_threshold: target pixels whose top class probability is below this give no node.
        graph_frames: frames per domain that SCGM and the discriminators see per step, drawn at
            random from the annotated source frames and all target frames (``None``: all; the
            official code feeds 16 source and 8 target frames).
        tcc_weight, tcc_temperature, tcc_embedding_dim: the cycle-back loss and its embedding.
        tcc_split: first frame of the clip's second heartbeat (default: half the clip).
        tcc_clips: which clips TCC sees: ``both`` domains, ``target`` or ``source`` only (CAMUS
            half-sequences cover half a beat, so CAMUS -> EchoNet uses ``target``).
        frames_per_forward: frames segmented at once at inference (bounds memory on long videos).
        before_adaptation: checkpoint of a model trained without adaptation (source only) on the
            same data; when the file exists, the example pictures show each target frame's ground
            truth, that model's masks (before adaptation) and this model's (after). Read when the
            pictures are made, so it may be fitted after this model.
        **kwargs: ``BaseTask`` arguments (optimiser, schedule, ``num_examples``).
    """

    monitor = "val_dice"
    mode = "max"
    task_name = "echo_uda"

    def __init__(
        self,
        structures: Sequence[str] = ("LV", "LA", "RA", "RV"),
        adaptation: str = "full",
        method_name: str = "GraphEcho",
        backbone: Optional[str] = None,
        backbone_kwargs: Optional[dict] = None,
        fpn_dim: int = 256,
        semantic_dim: int = 128,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        nodes_per_level: int = 100,
        bg_ratio: int = 8,
        node_weight: float = 1.0,
        matching_weight: float = 0.1,
        quadratic_weight: float = 1.0,
        node_discriminator_weight: float = 0.1,
        reversal_strength: float = 0.02,
        sinkhorn_iterations: int = 20,
        feature_discriminator_weight: float = 0.1,
        discriminator_layers: int = 4,
        pseudo_threshold: float = 0.5,
        graph_frames: Optional[int] = None,
        tcc_weight: float = 1.0,
        tcc_temperature: float = 0.1,
        tcc_embedding_dim: int = 128,
        tcc_split: Optional[int] = None,
        tcc_clips: str = "both",
        frames_per_forward: int = 64,
        before_adaptation: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if adaptation not in ADAPTATIONS:
            raise ValueError(f"adaptation must be one of {ADAPTATIONS}, got {adaptation!r}")
        if tcc_clips not in ("both", "target", "source"):
            raise ValueError(f"tcc_clips must be both, target or source, got {tcc_clips!r}")
        self.structures = list(structures)
        self.num_classes = len(self.structures) + 1
        self.method_name = method_name
        self.use_scgm = adaptation in ("scgm", "full")
        self.use_tcc = adaptation in ("tcc", "full")
        self.segmentor = FPNSegmentor(self.num_classes, backbone, backbone_kwargs, 1, fpn_dim, semantic_dim)
        if self.use_scgm:
            self.graph_matching = SpatialCrossDomainGraphMatching(
                fpn_dim,
                self.num_classes,
                nodes_per_level=nodes_per_level,
                bg_ratio=bg_ratio,
                node_weight=node_weight,
                matching_weight=matching_weight,
                quadratic_weight=quadratic_weight,
                node_discriminator_weight=node_discriminator_weight,
                reversal_strength=reversal_strength,
                sinkhorn_iterations=sinkhorn_iterations,
            )
            self.feature_discriminators = nn.ModuleList(FeatureDiscriminator(fpn_dim, reversal_strength, discriminator_layers) for _ in range(4))
        if self.use_tcc:
            self.frame_embedder = FrameEmbedder(fpn_dim, tcc_embedding_dim)
        self.setup_metrics()

    def setup(self, stage: str) -> None:
        """Refuse data whose structures (output channels) differ from the model's."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_structures = getattr(datamodule, "structures", None)
        if data_structures is not None and list(data_structures) != self.structures:
            from data.errors import LayoutError

            raise LayoutError(
                "--data.init_args.structures",
                f"the data segments {list(data_structures)} but the model {self.structures}; "
                "set --model.init_args.structures to the same list",
            )

    # -- metrics -------------------------------------------------------------------------------
    def configure_metrics(self) -> MetricCollection:
        metrics = {"dice": PooledDice(self.num_classes), "video_dice": VideoDice(self.num_classes)}
        for index, name in enumerate(self.structures, start=1):
            metrics[f"dice_{name.lower()}"] = PooledDice(self.num_classes, index)
        return MetricCollection(metrics)

    # -- training ------------------------------------------------------------------------------
    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.segmentor(frames)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        source, target = batch["source"], batch["target"]
        clips, length = source["video"].shape[:2]
        tcc_source = self.use_tcc and self.hparams.tcc_clips in ("both", "source")
        tcc_target = self.use_tcc and self.hparams.tcc_clips in ("both", "target")

        # Source: every frame when TCC sees its clips, else only the annotated frames. Target:
        # every frame when TCC sees its clips, else only the frames SCGM matches (none without
        # adaptation). Both go through ONE forward pass, so that batch norm normalises training
        # batches with the statistics its running averages (used at test time) accumulate.
        labelled = source["labelled"].flatten()
        source_frames, masks = source["video"].flatten(0, 1), source["mask"].flatten(0, 1)[labelled]
        source_frames = source_frames if tcc_source else source_frames[labelled]
        target_frames = target["video"].flatten(0, 1)
        matched = self._graph_frames(len(target_frames))
        if not tcc_target:
            target_frames = target_frames[matched] if self.use_scgm else target_frames[:0]
            matched = torch.arange(len(target_frames), device=self.device)
        logits, pyramid = self.segmentor(torch.cat([source_frames, target_frames]))
        n = len(source_frames)
        source_logits, target_logits = logits[:n], logits[n:]
        source_pyramid, target_pyramid = [p[:n] for p in pyramid], [p[n:] for p in pyramid]
        annotated = [p[labelled] for p in source_pyramid] if tcc_source else source_pyramid
        source_logits = source_logits[labelled] if tcc_source else source_logits

        losses = {"segmentation": segmentation_loss(source_logits, masks, self.hparams.dice_weight, self.hparams.bce_weight)}
        if self.use_scgm:
            losses.update(self.scgm_losses(annotated, masks, [p[matched] for p in target_pyramid], target_logits[matched]))
        if self.use_tcc:
            deepest = ([source_pyramid[-1]] if tcc_source else []) + ([target_pyramid[-1]] if tcc_target else [])
            embeddings = self.frame_embedder(torch.cat(deepest))
            losses["tcc"] = self.hparams.tcc_weight * cycle_back_loss(
                embeddings.view(-1, length, embeddings.shape[-1]), self.hparams.tcc_temperature, self.hparams.tcc_split
            )

        loss = sum(losses.values()) + self._all_parameters_in_graph()
        self.log("train_loss", loss, prog_bar=True, batch_size=clips)
        self.log_dict({f"train_{name}": value for name, value in losses.items()}, batch_size=clips)
        return loss

    def scgm_losses(self, source_pyramid, source_masks, target_pyramid, target_logits) -> dict[str, torch.Tensor]:
        """SCGM and the pyramid discriminators on ``graph_frames`` annotated source frames and
        the given target frames, whose confident predictions are the pseudo-masks."""
        confidence, pseudo = target_logits.detach().softmax(1).max(1)
        pseudo[confidence < self.hparams.pseudo_threshold] = -1
        picked = self._graph_frames(len(source_masks))
        source_pyramid = [p[picked] for p in source_pyramid]
        losses = self.graph_matching(source_pyramid, source_masks[picked], target_pyramid, pseudo)
        for level, (discriminator, s, t) in enumerate(zip(self.feature_discriminators, source_pyramid, target_pyramid)):
            losses[f"adversarial_p{level + 2}"] = self.hparams.feature_discriminator_weight * discriminator(s, t)
        return losses

    def _graph_frames(self, available: int) -> torch.Tensor:
        """Indices of the frames SCGM sees: ``graph_frames`` of ``available`` at random, or all."""
        limit = self.hparams.graph_frames
        if limit is None or limit >= available:
            return torch.arange(available, device=self.device)
        return torch.randperm(available, device=self.device)[:limit]

    def _all_parameters_in_graph(self) -> torch.Tensor:
        """Zero that touches every parameter, so DDP (without ``find_unused_parameters``) can
        reduce gradients in steps where a branch is skipped (a class without nodes, no target
        node yet)."""
        return sum(p.view(-1)[0] * 0.0 for p in self.parameters() if p.requires_grad)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def segment_video(self, video: torch.Tensor) -> torch.Tensor:
        """Structure index per pixel (T, H, W) of a (T, 1, H, W) video, in chunks of frames."""
        chunk = self.hparams.frames_per_forward
        return torch.cat([self.segmentor(video[i : i + chunk])[0].argmax(1) for i in range(0, len(video), chunk)])

    def predict_batch(self, batch: dict) -> torch.Tensor:
        return torch.stack([self.segment_video(video) for video in batch["video"]])

    def update_metrics(self, metrics: MetricCollection, prediction: torch.Tensor, batch: dict) -> None:
        for labels, mask, labelled in zip(prediction, batch["mask"], batch["labelled"]):
            if labelled.any():
                metrics.update(labels[labelled], mask[labelled])

    def example_panels(self, batch: dict, prediction: torch.Tensor, frames: int = 6) -> list[torch.Tensor]:
        """Per video: annotated frames through the cycle; rows: ground truth, the masks before
        adaptation (with ``before_adaptation``), this model's masks."""
        before_model = self._before_adaptation_model()
        panels = []
        for video, mask, labelled, labels in zip(batch["video"], batch["mask"], batch["labelled"], prediction):
            annotated = torch.nonzero(labelled).flatten()
            if len(annotated) == 0:
                continue
            picks = annotated[torch.linspace(0, len(annotated) - 1, min(frames, len(annotated))).round().long()]
            rows = {"ground truth": mask[picks]}
            if before_model is not None:
                with torch.no_grad():
                    rows["before adaptation"] = before_model.to(video.device)(video[picks].float())[0].argmax(1)
            rows["after adaptation" if before_model is not None else "prediction"] = labels[picks]
            scale = max(1, 128 // video.shape[-1])  # small frames are enlarged (nearest) to be seen
            tiles = []
            for caption, row in rows.items():
                tiles.append(caption_tile(caption, video.shape[-2] * scale, video.shape[-1] * scale))
                for k, t in enumerate(picks):
                    tiles.append(overlay(video[t, 0], row[k]).repeat_interleave(scale, 1).repeat_interleave(scale, 2).cpu())
            panels.append(make_grid(tiles, nrow=len(picks) + 1, padding=2, pad_value=1.0))
        return panels

    def _before_adaptation_model(self) -> Optional[FPNSegmentor]:
        """The segmentor of the ``before_adaptation`` checkpoint (loaded once, kept outside the
        module's parameters and state), or ``None`` without one; a missing file is reported."""
        path = self.hparams.get("before_adaptation")
        if path is None:
            return None
        if "_before_model" not in self.__dict__:
            model = None
            if not Path(path).is_file():
                rank_zero_warn(f"{path}: no such checkpoint; example pictures show no 'before adaptation' row (fit the source-only config first)")
            else:
                model = load_segmentor(path, self.structures)
            self.__dict__["_before_model"] = model  # a plain attribute: not a submodule, not saved
        return self.__dict__["_before_model"]

    # -- export --------------------------------------------------------------------------------
    output_names = ("logits",)
    export_atol = 1e-3

    def inference_module(self) -> nn.Module:
        return SegmentFrames(self.segmentor)

    def inference_inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        return (batch["video"][0],)

    def example_input(self) -> tuple[torch.Tensor, ...]:
        return (torch.rand(2, 1, 72, 88),)

    def check_input(self) -> tuple[torch.Tensor, ...]:
        return (torch.rand(3, 1, 64, 96),)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"image": {0: "batch", 2: "height", 3: "width"}}

    @property
    def dynamic_axis_min(self) -> dict[str, int]:
        """Frames must give P5 at least two cells each way (the exporter guards against size 1)."""
        smallest = self.segmentor.strides[-1] + 1
        return {"height": smallest, "width": smallest}

    # -- leaderboard ---------------------------------------------------------------------------
    @property
    def backbone_name(self) -> str:
        return self.hparams.backbone or "EchoCNN"
