"""Multi-organ CT segmentation (TransDAE and its U-Net baseline) under the Synapse protocol.

``task.py`` holds the LightningModule, ``network.py`` the encoder-decoder networks,
``metrics.py`` Dice / HD95 and their per-case averaging, ``figures.py`` the report pictures.
"""

from tasks.medical_segmentation.task import MedicalSegmentation

__all__ = ["MedicalSegmentation"]
