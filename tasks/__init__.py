"""Tasks: one LightningModule per task. Importing this package makes each selectable by class name."""

from tasks.base import BaseTask
from tasks.echo_uda import EchoVideoSegmentation
from tasks.low_light import LowLightEnhancement
from tasks.medical_segmentation import MedicalSegmentation
from tasks.point_segmentation import PointSegmentation
from tasks.registration import PointCloudRegistration
from tasks.scene_classification import SceneClassification

__all__ = [
    "BaseTask",
    "EchoVideoSegmentation",
    "LowLightEnhancement",
    "MedicalSegmentation",
    "PointCloudRegistration",
    "PointSegmentation",
    "SceneClassification",
]
