"""Tasks: one LightningModule per task. Importing this package makes each selectable by class name."""

from tasks.base import BaseTask
from tasks.echo_uda import EchoVideoSegmentation
from tasks.low_light import LowLightEnhancement

__all__ = ["BaseTask", "EchoVideoSegmentation", "LowLightEnhancement"]
