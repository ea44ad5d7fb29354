"""What every task shares: optimiser and schedule, metric logging, example images, and the
contracts that ``export`` and ``leaderboard`` rely on.

A task subclass supplies:

* the network, built in ``__init__`` from primitive arguments (the CLI reads their type hints,
  and checkpoints store them, so they must load with ``weights_only=True``);
* ``training_step``; ``predict_batch(batch)`` (inference on a batch) and
  ``update_metrics(metrics, prediction, batch)``, from which validation, test and predict follow;
* ``configure_metrics()``: a torchmetrics ``MetricCollection``, cloned per split;
* the export contract: ``inference_module()``, ``example_input()``, ``check_input()``,
  ``input_names``, ``output_names``, ``dynamic_axes`` and ``export_atol``;
* for the leaderboard: ``baselines()`` (classical methods scored on the same split),
  ``method_name`` and ``backbone_name``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from PIL import Image
from timm.optim import create_optimizer_v2
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("cosine", "poly", "constant")


class BaseTask(pl.LightningModule, ABC):
    """Shared training machinery for every task.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay; norms and biases are exempt (timm's grouping).
        optimizer: ``adamw``, ``adam`` or ``sgd`` (momentum 0.9).
        lr_schedule: ``cosine`` (to ``min_lr_ratio * lr``), ``poly`` (power 0.9, as in
            TransUNet-style segmentation) or ``constant``; stepped every optimiser step.
        warmup_steps: linear warm-up from zero before the schedule starts.
        min_lr_ratio: floor of the cosine schedule relative to ``lr``.
        num_examples: samples pictured (input, output, reference) per evaluation epoch (0 = none).
    """

    #: metric that selects the best checkpoint, and whether higher is better
    monitor: str = "val_loss"
    mode: str = "min"
    #: leaderboard grouping and row labels
    task_name: str = "task"
    method_name: str = "method"
    #: largest allowed |onnxruntime - PyTorch| difference in ``export``
    export_atol: float = 1e-4

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
        lr_schedule: str = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.01,
        num_examples: int = 4,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        self.save_hyperparameters()

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        kwargs = {"momentum": 0.9} if hp.optimizer == "sgd" else {}
        optimizer = create_optimizer_v2(self, opt=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay, **kwargs)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = lr_multiplier(hp.lr_schedule, total, hp.warmup_steps, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- metrics -----------------------------------------------------------------------------
    @abstractmethod
    def configure_metrics(self) -> MetricCollection:
        """The task's metrics; ``setup_metrics`` clones them once per evaluated split."""

    def setup_metrics(self) -> None:
        """Create one metric collection per evaluated split; call at the end of ``__init__``."""
        metrics = self.configure_metrics()
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    @abstractmethod
    def predict_batch(self, batch: dict) -> Any:
        """Inference on one batch, in the form ``update_metrics`` and the datamodule's writer take."""

    @abstractmethod
    def update_metrics(self, metrics: MetricCollection, prediction: Any, batch: dict) -> None:
        """Feed one batch's prediction and ground truth to ``metrics``."""

    def _evaluate(self, batch: dict, metrics: MetricCollection) -> Any:
        prediction = self.predict_batch(batch)
        self.update_metrics(metrics, prediction, batch)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size_of(batch))
        return prediction

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        prediction = self._evaluate(batch, self.val_metrics)
        if not self.trainer.sanity_checking:
            self._collect_examples(batch, prediction)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._collect_examples(batch, self._evaluate(batch, self.test_metrics))

    def on_validation_epoch_end(self) -> None:
        self._flush_examples("val_examples")

    def on_test_epoch_end(self) -> None:
        self._flush_examples("test_examples")

    def predict_step(self, batch: dict, batch_idx: int) -> Any:
        return self.predict_batch(batch)

    def on_predict_batch_end(self, outputs: Any, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        # The datamodule knows the file format; the same names are kept (``--data.predict_output_dir``).
        self.trainer.datamodule.write_prediction(outputs, batch["name"])

    def on_predict_end(self) -> None:
        # Outputs are staged while predicting and moved into the output folder only now.
        self.trainer.datamodule.finish_predictions()

    # -- example images ----------------------------------------------------------------------
    def example_panels(self, batch: dict, prediction: Any) -> list[torch.Tensor]:
        """One (3, H, W) picture in [0, 1] per sample (e.g. input | output | reference).

        The first ``num_examples`` of an evaluation epoch are stacked into one image and logged.
        Tasks without a natural picture return an empty list.
        """
        return []

    def _collect_examples(self, batch: dict, prediction: Any) -> None:
        panels = getattr(self, "_example_panels", [])
        missing = self.hparams.num_examples - len(panels)
        if missing > 0:
            panels.extend(p.detach().cpu() for p in self.example_panels(batch, prediction)[:missing])
        self._example_panels = panels

    def _flush_examples(self, tag: str) -> None:
        panels, self._example_panels = getattr(self, "_example_panels", []), []
        if panels:
            self.save_image(tag, stack_panels(panels))

    def report_figures(self, metrics: MetricCollection) -> list[tuple[str, torch.Tensor]]:
        """Pictures of a whole test split for the leaderboard's HTML report, from the computed
        ``metrics`` (e.g. a confusion matrix): ``(caption, (3, H, W) image in [0, 1])`` pairs."""
        return []

    def save_image(self, tag: str, image: torch.Tensor) -> None:
        """Send ``image`` (3, H, W in [0, 1]) to TensorBoard if it is the logger, and always write
        a PNG under ``<log_dir>/examples/`` so it can be opened without TensorBoard."""
        # Only rank 0 writes. ``trainer.log_dir`` is a collective call under DDP (it broadcasts),
        # so it must not be reached from one rank alone: ask the logger directly.
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        log_dir = getattr(self.logger, "log_dir", None) or self.trainer.default_root_dir
        image = image.detach().float().clamp(0, 1).cpu()
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, image, self.global_step)
        folder = Path(log_dir) / "examples"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{tag}_epoch{self.current_epoch:03d}.png")

    # -- export contract ---------------------------------------------------------------------
    input_names: tuple[str, ...] = ("image",)
    output_names: tuple[str, ...] = ("output",)

    @abstractmethod
    def inference_module(self) -> nn.Module:
        """A module mapping plain tensors to plain tensors: what ONNX export traces."""

    @abstractmethod
    def example_input(self) -> tuple[torch.Tensor, ...]:
        """Inputs at the size the graph is exported at."""

    @abstractmethod
    def check_input(self) -> tuple[torch.Tensor, ...]:
        """Inputs at another batch and spatial size, run in onnxruntime to prove the axes are dynamic."""

    def inference_inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """The inference graph's inputs taken from a data batch (by default its ``input_names`` keys)."""
        return tuple(batch[name] for name in self.input_names)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Named dynamic axes per input, e.g. ``{"image": {0: "batch", 2: "height"}}``."""
        return {name: {0: "batch"} for name in self.input_names}

    # -- leaderboard contract ----------------------------------------------------------------
    @property
    def backbone_name(self) -> str:
        return "-"

    def baselines(self) -> dict[str, Callable[[dict], Any]]:
        """Classical methods scored on the same split: name -> function(batch) -> prediction,
        in the same form as ``predict_batch`` returns."""
        return {}


def lr_multiplier(schedule: str, total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate factor per optimiser step: linear warm-up, then the chosen decay."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "poly":
            return (1 - progress) ** 0.9
        return 1.0

    return factor


def stack_panels(panels: list[torch.Tensor]) -> torch.Tensor:
    """Stack (3, H, W) pictures of different widths into one image, top to bottom, on white."""
    width = max(p.shape[-1] for p in panels)
    return torch.cat([F.pad(p, (0, width - p.shape[-1], 0, 4), value=1.0) for p in panels], dim=1)


def batch_size_of(batch: dict) -> int:
    """Number of samples in a batch dict (the first tensor's leading size, or the offsets' length)."""
    if "offset" in batch:
        return len(batch["offset"])
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return 1
