"""GraphEcho: echo video segmentation with unsupervised domain adaptation (ICCV 2023).

``task`` holds the LightningModule; ``segmentor`` the FPN frame segmentor; ``graph_matching``
SCGM and the feature discriminators; ``temporal_cycle`` TCC; ``metrics`` the Dice protocol.
"""

from tasks.echo_uda.task import EchoVideoSegmentation

__all__ = ["EchoVideoSegmentation"]
