"""Tasks: one LightningModule per task. Importing this package makes each selectable by class name."""

from tasks.base import BaseTask
from tasks.echo_uda import EchoVideoSegmentation
from tasks.low_light import LowLightEnhancement
from tasks.scene_classification import SceneClassification

__all__ = ["BaseTask", "LowLightEnhancement", "SceneClassification"]
from tasks.medical_segmentation import MedicalSegmentation

__all__ = ["BaseTask", "LowLightEnhancement", "MedicalSegmentation"]
__all__ = ["BaseTask", "EchoVideoSegmentation", "LowLightEnhancement"]
from tasks.point_segmentation import PointSegmentation

__all__ = ["BaseTask", "LowLightEnhancement", "PointSegmentation"]
from tasks.registration import PointCloudRegistration

__all__ = ["BaseTask", "LowLightEnhancement", "PointCloudRegistration"]
