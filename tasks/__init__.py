"""Tasks: one LightningModule per task. Importing this package makes each selectable by class name."""

from tasks.base import BaseTask
from tasks.low_light import LowLightEnhancement
from tasks.point_segmentation import PointSegmentation

__all__ = ["BaseTask", "LowLightEnhancement", "PointSegmentation"]
