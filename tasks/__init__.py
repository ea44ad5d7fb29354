"""Tasks: one LightningModule per task. Importing this package makes each selectable by class name."""

from tasks.base import BaseTask
from tasks.low_light import LowLightEnhancement
from tasks.registration import PointCloudRegistration

__all__ = ["BaseTask", "LowLightEnhancement", "PointCloudRegistration"]
